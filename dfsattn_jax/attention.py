"""Attention entry points: ``block_sparse_attention`` and ``dense_attention``.

``block_sparse_attention`` checks its inputs once (the kernels' contract,
:func:`pallas_kernels.contract.check_block_sparse_inputs`), asks :func:`dfsattn_jax.dispatch.resolve`
which implementation runs (``"mosaic_gpu"`` on Hopper, ``"triton"`` on other NVIDIA GPUs, the
``"xla"`` oracle elsewhere, or the one asked for) and runs it unchecked. ``interpret=True`` runs a
Pallas kernel in its interpreter on any backend (slow; tests).

``dense_attention`` runs cuDNN flash attention on GPU and XLA elsewhere. Both take and return
``[B, L, N, D]``, the layout of ``jax.nn.dot_product_attention``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from dfsattn_jax import dispatch
from pallas_kernels.contract import BlockLayout, check_block_sparse_inputs, check_kv_lengths

__all__ = ["DENSE_IMPLEMENTATIONS", "block_sparse_attention", "check_dense_implementation", "dense_attention"]

SparseImpl = Literal["triton", "mosaic_gpu", "xla"]
DenseImpl = Literal["cudnn", "xla"]
#: The dense attentions ``dense_attention`` runs (``jax.nn.dot_product_attention``'s names).
DENSE_IMPLEMENTATIONS: tuple[str, ...] = ("cudnn", "xla")


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
      implementation: a name of :data:`dfsattn_jax.dispatch.ATTENTION` or ``None`` for this
        device's default (see :func:`dfsattn_jax.dispatch.resolve`).
      interpret: run a Pallas kernel in the Pallas interpreter (any backend; slow, for tests).

    Returns:
      ``[B, L, N, D]`` in the input dtype.

    Raises:
      TypeError, ValueError: for inputs that break the contract, or an unknown ``implementation``.
      NotImplementedError: for an implementation asked for that cannot take the input.
    """
    check_block_sparse_inputs(q, k, v, layout, block_size=block_size, kv_lengths=kv_lengths)
    return attend(
        q, k, v, layout, block_size=block_size, scale=scale, kv_lengths=kv_lengths,
        implementation=implementation, interpret=interpret,
    )  # fmt: skip


def attend(q, k, v, layout, *, block_size, scale, kv_lengths, implementation, interpret) -> Float[Array, "b l n d"]:
    """:func:`block_sparse_attention` after its checks, same arguments (for the method's own entry
    points that made them, e.g. :func:`dfsattn_jax.joint.joint_attention`): resolve, then run."""
    name = dispatch.resolve("attention", q, implementation, block_size=block_size).name
    impl = dispatch.ATTENTION[name]
    options = dict(block_size=block_size, scale=scale, kv_lengths=kv_lengths)
    if impl.pallas:
        options["interpret"] = interpret
    return impl.run(q, k, v, layout, **options)


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
    check_dense_implementation(implementation)
    check_kv_lengths(kv_lengths, batch=q.shape[0], length=k.shape[1])
    return dense(q, k, v, scale=scale, kv_lengths=kv_lengths, implementation=implementation)


def check_dense_implementation(name: str | None, argument: str = "implementation") -> str | None:
    """``name`` after checking it is one of :data:`DENSE_IMPLEMENTATIONS` or ``None``.

    Raises:
      ValueError: naming ``argument`` and the names it takes.
    """
    if name is not None and name not in DENSE_IMPLEMENTATIONS:
        raise ValueError(f"{argument} must be one of {DENSE_IMPLEMENTATIONS} or None, got {name!r}")
    return name


def dense(q, k, v, *, scale, kv_lengths, implementation) -> Float[Array, "b l n d"]:
    """:func:`dense_attention` after its checks, same arguments."""
    if implementation is None:
        implementation = "cudnn" if dispatch.on_gpu() and q.dtype.itemsize == 2 else "xla"
    if kv_lengths is not None:
        kv_lengths = jnp.asarray(kv_lengths).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, key_value_seq_lengths=kv_lengths, implementation=implementation
    )
