"""The static choice of how a model's attention runs: the backend, its hooks and the per-step controls.

:class:`AttentionBackend` (hashable, a ``jit`` static argument) says which backend runs
self-attention (``"dense"`` or ``"dfs"``), with which implementations and hooks, on one device or
a mesh; it validates every name once, when it is built. :class:`StepControl` is what a denoising
step tells the layers (traced scalars). :class:`AttentionHooks` replace the layout source and
measure each layer. :mod:`models.common.processor` runs the layers with them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from dfsattn_jax.attention import check_dense_implementation
from dfsattn_jax.dispatch import check_implementation
from dfsattn_jax.orders import ORDER_NAMES
from dfsattn_jax.schedule import DFSConfig
from models.common.parallel import Parallelism

__all__ = [
    "BACKEND_NAMES",
    "AttentionBackend",
    "AttentionHooks",
    "StepControl",
    "dense_step",
    "make_backend",
    "sparse_step",
]

BACKEND_NAMES: tuple[str, ...] = ("dense", "dfs")


class StepControl(NamedTuple):
    """What self-attention does at one denoising step (traced scalars).

    Attributes:
      sparse: bool[]; run block-sparse attention in the sparse layers.
      refresh: bool[]; recompute (score and select) the layouts of the sparse layers first.
      num_blocks: int32[]; key blocks kept per (batch, head, query block) at a refresh.
    """

    sparse: Bool[Array, ""]
    refresh: Bool[Array, ""]
    num_blocks: Int[Array, ""]


def dense_step() -> StepControl:
    """A step with dense attention everywhere."""
    return StepControl(jnp.asarray(False), jnp.asarray(False), jnp.asarray(1, jnp.int32))


def sparse_step(num_blocks: int | Int[Array, ""], refresh: bool | Bool[Array, ""] = True) -> StepControl:
    """A sparse step keeping ``num_blocks`` key blocks (refreshing the layouts by default)."""
    return StepControl(jnp.asarray(True), jnp.asarray(refresh, bool), jnp.asarray(num_blocks, jnp.int32))


@dataclasses.dataclass(frozen=True)
class AttentionHooks:
    """Measurement and layout-source hooks of the attention processor (static; subclass it).

    The sampler hands every layer the run's ``inputs`` (a pytree given to the sampler call) and
    the step index; hooks read what they need from them, so hook settings that change between
    runs are traced values and do not recompile. The default hooks score with DFSAttn and
    measure nothing.
    """

    def scores(self, q: Array, k: Array, *, layer: int, inputs: Any, step: Array) -> Array | None:
        """Block scores ``float32[B, N, nq, nk]`` used at a refresh, or ``None`` for DFS scoring."""
        return None

    def layer_blocks(self, num_blocks: Array, *, layer: int, inputs: Any, step: Array, num_key_blocks: int) -> Array:
        """Key blocks this layer keeps at a refresh (int32[]; default: the step's ``num_blocks``).
        A value above the cache's ``K_max`` is clipped by the selection; ``num_key_blocks`` (all
        key blocks, for a joint sequence text included, as its budget counts) keeps the layer whole."""
        return num_blocks

    def probe(
        self, q: Array, k: Array, v: Array, out: Array, block_mask: Array, *, layer: int, inputs: Any, step: Array
    ) -> Any:
        """A pytree of float32 scalars measured on one layer's attention (``None``: nothing).

        ``block_mask`` is ``bool[B, N, nq, nk]``: the key blocks this step's attention visited.
        """
        return None

    def probe_template(self) -> Any:
        """Zeros shaped like :meth:`probe`'s result (``None`` when it returns ``None``)."""
        return None


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """Static choice of self-attention backend (hashable: usable as a ``jit`` static argument).

    Attributes:
      name: ``"dense"`` or ``"dfs"``.
      dfs: the DFSAttn parameters (``dfs`` backend; defaults to ``DFSConfig()``). Only the
        fields ``tile_size``, ``block_size``, ``order`` and ``dense_layers`` matter to the
        model; the step schedule comes in through :class:`StepControl`.
      order: token order name overriding ``dfs.order`` (``None``: ``dfs.order`` for ``dfs``,
        ``"raster"`` (no permutation) for ``dense``).
      sparse_implementation: passed to :func:`~dfsattn_jax.attention.block_sparse_attention`
        (a key of :data:`~dfsattn_jax.dispatch.ATTENTION`; ``None``: Pallas on GPU, the XLA
        reference elsewhere).
      dense_implementation: passed to :func:`~dfsattn_jax.attention.dense_attention` (``None``: cuDNN on GPU for
        16-bit inputs, XLA elsewhere).
      scoring_implementation: the block scorer of a refresh, passed to
        :func:`~dfsattn_jax.scoring.block_scores` (a key of
        :data:`~dfsattn_jax.dispatch.SCORING`; ``None``: the Triton kernel on
        GPU when it supports the input, the jnp scorer elsewhere). Hooks' scores replace it.
      interpret: run the Pallas kernels (sparse attention, block scoring) in the Pallas
        interpreter (tests).
      hooks: the layout-source and measurement hooks (:class:`AttentionHooks`).
      parallel: the device mesh (:class:`models.common.parallel.Parallelism`): attention runs
        per device on its heads (self-attention) or its tokens (cross-attention) inside
        ``jax.shard_map``; ``None``: one device. Hooks are single-device only.
    """

    name: str = "dense"
    dfs: DFSConfig | None = None
    order: str | None = None
    sparse_implementation: str | None = None
    dense_implementation: str | None = None
    scoring_implementation: str | None = None
    interpret: bool = False
    hooks: AttentionHooks = AttentionHooks()
    parallel: Parallelism | None = None

    def __post_init__(self) -> None:
        if self.name not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.name!r}")
        if self.name == "dfs" and self.dfs is None:
            object.__setattr__(self, "dfs", DFSConfig())
        if self.dfs is not None and not isinstance(self.dfs, DFSConfig):
            raise ValueError(f"dfs must be a DFSConfig, got {type(self.dfs).__name__}")
        if self.order is not None and self.order not in ORDER_NAMES:
            raise ValueError(f"order must be one of {ORDER_NAMES}, got {self.order!r}")
        check_implementation("attention", self.sparse_implementation, "sparse_implementation")
        check_dense_implementation(self.dense_implementation, "dense_implementation")
        check_implementation("scoring", self.scoring_implementation, "scoring_implementation")
        if not isinstance(self.interpret, bool):
            raise ValueError(f"interpret must be True or False, got {self.interpret!r}")
        if not isinstance(self.hooks, AttentionHooks):
            raise ValueError(f"hooks must be an AttentionHooks, got {type(self.hooks).__name__}")
        if self.parallel is not None and not isinstance(self.parallel, Parallelism):
            raise ValueError(f"parallel must be a Parallelism or None, got {type(self.parallel).__name__}")
        if self.parallel is not None and type(self.hooks) is not AttentionHooks:
            raise ValueError("hooks run on one device: give parallel=None to a backend with hooks")

    @property
    def is_sparse(self) -> bool:
        return self.name == "dfs"

    @property
    def token_order(self) -> str:
        """The order the model runs its tokens in."""
        if self.order is not None:
            return self.order
        return self.dfs.order if self.is_sparse else "raster"

    @property
    def block_size(self) -> int:
        return self.dfs.block_size if self.dfs is not None else 128

    def sparse_layers(self, num_layers: int) -> tuple[int, ...]:
        """Indices of the layers that may run sparse attention (empty for ``dense``).

        Raises:
          ValueError: if ``dfs.dense_layers`` names a layer outside ``[0, num_layers)``.
        """
        if not self.is_sparse:
            return ()
        dense = tuple(int(i) for i in self.dfs.dense_layers)
        bad = [i for i in dense if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"dense_layers {bad} out of range for a model of {num_layers} layers")
        return tuple(i for i in range(num_layers) if i not in dense)

    def slot(self, layer: int, num_layers: int) -> int | None:
        """Mask-cache slot of ``layer``, or ``None`` for an always-dense layer."""
        layers = self.sparse_layers(num_layers)
        return layers.index(layer) if layer in layers else None


def make_backend(
    name: str | AttentionBackend = "dense",
    dfs: DFSConfig | None = None,
    *,
    order: str | None = None,
    sparse_implementation: str | None = None,
    dense_implementation: str | None = None,
    scoring_implementation: str | None = None,
    interpret: bool = False,
    hooks: AttentionHooks | None = None,
) -> AttentionBackend:
    """Builds (and validates) an :class:`AttentionBackend`; an existing one is returned as is."""
    if isinstance(name, AttentionBackend):
        return name
    return AttentionBackend(
        name=name,
        dfs=dfs,
        order=order,
        sparse_implementation=sparse_implementation,
        dense_implementation=dense_implementation,
        scoring_implementation=scoring_implementation,
        interpret=interpret,
        hooks=AttentionHooks() if hooks is None else hooks,
    )
