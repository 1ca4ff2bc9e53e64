"""Attention entry points, and the one registry of block-sparse attention implementations.

``block_sparse_attention`` runs one of the registered implementations:

``"triton"``
  the Pallas (Triton backend) kernel of :mod:`pallas_kernels.block_sparse_triton`; any NVIDIA GPU.
``"mosaic_gpu"``
  the Pallas Mosaic GPU kernel of :mod:`pallas_kernels.block_sparse_mosaic`; Hopper (sm90) only.
``"xla"``
  the float32-accumulating XLA reference of :mod:`dfsattn_jax.reference` (dense attention with
  the layout expanded to a token mask): the CPU path and the test oracle.

``implementation=None`` picks with :func:`default_implementation` (the fastest that runs on the
default device); :func:`resolve_implementation` says which one a call would run and why.
``interpret=True`` runs a Pallas kernel in its interpreter on any backend (slow; tests).

``dense_attention`` runs cuDNN flash attention on GPU and XLA elsewhere. Both take and return
``[B, L, N, D]``, the layout of ``jax.nn.dot_product_attention``; both validate their inputs in
one place (:func:`check_attention_inputs`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dfsattn_jax.layout import BlockLayout
from dfsattn_jax.reference import (
    check_attention_inputs,
    check_block_size,
    check_kv_lengths,
    reference_block_sparse_attention,
)

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "asked_for",
    "block_sparse_attention",
    "check_attention_inputs",
    "default_implementation",
    "dense_attention",
    "gpu_compute_capability",
    "on_gpu",
    "resolve_implementation",
]

SparseImpl = Literal["triton", "mosaic_gpu", "xla"]
DenseImpl = Literal["cudnn", "xla"]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One registered block-sparse attention implementation.

    Attributes:
      name: the registry key.
      module: the module that defines ``function`` (imported only when the implementation runs).
      function: ``(q, k, v, layout, *, block_size, scale, kv_lengths, interpret) -> out``.
      pallas: a Pallas kernel (accepts ``interpret=True``); the XLA path ignores ``interpret``.
      description: one line for errors and docs.
    """

    name: str
    module: str
    function: str
    pallas: bool
    description: str

    def load(self) -> Callable[..., Array]:
        return getattr(importlib.import_module(self.module), self.function)

    def unsupported(self, q: Array, block_size: int, **params) -> str | None:
        """Why this implementation cannot run ``q`` (``None`` if it can); asks the kernel module's
        ``unsupported(q, block_size, **params)`` when it has one."""
        check = getattr(importlib.import_module(self.module), "unsupported", None)
        return None if check is None else check(q, block_size, **params)


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "triton", "pallas_kernels.block_sparse_triton", "block_sparse_attention", True,
            "Pallas Triton kernel (NVIDIA GPUs)",
        ),
        Implementation(
            "mosaic_gpu", "pallas_kernels.block_sparse_mosaic", "block_sparse_attention", True,
            "Pallas Mosaic GPU kernel (Hopper, sm90)",
        ),
        Implementation(
            "xla", "dfsattn_jax.reference", "reference_block_sparse_attention", False,
            "XLA reference (dense attention with a token mask; any backend)",
        ),
    )
}


def on_gpu() -> bool:
    """Whether JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def gpu_compute_capability() -> str | None:
    """The default GPU's compute capability (``"9.0"`` for Hopper), or ``None`` off GPU."""
    if not on_gpu():
        return None
    return getattr(jax.devices()[0], "compute_capability", None)


def default_implementation() -> str:
    """``"mosaic_gpu"`` on Hopper when its module is present, ``"triton"`` on other GPUs, else ``"xla"``."""
    if not on_gpu():
        return "xla"
    if gpu_compute_capability() == "9.0" and importlib.util.find_spec("pallas_kernels.block_sparse_mosaic"):
        return "mosaic_gpu"
    return "triton"


def asked_for(
    implementation: str, registry: dict[str, Implementation], what: str = "implementation"
) -> tuple[str, str]:
    """``(implementation, "asked for")``, once the name is found in ``registry`` (``what``: the
    argument's name in the error).

    Raises:
      ValueError: for a name ``registry`` does not hold.
    """
    if implementation not in registry:
        raise ValueError(f"{what} must be one of {tuple(registry)} or None, got {implementation!r}")
    return implementation, "asked for"


def resolve_implementation(
    q: Array, *, block_size: int = 128, implementation: str | None = None
) -> tuple[str, str]:
    """The implementation that :func:`block_sparse_attention` runs for ``q``, and why.

    Returns:
      ``(name, reason)``: with ``implementation=None`` the default of this device, falling back
      from ``mosaic_gpu`` to ``triton`` when the Mosaic kernel does not support the input (the
      reason says why); otherwise the one asked for.

    Raises:
      ValueError: for an unknown name.
    """
    if implementation is not None:
        return asked_for(implementation, IMPLEMENTATIONS)
    name = default_implementation()
    if name == "mosaic_gpu":
        why = IMPLEMENTATIONS[name].unsupported(q, block_size)
        if why is not None:
            return "triton", f"mosaic_gpu does not support this input ({why})"
        return name, "default on Hopper GPUs"
    return name, "default on GPUs" if name == "triton" else "default off GPU"


def block_sparse_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    layout: BlockLayout,
    *,
    block_size: int = 128,
    scale: float | None = None,
    kv_lengths: Int[Array, " b"] | None = None,
    implementation: SparseImpl | None = None,
    interpret: bool = False,
) -> Float[Array, "b l n d"]:
    """Attention over the key blocks of ``layout`` (docs/spec.md §5).

    Args:
      q, k, v: ``[B, L, N, D]``, one floating dtype, in attention (e.g. Hilbert) order.
      layout: which key blocks each (batch, head, query block) visits, ``[B, N, ceil(L/block), K_max]``.
      block_size: tokens per layout block.
      scale: logit scale, default ``1/sqrt(D)``.
      kv_lengths: optional ``int[B]`` valid key lengths in ``[0, L]`` (docs/spec.md §6.1): keys at
        or past ``kv_lengths[b]`` are never attended (default ``L``); a query with no visible key
        gives zeros. Read at run time (traced values are not range-checked; the kernels clip).
      implementation: a name of :data:`IMPLEMENTATIONS` or ``None`` for this device's default
        (see :func:`resolve_implementation`).
      interpret: run a Pallas kernel in the Pallas interpreter (any backend; slow, for tests).

    Returns:
      ``[B, L, N, D]`` in the input dtype.
    """
    # What resolving the implementation reads; each implementation then checks the layout (shape
    # and, when concrete, the rows' contract of docs/spec.md §4) and the key lengths, once.
    check_attention_inputs(q=q, k=k, v=v)
    block_size = check_block_size(block_size)
    name, _ = resolve_implementation(q, block_size=block_size, implementation=implementation)
    impl = IMPLEMENTATIONS[name]
    if not impl.pallas:
        return reference_block_sparse_attention(
            q, k, v, layout, block_size=block_size, scale=scale, kv_lengths=kv_lengths
        )
    return impl.load()(
        q, k, v, layout, block_size=block_size, scale=scale, kv_lengths=kv_lengths, interpret=bool(interpret)
    )


def dense_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b s n d"],
    v: Float[Array, "b s n d"],
    *,
    scale: float | None = None,
    kv_lengths: Int[Array, " b"] | None = None,
    implementation: DenseImpl | None = None,
) -> Float[Array, "b l n d"]:
    """Dense softmax attention; ``implementation=None`` uses cuDNN on GPU (16-bit inputs), XLA elsewhere.

    ``k``/``v`` may have another length ``S`` than ``q`` (cross-attention). ``kv_lengths``
    (optional ``int[B]`` in ``[1, S]``, docs/spec.md §6.1): keys at or past ``kv_lengths[b]`` are
    never attended (padded text of a joint sequence); both implementations honour it.
    """
    if implementation is None:
        implementation = "cudnn" if on_gpu() and q.dtype.itemsize == 2 else "xla"
    if implementation not in ("cudnn", "xla"):
        raise ValueError(f"implementation must be 'cudnn', 'xla' or None, got {implementation!r}")
    check_kv_lengths(kv_lengths, batch=q.shape[0], length=k.shape[1])
    if kv_lengths is not None:
        kv_lengths = kv_lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=kv_lengths, implementation=implementation
    )
