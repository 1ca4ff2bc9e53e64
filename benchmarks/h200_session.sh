#!/usr/bin/env bash
# The GPU session's measurements, in stages that fit one device call each (see benchmarks/NOTES.md).
#   bash benchmarks/h200_session.sh checks   # compiled kernel tests + implementation choice + e2e per-step (1.3B)
#   bash benchmarks/h200_session.sh kernels  # kernel_bench, Wan-1.3B shapes (D=128 and D=64)
#   bash benchmarks/h200_session.sh big      # kernel_bench, Wan-14B and HunyuanVideo shapes
#   bash benchmarks/h200_session.sh tests    # every compiled kernel test (xdist) + e2e per-step check at 0.2
#   bash benchmarks/h200_session.sh dfs      # kernel_bench 1.3B: DFS and random layouts, every implementation
#   bash benchmarks/h200_session.sh scorer   # compiled scorer-kernel tests + score_bench (1.3B, 14B), ~5 min
# Logs and JSON go to $OUT (default: out/).
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
case "${1:-checks}" in
  checks)
    python3 -c "
import jax, jax.numpy as jnp
from dfsattn_jax.dispatch import resolve, gpu_compute_capability
q = jnp.zeros((1, 32760, 12, 128), jnp.bfloat16)
print('jax', jax.__version__, jax.devices()[0].device_kind, 'cc', gpu_compute_capability())
print('bf16 D=128:', resolve("attention", q))
print('f32 D=128:', resolve("attention", q.astype(jnp.float32)))
print('bf16 D=96:', resolve("attention", jnp.zeros((1, 1000, 2, 96), jnp.bfloat16)))
" 2>&1 | tee "$OUT/impl.txt"
    timeout 150 python3 -m pytest -q tests/kernels/test_block_sparse_mosaic.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_mosaic.txt"
    # The Triton kernel compiled (interpret=False; the interpreter cases ran in CI).
    timeout 200 python3 -m pytest -q tests/kernels/test_block_sparse_triton.py -k compiled -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_triton.txt"
    timeout 270 python3 -m benchmarks.e2e_bench --iters 3 --densities 0.2 --out-dir "$OUT" 2>&1 | tail -30 | tee "$OUT/e2e.txt"
    ;;
  all)  # everything this session measures, in one call of at most ~590 s
    timeout 80 python3 -m pytest -q tests/kernels/test_block_sparse_mosaic.py -p no:cacheprovider 2>&1 | tail -6 | tee "$OUT/pytest_mosaic.txt"
    timeout 120 python3 -m pytest -q tests/kernels/test_block_sparse_triton.py -k compiled -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/pytest_triton.txt"
    timeout 150 python3 -m benchmarks.kernel_bench --shapes 1.3b --densities 1.0,0.5,0.2,0.1,0.05 --repeats 5 \
      --out "$OUT/kernel_1.3b.json" > "$OUT/kernel_1.3b.txt" 2>&1; tail -4 "$OUT/kernel_1.3b.txt"
    timeout 90 python3 -m benchmarks.kernel_bench --shapes 14b,hunyuan --impls triton,mosaic_gpu --big-densities 1.0,0.2 \
      --random-only --repeats 3 --out "$OUT/kernel_big.json" > "$OUT/kernel_big.txt" 2>&1; tail -3 "$OUT/kernel_big.txt"
    timeout 140 python3 -m benchmarks.e2e_bench --iters 3 --densities 0.2 --out-dir "$OUT" > "$OUT/e2e.txt" 2>&1; tail -16 "$OUT/e2e.txt"
    grep -h "TFLOP/s\|FAILED" "$OUT"/kernel_*.txt | tail -40
    ;;
  tests)
    export JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
    python3 -c "
import jax, jax.numpy as jnp
from dfsattn_jax.dispatch import resolve
print('jax', jax.__version__, jax.devices()[0].device_kind)
print('bf16 L=32760 D=128:', resolve("attention", jnp.zeros((1, 32760, 12, 128), jnp.bfloat16)))
" 2>&1 | tee "$OUT/impl.txt"
    timeout 120 python3 -m pytest -q -n 4 tests/kernels/test_block_sparse_mosaic.py -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/pytest_mosaic.txt"
    timeout 240 python3 -m pytest -q -n 8 -k compiled tests/kernels/test_block_sparse_triton.py -p no:cacheprovider 2>&1 | tail -12 | tee "$OUT/pytest_triton.txt"
    unset XLA_PYTHON_CLIENT_PREALLOCATE
    timeout 200 python3 -m benchmarks.e2e_bench --iters 3 --densities 0.2 --out-dir "$OUT" > "$OUT/e2e.txt" 2>&1; tail -22 "$OUT/e2e.txt"
    ;;
  dfs)
    timeout 560 python3 -m benchmarks.kernel_bench --shapes 1.3b --densities 1.0,0.5,0.2,0.1,0.05 --repeats 5 \
      --out "$OUT/kernel_1.3b_dfs.json" > "$OUT/kernel_1.3b_dfs.txt" 2>&1; grep "TFLOP/s\|FAILED" "$OUT/kernel_1.3b_dfs.txt"
    ;;
  kernels)
    timeout 330 python3 -m benchmarks.kernel_bench --shapes 1.3b --out "$OUT/kernel_1.3b.json" 2>&1 | tee "$OUT/kernel_1.3b.txt" | tail -45
    timeout 200 python3 -m benchmarks.kernel_bench --shapes 1.3b-d64 --densities 1.0,0.5,0.2 --random-only \
      --out "$OUT/kernel_d64.json" 2>&1 | tee "$OUT/kernel_d64.txt" | tail -12
    ;;
  scorer)
    export XLA_PYTHON_CLIENT_PREALLOCATE=false
    python3 -c "
import jax, jax.numpy as jnp
from dfsattn_jax.dispatch import resolve
print('jax', jax.__version__, jax.devices()[0].device_kind)
print('scorer, L=32760 D=128:', resolve("scoring", jnp.zeros((1, 32760, 12, 128), jnp.bfloat16)))
" 2>&1 | tee "$OUT/scorer_impl.txt"
    JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -n 4 -k compiled tests/kernels/test_block_scores_triton.py -p no:cacheprovider \
      2>&1 | tail -12 | tee "$OUT/pytest_scorer.txt"
    unset XLA_PYTHON_CLIENT_PREALLOCATE
    timeout 330 python3 -m benchmarks.score_bench --out "$OUT/score.json" > "$OUT/score.txt" 2>&1; tail -32 "$OUT/score.txt"
    ;;
  big)
    timeout 540 python3 -m benchmarks.kernel_bench --shapes 14b,hunyuan --random-only --repeats 5 \
      --out "$OUT/kernel_big.json" 2>&1 | tee "$OUT/kernel_big.txt" | tail -30
    ;;
esac
