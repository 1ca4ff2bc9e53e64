"""Pallas GPU kernels of dfsattn-jax."""

from pallas_kernels.block_sparse_triton import BlockSizes, block_sparse_attention

__all__ = ["BlockSizes", "block_sparse_attention"]
