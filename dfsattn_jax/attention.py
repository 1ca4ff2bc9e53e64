"""Attention entry points: dense and block-sparse, picking the right implementation.

``block_sparse_attention`` runs the Pallas kernel on GPU and the XLA reference elsewhere (or
as asked); ``dense_attention`` runs cuDNN flash attention on GPU and XLA elsewhere. Both take
and return ``[B, L, N, D]``, the layout of ``jax.nn.dot_product_attention``.
"""

from __future__ import annotations

from typing import Literal

import jax
from jaxtyping import Array, Float

from dfsattn_jax.layout import BlockLayout

__all__ = ["block_sparse_attention", "dense_attention", "on_gpu"]

SparseImpl = Literal["pallas", "pallas_interpret", "reference"]
DenseImpl = Literal["cudnn", "xla"]


def on_gpu() -> bool:
    """Whether JAX's default backend is a GPU."""
    return jax.default_backend() == "gpu"


def block_sparse_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    layout: BlockLayout,
    *,
    block_size: int = 128,
    scale: float | None = None,
    implementation: SparseImpl | None = None,
) -> Float[Array, "b l n d"]:
    """Attention over the key blocks of ``layout`` (SPEC §5).

    Args:
      q, k, v: ``[B, L, N, D]``.
      layout: which key blocks each (batch, head, query block) visits.
      block_size: tokens per layout block.
      scale: logit scale, default ``1/sqrt(D)``.
      implementation: ``"pallas"`` (the GPU kernel), ``"pallas_interpret"`` (the same kernel
        in the Pallas interpreter, slow, for tests), ``"reference"`` (dense XLA attention
        with the layout expanded to a token mask) or ``None``: the kernel on GPU, the
        reference elsewhere.

    Returns:
      ``[B, L, N, D]`` in the input dtype.
    """
    if implementation is None:
        implementation = "pallas" if on_gpu() else "reference"
    if implementation in ("pallas", "pallas_interpret"):
        from pallas_kernels.block_sparse_attention import block_sparse_attention as kernel

        return kernel(
            q, k, v, layout, block_size=block_size, scale=scale,
            interpret=implementation == "pallas_interpret",
        )
    if implementation == "reference":
        from dfsattn_jax.reference import reference_block_sparse_attention

        return reference_block_sparse_attention(q, k, v, layout, block_size=block_size, scale=scale)
    raise ValueError(
        f"implementation must be one of 'pallas', 'pallas_interpret', 'reference' or None, got {implementation!r}"
    )


def dense_attention(
    q: Float[Array, "b l n d"],
    k: Float[Array, "b l n d"],
    v: Float[Array, "b l n d"],
    *,
    scale: float | None = None,
    implementation: DenseImpl | None = None,
) -> Float[Array, "b l n d"]:
    """Dense softmax attention; ``implementation=None`` uses cuDNN on GPU (16-bit inputs), XLA elsewhere.

    ``k``/``v`` may have another length than ``q`` (cross-attention).
    """
    if implementation is None:
        implementation = "cudnn" if on_gpu() and q.dtype.itemsize == 2 else "xla"
    if implementation not in ("cudnn", "xla"):
        raise ValueError(f"implementation must be 'cudnn', 'xla' or None, got {implementation!r}")
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
