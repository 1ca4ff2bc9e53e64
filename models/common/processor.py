"""The DFS attention processor: how a self-attention layer runs dense or DFS attention.

Model families hand their self-attention to :func:`self_attention` (through the ``attend``
callable their blocks receive), as diffusers' attention processors do: the model knows nothing
of kernels, layouts or the mask cache.

Two backends (:class:`~models.common.backend.AttentionBackend`, static; it, the hooks and the
step controls live in :mod:`models.common.backend` and are re-exported here):

``dense``
  every self-attention layer runs :func:`dfsattn_jax.attention.dense_attention` (cuDNN on
  GPU, XLA elsewhere). A token ``order`` may still be given (tests use it to check that the
  permutation alone changes nothing).
``dfs``
  DFSAttn (docs/spec.md §6). The model permutes the tokens into the backend's order once, right
  after patch embedding, and restores raster order right before unpatchify. Layers in
  ``dfs.dense_layers`` always run dense attention; every other layer owns one slot of the
  :class:`~dfsattn_jax.cache.MaskCache`. At a step whose :class:`StepControl` says

  - ``sparse=False``: dense attention (the cache passes through unchanged);
  - ``sparse=True, refresh=True``: the layer scores its own q/k (after norm and RoPE, in
    attention order) with :func:`~dfsattn_jax.scoring.block_scores` (or its hooks' scores),
    keeps the ``num_blocks`` best key blocks per (batch, head, query block), stores that layout
    in its slot, and runs block-sparse attention with it;
  - ``sparse=True, refresh=False``: block-sparse attention with the cached layout.

What a layer threads is one pytree, :class:`AttentionState`: the step's controls, the mask
cache, the hooks' per-run inputs and the probes measured so far. The step's ``(sparse, refresh,
num_blocks)`` are traced scalars and the branches are ``lax.cond``, so one compiled program
serves every step and every density of a schedule. :class:`AttentionHooks` (static, on the
backend) replace the layout source at a refresh and measure each layer's attention; the
quality runner uses them, so no second forward pass or sampling loop exists.

Joint sequences (docs/spec.md §6.1, HunyuanVideo): the sequence is ``[video (reordered); text]``
and only the video span is reordered and sparsified. The processor's unit is the block layout,
so the joint rule (video query blocks keep their top video key blocks plus every key block that
holds valid text; text query blocks stay dense; padded text never attended through a per-sample
valid key length) is a layout built at the refresh from the scores of the whole sequence, with
the same cache, kernel and schedule as video-only models.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from dfsattn_jax.attention import block_sparse_attention, dense_attention
from dfsattn_jax.cache import MaskCache, cache_layout, cache_update, init_mask_cache
from dfsattn_jax.checks import check_positive_int
from dfsattn_jax.joint import (
    JointTokens,
    joint_attention,
    joint_block_mask,
    joint_kept_blocks,
    select_joint_blocks,
    valid_key_blocks,
)
from dfsattn_jax.layout import BlockLayout, select_blocks
from dfsattn_jax.orders import inverse_permutation, token_order
from dfsattn_jax.scoring import block_scores
from models.common.backend import (
    BACKEND_NAMES,
    AttentionBackend,
    AttentionHooks,
    StepControl,
    dense_step,
    make_backend,
    sparse_step,
)

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "AttentionHooks",
    "AttentionState",
    "StepControl",
    "TokenPermutation",
    "dense_step",
    "sparse_step",
    "make_backend",
    "token_permutation",
    "num_token_blocks",
    "check_state",
    "init_cache",
    "cross_attention",
    "self_attention",
    "skipped_fraction",
]

class TokenPermutation(NamedTuple):
    """A static token order of a grid: ``x_ordered = x[:, perm]``, ``x = x_ordered[:, inverse]``.

    ``perm``/``inverse`` are ``None`` for raster order (no gather at all).
    """

    perm: np.ndarray | None
    inverse: np.ndarray | None

    def apply(self, x: Float[Array, "b l c"]) -> Float[Array, "b l c"]:
        return x if self.perm is None else jnp.take(x, jnp.asarray(self.perm), axis=1)

    def restore(self, x: Float[Array, "b l c"]) -> Float[Array, "b l c"]:
        return x if self.inverse is None else jnp.take(x, jnp.asarray(self.inverse), axis=1)


def token_permutation(order: str, grid: tuple[int, int, int]) -> TokenPermutation:
    """The permutation of ``order`` on the token grid ``(F, H, W)``."""
    if order == "raster":
        return TokenPermutation(None, None)
    perm = np.asarray(token_order(order, tuple(int(g) for g in grid)), dtype=np.int32)
    return TokenPermutation(perm, np.asarray(inverse_permutation(perm), dtype=np.int32))


def num_token_blocks(num_tokens: int, block_size: int) -> int:
    """``ceil(L / block_size)``: query (= key) blocks of a sequence."""
    return max(1, math.ceil(num_tokens / block_size))


def init_cache(
    backend: AttentionBackend,
    num_layers: int,
    batch: int,
    heads: int,
    num_tokens: int,
    max_blocks: int,
    *,
    joint: JointTokens | None = None,
) -> MaskCache | None:
    """An empty mask cache for the sparse layers of a model (``None`` for ``dense``).

    ``max_blocks`` (``K_max``) is static: it fixes the cache's shape, hence the compiled
    program; any ``num_blocks <= max_blocks`` runs in that program. ``num_tokens`` is the
    attention's length: for a joint text + video sequence (``joint``) ``L_v + T``, whose blocks
    the cache rows cover, and ``max_blocks`` must hold one video block and every text block
    (:meth:`~dfsattn_jax.joint.JointTokens.check_capacity`).
    """
    if not backend.is_sparse:
        return None
    nk = num_token_blocks(num_tokens, backend.block_size)
    if joint is not None:
        max_blocks = joint.check(num_tokens).check_capacity(max_blocks, backend.block_size)
    else:
        max_blocks = check_positive_int(max_blocks, "max_blocks")
        if max_blocks > nk:
            raise ValueError(f"max_blocks must be in [1, {nk}] (key blocks of {num_tokens} tokens), got {max_blocks}")
    return init_mask_cache(len(backend.sparse_layers(num_layers)), batch, heads, nk, max_blocks)


class AttentionState(NamedTuple):
    """What the layers of one denoiser evaluation thread (a pytree).

    Attributes:
      control: this step's :class:`StepControl` (``None``: dense attention everywhere).
      cache: the mask cache of the ``dfs`` backend (``None`` for ``dense``).
      inputs: the hooks' per-run inputs (any pytree; ``None`` without hooks).
      step: int32[] the step index (for the hooks).
      probes: the hooks' measurements, one entry per self-attention layer, in layer order.
    """

    control: StepControl | None = None
    cache: MaskCache | None = None
    inputs: Any = None
    step: Array | None = None
    probes: tuple = ()


def check_state(backend: AttentionBackend, state: AttentionState, num_layers: int) -> None:
    """What a model's forward checks before any work: a step control on a backend with sparse
    layers needs a mask cache (:func:`init_cache`)."""
    if state.control is not None and state.cache is None and backend.sparse_layers(num_layers):
        raise ValueError("the dfs backend needs a mask cache when control is given; see init_cache")


def _score_layout(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    num_blocks: Int[Array, ""],
    max_blocks: int,
    backend: AttentionBackend,
    layer: int,
    state: AttentionState,
    joint: JointTokens | None,
    kv_lengths: Int[Array, " b"] | None,
) -> BlockLayout:
    scores = backend.hooks.scores(q, k, layer=layer, inputs=state.inputs, step=state.step)
    dfs = backend.dfs
    if scores is None:
        scores = block_scores(
            q, k, tile_size=dfs.tile_size, block_size=dfs.block_size, kv_lengths=kv_lengths,
            implementation=backend.scoring_implementation, interpret=backend.interpret,
        )  # fmt: skip
    # A joint budget counts the text blocks too, so num_key_blocks keeps a joint layer whole as well.
    num_blocks = backend.hooks.layer_blocks(
        num_blocks, layer=layer, inputs=state.inputs, step=state.step, num_key_blocks=scores.shape[-1]
    )
    if joint is None:
        return select_blocks(scores, num_blocks, max_blocks=max_blocks)
    return select_joint_blocks(
        scores, num_blocks, joint=joint, block_size=dfs.block_size, max_blocks=max_blocks, kv_lengths=kv_lengths
    )


def _check_cache(cache: MaskCache, q: Array, nk: int, backend: AttentionBackend, layer: int) -> None:
    if cache is None:
        raise ValueError(f"the dfs backend needs a mask cache (layer {layer} is sparse); see init_cache")
    if cache.kv_counts.shape[-1] != nk:
        raise ValueError(
            f"cache has {cache.kv_counts.shape[-1]} query blocks, {q.shape[1]} tokens need {nk} "
            f"(block_size={backend.block_size})"
        )
    if cache.kv_indices.shape[1] != q.shape[0] or cache.kv_indices.shape[2] != q.shape[2]:
        raise ValueError(
            f"cache holds batch {cache.kv_indices.shape[1]} x heads {cache.kv_indices.shape[2]}, "
            f"attention has batch {q.shape[0]} x heads {q.shape[2]}"
        )


def self_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    *,
    backend: AttentionBackend,
    layer: int,
    num_layers: int,
    state: AttentionState,
    joint: JointTokens | None = None,
    kv_lengths: Int[Array, " b"] | None = None,
) -> tuple[Float[Array, "b l n d"], AttentionState]:
    """Self-attention of one layer, dense or DFS (see the module docstring).

    Args:
      q, k, v: ``[B, L, N, D]`` after QK norm and RoPE, in the backend's token order (a joint
        sequence: ``[video (backend order); text]``).
      backend: the static backend (with its hooks).
      layer: this layer's index (static).
      num_layers: layers of the model (static).
      state: the threaded :class:`AttentionState`.
      joint: the spans of a joint text + video sequence (``None``: video only, the Wan path).
        Its sparse steps follow :mod:`dfsattn_jax.joint` (docs/spec.md §6.1).
      kv_lengths: ``int32[B]`` valid key lengths (``L_v`` + valid text tokens): keys at or past
        ``kv_lengths[b]`` are never attended, by the dense path, the kernels and the scorer
        (``None``: all ``L`` keys).

    Returns:
      ``(out [B, L, N, D], state)``: the cache with this layer's slot updated at a refresh, and
      this layer's probe appended when the hooks measure. With ``joint``, the rows of padded
      text queries attend to the valid keys (they never reach a valid output).

    With ``backend.parallel`` the layer runs per device on its heads (Ulysses all-to-alls around
    it; the cache is sharded like the heads, ``kv_lengths`` like the batch):
    :meth:`models.common.parallel.Parallelism.head_parallel`. The sequence (for ``joint``: the
    whole joint sequence ``L_v + T``) must then be divisible by the ``heads`` axis
    (:meth:`~models.common.parallel.Parallelism.check` raises a ``ValueError`` otherwise).
    """
    if joint is not None:
        joint.check(q.shape[1])
    attend = functools.partial(_self_attention, backend=backend, layer=layer, num_layers=num_layers, joint=joint)
    if backend.parallel is None:
        return attend(q, k, v, state, kv_lengths)
    return backend.parallel.head_parallel(attend, q, k, v, state, kv_lengths)


def cross_attention(
    q: Float[Array, "b l n d"], k: Float[Array, "b t n d"], v: Float[Array, "b t n d"], *, backend: AttentionBackend
) -> Float[Array, "b l n d"]:
    """Dense attention of the video tokens to the text (``backend.dense_implementation``); with
    ``backend.parallel``, per device on its tokens (no communication)."""
    attend = functools.partial(dense_attention, implementation=backend.dense_implementation)
    if backend.parallel is None:
        return attend(q, k, v)
    return backend.parallel.sequence_parallel(attend, q, k, v)


def _self_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    state: AttentionState,
    kv_lengths: Int[Array, " b"] | None,
    *,
    backend: AttentionBackend,
    layer: int,
    num_layers: int,
    joint: JointTokens | None,
) -> tuple[Float[Array, "b l n d"], AttentionState]:
    """:func:`self_attention` on one device (under ``backend.parallel``: its local heads and
    samples, the whole sequence)."""
    dense = lambda: dense_attention(  # noqa: E731
        q, k, v, kv_lengths=kv_lengths, implementation=backend.dense_implementation
    )
    slot = backend.slot(layer, num_layers)
    control, cache = state.control, state.cache
    nk = num_token_blocks(q.shape[1], backend.block_size)
    if slot is None or control is None:
        out = dense()
        visited = None
    else:
        _check_cache(cache, q, nk, backend, layer)
        cached = cache_layout(cache, slot, nk)

        def sparse_branch(cached_layout: BlockLayout) -> tuple[Array, BlockLayout]:
            layout = jax.lax.cond(
                control.refresh,
                lambda: _score_layout(
                    q, k, control.num_blocks, cached.max_blocks, backend, layer, state, joint, kv_lengths
                ),
                lambda: cached_layout,
            )
            options = dict(
                block_size=backend.block_size, kv_lengths=kv_lengths,
                implementation=backend.sparse_implementation, interpret=backend.interpret,
            )  # fmt: skip
            if joint is None:
                out = block_sparse_attention(q, k, v, layout, **options)
            else:
                out = joint_attention(
                    q, k, v, layout, joint=joint, dense_implementation=backend.dense_implementation, **options
                )
            return out, layout

        def dense_branch(layout: BlockLayout) -> tuple[Array, BlockLayout]:
            return dense(), layout

        out, layout = jax.lax.cond(control.sparse, sparse_branch, dense_branch, cached)
        # The slot is written back every step (an in-place update of one layer's rows, cheaper
        # than passing the whole cache through a conditional); it changes only at a refresh, and
        # ``refreshes`` (one per layer per refresh step) counts only those.
        refreshed = jnp.logical_and(control.sparse, control.refresh).astype(cache.refreshes.dtype)
        cache = cache_update(cache, slot, layout)._replace(refreshes=cache.refreshes + refreshed)
        visited = lambda: _visited(layout, control.sparse, joint, backend.block_size, kv_lengths)  # noqa: E731
    state = state._replace(cache=cache)
    if backend.hooks.probe_template() is None:
        return out, state
    batch, _, heads, _ = q.shape
    if visited is not None:
        mask = visited()
    elif joint is None:
        mask = jnp.ones((batch, heads, nk, nk), bool)
    else:
        mask = _visited(None, True, joint, backend.block_size, kv_lengths, batch=batch, heads=heads)
    probe = backend.hooks.probe(q, k, v, out, mask, layer=layer, inputs=state.inputs, step=state.step)
    return out, state._replace(probes=state.probes + (probe,))


def _visited(
    layout: BlockLayout | None,
    sparse: Bool[Array, ""] | bool,
    joint: JointTokens | None,
    block_size: int,
    kv_lengths: Int[Array, " b"] | None,
    *,
    batch: int = 0,
    heads: int = 0,
) -> Bool[Array, "b n nq nk"]:
    """The key blocks this step's attention visited (``layout=None``: a dense step)."""
    if joint is None:
        return jnp.logical_or(layout.to_dense_mask(), jnp.logical_not(sparse))
    nk = joint.num_blocks(block_size)
    if layout is None:
        layout = BlockLayout(
            jnp.zeros((batch, heads, nk, 1), jnp.int32), jnp.zeros((batch, heads, nk), jnp.int32), nk
        )
    sparse_mask = joint_block_mask(layout, joint=joint, block_size=block_size, kv_lengths=kv_lengths)
    lengths = kv_lengths if kv_lengths is not None else jnp.full((layout.kv_counts.shape[0],), joint.length)
    dense_mask = valid_key_blocks(lengths, nk, block_size)[:, None, None, :]
    return jnp.where(sparse, sparse_mask, dense_mask)


def skipped_fraction(
    cache: MaskCache | None, num_layers: int, *, joint: JointTokens | None = None, block_size: int = 128
) -> Float[Array, ""]:
    """Mean skipped block fraction over all self-attention layers for the layouts in ``cache``.

    Always-dense layers count 0 (docs/spec.md §6): ``sum_slots mean(1 - kept / nk) / num_layers``
    (self-attention: ``nk`` = the number of query blocks). ``kept`` is a row's count; with
    ``joint`` it is counted as the reference counts it (:func:`dfsattn_jax.joint.joint_kept_blocks`:
    text blocks always count, dense rows count ``nk``).
    """
    if cache is None or cache.kv_counts.shape[0] == 0:
        return jnp.zeros((), jnp.float32)
    nk = cache.kv_counts.shape[-1]
    if joint is None:
        kept = jnp.mean(cache.kv_counts.astype(jnp.float32), axis=(1, 2, 3))
    else:
        kept = jnp.mean(
            joint_kept_blocks(cache.kv_indices, cache.kv_counts, joint=joint, block_size=block_size), axis=(1, 2)
        )
    return jnp.sum(1.0 - kept / nk) / num_layers
