"""One model over several devices: guidance-parallel and head-parallel (Ulysses) with ``jax.sharding``.

A :class:`Parallelism` describes a 2-D device mesh with the axes ``("guidance", "heads")``; a
model and its sampler run as ONE ``jax.jit`` program over that mesh (XLA's SPMD partitioner and
its NCCL collectives on GPU), with no process orchestration of our own.

``guidance`` (size ``g``)
  The model batch is split over this axis. With classifier-free guidance the batch is
  ``[cond; uncond]`` (``2B``), so ``g = 2`` puts the cond half on one device and the uncond half
  on the other: nothing is exchanged inside a denoiser evaluation; only the guidance combine
  ``v_uncond + s (v_cond - v_uncond)`` reads both halves, once per step.
``heads`` (size ``h``, Ulysses sequence parallelism)
  Outside self-attention every token-wise computation (projections, norms, RoPE, modulation,
  cross-attention to the text, the FFN) runs on ``L / h`` tokens per device. Around
  self-attention one all-to-all turns q, k, v from sequence-sharded ``[B, L/h, N, D]`` into
  head-sharded ``[B, L, N/h, D]`` and another turns the output back. A device then holds every
  token of ``N/h`` heads, and since DFS scores, selects, caches and attends per (batch, head),
  the whole DFS pipeline (block scoring, top-k selection, the mask-cache slot, the Pallas kernel)
  runs unchanged on the local heads: no mask is ever exchanged.

The two compose (``g x h`` devices). Shardings:

=====================================  =======================================================
array                                  partition spec
=====================================  =======================================================
latents, solver state, noise           replicated ``P()`` (a few MB; the solver is elementwise)
model batch (tokens ``[2B, L, dim]``)  ``P("guidance", "heads")``: batch over guidance, sequence
                                       over heads
q, k, v inside self-attention          ``P("guidance", None, "heads")``: batch, heads
text, timesteps, ``kv_lengths``        ``P("guidance")``: like the batch
mask cache ``[S, 2B, N, nq, K_max]``   ``P(None, "guidance", "heads")``: like the heads
weights                                replicated ``P()``
=====================================  =======================================================

The weights are replicated: Wan2.1-14B in bf16 is 28 GB, which fits beside the activations of
a 720p video on one 141 GB H200; sharding them (FSDP-style) would add an all-gather per layer
and is not needed at these sizes.

Pallas kernels (and cuDNN attention, whose partitioning rule refuses a sharded query sequence)
are custom calls that XLA cannot partition, so both attention cores run inside ``jax.shard_map``
(:meth:`Parallelism.head_parallel`, :meth:`Parallelism.sequence_parallel`), where every array is
the device's local block. A kernel called there must not name a grid axis like a mesh axis
(``guidance``, ``heads``): inside ``shard_map`` the Mosaic GPU lowering resolves
``lax.axis_index`` of such a name to the device's mesh coordinate (issue #15).

The rest of the model is partitioned by XLA from sharding constraints (:func:`shard_tokens`,
:func:`shard_batch`, :func:`replicate`, :func:`shard_cache`; each is the identity without a
:class:`Parallelism`, so single-device code paths stay as they are).

Requirements (each checked with a ``ValueError`` naming the argument, :meth:`Parallelism.check`):
``g`` divides the model batch, ``h`` divides the number of heads and the (attended) sequence
length, and ``g * h`` devices exist.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float

from dfsattn_jax.checks import check_positive_int

__all__ = [
    "GUIDANCE_AXIS",
    "HEADS_AXIS",
    "PARALLEL_MODES",
    "Parallelism",
    "divisors",
    "make_parallel",
    "replicate",
    "shard_batch",
    "shard_cache",
    "shard_tokens",
]

GUIDANCE_AXIS = "guidance"
HEADS_AXIS = "heads"
#: How :func:`make_parallel` splits a device count (``auto``: ``both`` for an even count with guidance, else ``heads``).
PARALLEL_MODES: tuple[str, ...] = ("auto", "guidance", "heads", "both")

# Tokens [B, L, ...] between the attentions: batch over guidance, sequence over heads (inside
# self-attention, after the all-to-all, the heads are split instead: [B/g, L, N/h, D] per device).
_SEQUENCE = P(GUIDANCE_AXIS, HEADS_AXIS)
_BATCH = P(GUIDANCE_AXIS)
# Mask cache kv_indices [S, B, N, nq, K_max] and kv_counts [S, B, N, nq].
_CACHE = P(None, GUIDANCE_AXIS, HEADS_AXIS)


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` (for error messages)."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """A ``guidance x heads`` device mesh for a model and its sampler (static, hashable).

    Attributes:
      guidance: devices the model batch is split over (2: cond and uncond on different devices).
      heads: devices the attention heads (and, between attentions, the tokens) are split over.
      devices: the ``guidance * heads`` devices, row-major over ``(guidance, heads)``; ``None``:
        the first ones of ``jax.devices()``, resolved when the mesh is first needed.
    """

    guidance: int = 1
    heads: int = 1
    devices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "guidance", check_positive_int(self.guidance, "guidance"))
        object.__setattr__(self, "heads", check_positive_int(self.heads, "heads"))
        if self.devices is not None:
            devices = tuple(self.devices)
            if len(devices) != self.size:
                raise ValueError(
                    f"devices must hold guidance x heads = {self.guidance} x {self.heads} = {self.size} "
                    f"devices, got {len(devices)}"
                )
            object.__setattr__(self, "devices", devices)

    @property
    def size(self) -> int:
        """Devices of the mesh: ``guidance * heads``."""
        return self.guidance * self.heads

    @property
    def mode(self) -> str:
        """``"guidance"``, ``"heads"``, ``"both"`` or ``"none"`` (one device), for logs and results."""
        return {(False, False): "none", (True, False): "guidance", (False, True): "heads"}.get(
            (self.guidance > 1, self.heads > 1), "both"
        )

    def __str__(self) -> str:
        return f"{self.guidance}x{self.heads} ({self.mode})"

    @functools.cached_property
    def mesh(self) -> Mesh:
        """The :class:`jax.sharding.Mesh` ``(guidance, heads)``.

        Raises:
          ValueError: when fewer than ``guidance * heads`` devices exist.
        """
        devices = self.devices
        if devices is None:
            available = jax.devices()
            if len(available) < self.size:
                raise ValueError(
                    f"parallelism {self.guidance} (guidance) x {self.heads} (heads) needs {self.size} devices, "
                    f"{len(available)} {jax.default_backend()} device(s) available (on CPU, set "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={self.size} before JAX starts)"
                )
            devices = available[: self.size]
        return Mesh(np.asarray(devices, dtype=object).reshape(self.guidance, self.heads), (GUIDANCE_AXIS, HEADS_AXIS))

    def sharding(self, spec: P = P()) -> NamedSharding:
        """``NamedSharding(mesh, spec)`` (default: replicated)."""
        return NamedSharding(self.mesh, spec)

    # -- checks ---------------------------------------------------------------------

    def check_heads(self, num_heads: int) -> None:
        """Raises ``ValueError`` unless ``heads`` divides the model's ``num_heads``."""
        if num_heads % self.heads:
            raise ValueError(
                f"heads (the head-parallel axis) must divide the model's {num_heads} attention heads, "
                f"got heads={self.heads}; use one of {divisors(num_heads)}"
            )

    def check(self, *, batch: int, num_heads: int, num_tokens: int, guided: bool | None = None) -> None:
        """Checks that a model evaluation fits the mesh.

        Args:
          batch: the model batch (``2B`` with classifier-free guidance).
          num_heads: attention heads of the model.
          num_tokens: length of the attended sequence (sharded over ``heads`` between attentions).
          guided: whether the batch is ``[cond; uncond]`` (only for the message).

        Raises:
          ValueError: naming ``guidance`` or ``heads`` and the values that would fit.
        """
        self.check_heads(num_heads)
        if batch % self.guidance:
            what = {True: " (cond + uncond)", False: " (no guidance: use the 'heads' mode)", None: ""}[guided]
            raise ValueError(
                f"guidance (the batch-parallel axis) must divide the model batch {batch}{what}, "
                f"got guidance={self.guidance}; use one of {divisors(batch)}"
            )
        if num_tokens % self.heads:
            raise ValueError(
                f"heads (the head-parallel axis) must divide the {num_tokens} tokens (the sequence is sharded "
                f"between attentions), got heads={self.heads}; common divisors of the heads and tokens: "
                f"{[d for d in divisors(num_heads) if num_tokens % d == 0]}"
            )

    # -- attention cores inside shard_map ---------------------------------------------

    def _to_heads(self, x: Array) -> Array:
        """Local ``[B, L/h, N, D]`` -> ``[B, L, N/h, D]`` (one all-to-all over ``heads``)."""
        if self.heads == 1:
            return x
        return jax.lax.all_to_all(x, HEADS_AXIS, split_axis=2, concat_axis=1, tiled=True)

    def _to_tokens(self, x: Array) -> Array:
        """Local ``[B, L, N/h, D]`` -> ``[B, L/h, N, D]`` (the inverse all-to-all)."""
        if self.heads == 1:
            return x
        return jax.lax.all_to_all(x, HEADS_AXIS, split_axis=1, concat_axis=2, tiled=True)

    def head_parallel(
        self,
        attend: Callable[..., tuple[Array, Any]],
        q: Float[Array, "b l n d"],
        k: Float[Array, "b l n d"],
        v: Float[Array, "b l n d"],
        state: Any,
        *batched: Any,
    ) -> tuple[Float[Array, "b l n d"], Any]:
        """Self-attention on each device's heads (Ulysses), inside ``jax.shard_map``.

        Args:
          attend: ``attend(q, k, v, state, *batched) -> (out, state)`` on local arrays: q, k, v,
            out ``[B/g, L, N/h, D]`` and the state's mask cache ``[S, B/g, N/h, nq, K_max]``. It
            must close over static values only.
          q, k, v: ``[B, L, N, D]`` (global, in attention order).
          state: a NamedTuple pytree with a ``cache`` field (a ``MaskCache`` or ``None``, sharded
            like the heads); every other leaf is replicated (step controls, the step index) and
            must be the same on every device when returned.
          batched: further arrays (or ``None``) with a leading batch axis, sharded like the batch,
            e.g. per-sample key lengths ``kv_lengths [B]``.

        Returns:
          ``(out [B, L, N, D], state)`` with the cache still sharded like the heads.
        """
        self.check(batch=q.shape[0], num_heads=q.shape[2], num_tokens=q.shape[1])
        cache_spec = None if state.cache is None else _cache_specs(state.cache)
        state_spec = jax.tree.map(lambda _: P(), state._replace(cache=None))._replace(cache=cache_spec)

        def local(q, k, v, state, *batched):
            out, state = attend(self._to_heads(q), self._to_heads(k), self._to_heads(v), state, *batched)
            return self._to_tokens(out), state

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(_SEQUENCE, _SEQUENCE, _SEQUENCE, state_spec, *(_BATCH,) * len(batched)),
            out_specs=(_SEQUENCE, state_spec),
            check_vma=False,  # Pallas custom calls carry no replication information
        )(q, k, v, state, *batched)

    def sequence_parallel(
        self,
        attend: Callable[[Array, Array, Array], Array],
        q: Float[Array, "b l n d"],
        k: Float[Array, "b t n d"],
        v: Float[Array, "b t n d"],
    ) -> Float[Array, "b l n d"]:
        """Attention of sequence-sharded queries to keys every device holds (cross-attention to the
        text), inside ``jax.shard_map``: ``attend(q [B/g, L/h, N, D], k, v [B/g, T, N, D])``; no
        communication."""
        return jax.shard_map(
            attend,
            mesh=self.mesh,
            in_specs=(_SEQUENCE, _BATCH, _BATCH),
            out_specs=_SEQUENCE,
            check_vma=False,
        )(q, k, v)


# --------------------------------------------------------------------------- constraints


def _constrain(tree: Any, parallel: Parallelism | None, spec: P) -> Any:
    if parallel is None or tree is None:
        return tree
    sharding = parallel.sharding(spec)
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def shard_tokens(x: Float[Array, "b l c"], parallel: Parallelism | None) -> Float[Array, "b l c"]:
    """Tokens ``[B, L, C]``: batch over ``guidance``, sequence over ``heads`` (identity without ``parallel``)."""
    return _constrain(x, parallel, _SEQUENCE)


def shard_batch(tree: Any, parallel: Parallelism | None) -> Any:
    """Arrays with a leading batch axis, split over ``guidance`` (identity without ``parallel``)."""
    return _constrain(tree, parallel, _BATCH)


def replicate(tree: Any, parallel: Parallelism | None) -> Any:
    """Every device holds the whole of each array (identity without ``parallel``)."""
    return _constrain(tree, parallel, P())


def shard_cache(cache: Any, parallel: Parallelism | None) -> Any:
    """A ``MaskCache`` ``[S, B, N, nq, K_max]`` sharded like the heads: batch over ``guidance``,
    heads over ``heads`` (identity without ``parallel`` or without a cache)."""
    if parallel is None or cache is None:
        return cache
    return jax.tree.map(
        lambda x, spec: jax.lax.with_sharding_constraint(x, parallel.sharding(spec)), cache, _cache_specs(cache)
    )


def _cache_specs(cache: Any) -> Any:
    """The partition spec of each ``MaskCache`` field: the layouts like the heads, the rest replicated."""
    return jax.tree.map(lambda _: P(), cache)._replace(kv_indices=_CACHE, kv_counts=_CACHE)


# --------------------------------------------------------------------------- construction


def make_parallel(spec: Parallelism | Mesh | int | None, mode: str = "auto", *, guided: bool = True) -> Parallelism | None:
    """A :class:`Parallelism` from a device count, a mesh or an existing one.

    Args:
      spec: ``None`` or ``1`` (one device: no parallelism, returns ``None``); a device count
        ``N`` split by ``mode``; a :class:`jax.sharding.Mesh` whose axes are ``"guidance"`` and/or
        ``"heads"``; or a :class:`Parallelism` (returned as is).
      mode: for a device count: ``"guidance"`` (``N x 1``), ``"heads"`` (``1 x N``), ``"both"``
        (``2 x N/2``, N even) or ``"auto"`` (``"both"`` for an even N with guidance, else
        ``"heads"``).
      guided: whether the runs use classifier-free guidance (a batch of cond and uncond), for
        ``"auto"``.

    Raises:
      ValueError: naming the argument that does not fit.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"mode must be one of {PARALLEL_MODES}, got {mode!r}")
    if spec is None or isinstance(spec, Parallelism):
        return spec
    if isinstance(spec, Mesh):
        unknown = [a for a in spec.axis_names if a not in (GUIDANCE_AXIS, HEADS_AXIS)]
        if unknown:
            raise ValueError(
                f"mesh axes must be {GUIDANCE_AXIS!r} and/or {HEADS_AXIS!r}, got {tuple(spec.axis_names)}"
            )
        names = list(spec.axis_names)
        devices = np.asarray(spec.devices, dtype=object)
        for axis, where in ((GUIDANCE_AXIS, 0), (HEADS_AXIS, devices.ndim)):
            if axis not in names:  # a missing axis has size 1
                devices = np.expand_dims(devices, where)
                names.insert(where, axis)
        devices = np.transpose(devices, (names.index(GUIDANCE_AXIS), names.index(HEADS_AXIS)))
        g, h = devices.shape
        return Parallelism(guidance=g, heads=h, devices=tuple(devices.reshape(-1)))
    if isinstance(spec, bool):
        raise ValueError(f"devices must be a positive integer, a Mesh or a Parallelism, got {spec!r}")
    count = check_positive_int(spec, "devices")
    if count == 1:
        return None
    if mode == "both" and count % 2:
        raise ValueError(f"mode 'both' (2 x N/2 devices) needs an even device count, got {count}")
    if mode == "guidance":
        return Parallelism(guidance=count)
    if mode == "heads" or (mode == "auto" and (count % 2 or not guided)):
        return Parallelism(heads=count)
    return Parallelism(guidance=2, heads=count // 2)
