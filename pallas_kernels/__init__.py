"""Pallas GPU kernels of dfsattn-jax and their input contract.

- :mod:`pallas_kernels.contract`: the block layout, its rules and the input checks every
  implementation shares;
- :mod:`pallas_kernels.block_sparse_mosaic`: block-sparse attention, Pallas Mosaic GPU (Hopper);
- :mod:`pallas_kernels.block_sparse_triton`: block-sparse attention, Pallas Triton (NVIDIA GPUs);
- :mod:`pallas_kernels.block_scores_triton`: the fused block scorer, Pallas Triton.

Each kernel module has the same surface: ``unsupported(q, block_size)`` (why it cannot take an
input), a checked entry point, its ``*_unchecked`` twin for callers that made the checks, a
``*Tuning`` config and ``interpret: bool = False``. Nothing here imports the rest of the project.
"""

from pallas_kernels.contract import BlockLayout

__all__ = ["BlockLayout"]
