"""The benchmarks: thin drivers over one harness (:mod:`benchmarks.harness`), run from the
repository root as ``python -m benchmarks.<name>``; results under ``benchmarks/results/``.

Nothing in the library (``dfsattn_jax``, ``pallas_kernels``, ``models``) imports this package.
"""
