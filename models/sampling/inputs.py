"""The checks of a sampler call, run once at its public entry points before anything is traced.

:meth:`~models.sampling.loop.Sampler.__call__` and :meth:`~models.sampling.loop.Sampler.warmup`
pass their arguments through :func:`check_sampler_inputs` (and an explicit plan through
:func:`check_plan`); what comes back is checked and converted (arrays, the token grid, the joint
spans, the order as input arrays), and the jitted loop and the schedule helpers it feeds take it
as it is. Each check raises ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from dfsattn_jax.checks import check_positive_int
from dfsattn_jax.joint import JointTokens
from dfsattn_jax.schedule import DFSConfig, SchedulePlan
from models.common.parallel import Parallelism
from models.common.processor import AttentionBackend, TokenPermutation, num_token_blocks, token_permutation

__all__ = [
    "SamplerInputs",
    "attention_tokens",
    "check_dfs_override",
    "check_finite",
    "check_plan",
    "check_sampler_inputs",
    "joint_tokens",
    "order_arrays",
]


class SamplerInputs(NamedTuple):
    """The checked inputs of one sampler call.

    Attributes:
      noise: float32 ``[B, C, F, H, W]``.
      text, negative_text: the conditioning pytrees (``negative_text`` ``None`` without guidance).
      guidance_scale: float32 ``[]``.
      order: the run's token permutation as input arrays (``None``: the backend's static order).
      joint: the spans of a joint text + video attention (``None``: video tokens only).
      num_tokens: tokens of the model's self-attention (the joint length, or ``F * H * W``).
      num_steps: the denoising steps, a Python int ``>= 1``.
      guidance_scale_2: float32 ``[]``, the second expert's guidance scale (``None`` without a
        second expert).
      condition: float32 ``[B, C_c, F, H, W]``, latent channels the model takes after the
        latents' at every step (Wan I2V: mask and image latents), ``None`` without.
    """

    noise: Float[Array, "b c f h w"]
    text: Any
    negative_text: Any
    guidance_scale: Float[Array, ""]
    order: TokenPermutation | None
    joint: JointTokens | None
    num_tokens: int
    num_steps: int
    guidance_scale_2: Float[Array, ""] | None = None
    condition: Float[Array, "b cc f h w"] | None = None


def check_finite(**values: Any) -> None:
    """Raises ``ValueError`` naming the first argument that holds a NaN or an infinity (``None``,
    traced and non-floating values are skipped; a pytree is checked leaf by leaf and the error
    names the leaf's path): non-finite inputs would make every latent NaN."""
    for name, value in values.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
            if leaf is None or isinstance(leaf, jax.core.Tracer):
                continue
            leaf = jnp.asarray(leaf)
            if not jnp.issubdtype(leaf.dtype, jnp.inexact):
                continue
            if not bool(jnp.all(jnp.isfinite(leaf))):
                where = f"{name}{jax.tree_util.keystr(path)}"
                raise ValueError(f"{where} must be finite, got NaN or infinite values")


def joint_tokens(model: nnx.Module, grid: tuple[int, int, int], cond: Any) -> JointTokens | None:
    """The spans of a joint text + video attention (``model.joint_tokens(grid, cond)``), or
    ``None`` for a model whose self-attention covers the video tokens only (Wan)."""
    method = getattr(model, "joint_tokens", None)
    return None if method is None else method(grid, cond).check()


def attention_tokens(grid: tuple[int, int, int], joint: JointTokens | None) -> int:
    """Tokens of the model's self-attention: the joint length, or ``prod(grid)``."""
    return math.prod(grid) if joint is None else joint.length


def order_arrays(order: str | None, grid: tuple[int, int, int]) -> TokenPermutation | None:
    """The permutation of ``order`` on the token grid ``(F, H, W)`` as input arrays ``int32[L]``
    (``None``: the backend's static order); raster given explicitly is the identity, so that runs
    in any order share one program."""
    if order is None:
        return None
    perm = token_permutation(order, grid)
    if perm.perm is None:
        ident = np.arange(math.prod(grid), dtype=np.int32)
        perm = TokenPermutation(ident, ident)
    return TokenPermutation(jnp.asarray(perm.perm), jnp.asarray(perm.inverse))


def _check_negative_text(negative_text: Any, text: Any) -> Any:
    """``negative_text`` as arrays, after checking it has the pytree structure and the shapes of ``text``."""
    negative_text = jax.tree.map(jnp.asarray, negative_text)
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)  # noqa: E731
    if jax.tree.structure(negative_text) != jax.tree.structure(text) or shapes(negative_text) != shapes(text):
        raise ValueError(
            f"negative_text must have the structure and shapes of text {shapes(text)}, got {shapes(negative_text)}"
        )
    return negative_text


def check_sampler_inputs(
    model: nnx.Module,
    noise: Float[Array, "b c f h w"],
    text: Any,
    negative_text: Any,
    *,
    num_steps: int,
    guidance_scale: float,
    order: str | None,
    parallel: Parallelism | None,
    guidance_scale_2: float | None = None,
    experts: int = 1,
    condition: Float[Array, "b cc f h w"] | None = None,
) -> SamplerInputs:
    """Checks one sampler call (arguments as :meth:`~models.sampling.loop.Sampler.__call__`):
    the model's own shape checks (``model.check_inputs``), ``negative_text`` against ``text``,
    finite values, the joint spans, the fit on the device mesh, ``num_steps`` and ``order``;
    ``guidance_scale_2`` only with ``experts == 2`` (default: ``guidance_scale``); ``condition``
    of ``noise``'s batch and grid (the model checks the channels of both together).

    Raises:
      ValueError: naming the argument and the expected value.
    """
    noise = jnp.asarray(noise)
    text = jax.tree.map(jnp.asarray, text)
    model_input = noise
    if condition is not None:
        condition = jnp.asarray(condition)
        if condition.ndim != noise.ndim or condition.shape[:1] + condition.shape[2:] != noise.shape[:1] + noise.shape[2:]:
            raise ValueError(f"condition must be [B, C, F, H, W] with noise's B, F, H, W {noise.shape}, got {condition.shape}")
        condition = condition.astype(jnp.float32)
        model_input = jnp.concatenate([noise.astype(jnp.float32), condition], axis=1)
    grid = model.check_inputs(model_input, jnp.zeros((noise.shape[0],)), text)
    if negative_text is not None:
        negative_text = _check_negative_text(negative_text, text)
    if guidance_scale_2 is not None and experts != 2:
        raise ValueError("guidance_scale_2 is the second expert's guidance scale: give the sampler a model_2")
    check_finite(
        noise=noise, text=text, negative_text=negative_text, guidance_scale=guidance_scale,
        guidance_scale_2=guidance_scale_2, condition=condition,
    )  # fmt: skip
    if experts == 2 and guidance_scale_2 is None:
        guidance_scale_2 = guidance_scale
    joint = joint_tokens(model, grid, text)
    num_tokens = attention_tokens(grid, joint)
    if parallel is not None:
        guided = negative_text is not None
        batch = noise.shape[0] * (2 if guided else 1)
        parallel.check(batch=batch, num_heads=model.config.num_heads, num_tokens=num_tokens, guided=guided)
    num_steps = check_positive_int(num_steps, "num_steps")
    return SamplerInputs(
        noise=noise.astype(jnp.float32),
        text=text,
        negative_text=negative_text,
        guidance_scale=jnp.asarray(guidance_scale, jnp.float32),
        order=order_arrays(order, grid),
        joint=joint,
        num_tokens=num_tokens,
        num_steps=num_steps,
        guidance_scale_2=None if experts != 2 else jnp.asarray(guidance_scale_2, jnp.float32),
        condition=condition,
    )


def check_dfs_override(dfs: Any, backend: AttentionBackend) -> DFSConfig:
    """``dfs`` after checking it is a :class:`DFSConfig` that changes only the schedule fields of
    ``backend.dfs`` (tile and block size, order and dense layers are the backend's), on a
    sampler with the dfs backend."""
    if not backend.is_sparse:
        raise ValueError("dfs can only be given to a sampler with the dfs backend")
    if not isinstance(dfs, DFSConfig):
        raise ValueError(f"dfs must be a DFSConfig, got {type(dfs).__name__}")
    static = ("tile_size", "block_size", "order", "dense_layers")
    diff = [f for f in static if getattr(dfs, f) != getattr(backend.dfs, f)]
    if diff:
        raise ValueError(
            f"dfs may only change the schedule; its {diff} differ from the backend's "
            "(make a Sampler with that backend instead)"
        )
    return dfs


def check_plan(plan: SchedulePlan, num_steps: int, num_tokens: int, backend: AttentionBackend) -> SchedulePlan:
    """An explicit ``plan`` after checking it covers ``num_steps`` steps over the key blocks of
    ``num_tokens`` tokens, on a sampler with the dfs backend."""
    nk = num_token_blocks(num_tokens, backend.block_size)
    if not backend.is_sparse:
        raise ValueError("plan can only be given to a sampler with the dfs backend")
    if plan.num_steps != num_steps or plan.num_key_blocks != nk:
        raise ValueError(
            f"plan must cover {num_steps} steps over {nk} key blocks, got "
            f"{plan.num_steps} steps over {plan.num_key_blocks}"
        )
    return plan
