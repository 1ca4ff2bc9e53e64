#!/usr/bin/env bash
# The GPU session's measurements, in stages that fit one device call each (see benchmarks/NOTES.md).
#   bash benchmarks/h200_session.sh checks   # compiled kernel tests + implementation choice + e2e per-step (1.3B)
#   bash benchmarks/h200_session.sh kernels  # kernel_bench, Wan-1.3B shapes (D=128 and D=64)
#   bash benchmarks/h200_session.sh big      # kernel_bench, Wan-14B and HunyuanVideo shapes
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
from dfsattn_jax.attention import resolve_implementation, gpu_compute_capability
q = jnp.zeros((1, 32760, 12, 128), jnp.bfloat16)
print('jax', jax.__version__, jax.devices()[0].device_kind, 'cc', gpu_compute_capability())
print('bf16 D=128:', resolve_implementation(q))
print('f32 D=128:', resolve_implementation(q.astype(jnp.float32)))
print('bf16 D=96:', resolve_implementation(jnp.zeros((1, 1000, 2, 96), jnp.bfloat16)))
" 2>&1 | tee "$OUT/impl.txt"
    timeout 150 python3 -m pytest -q tests/test_block_sparse_mosaic.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_mosaic.txt"
    # The Triton kernel compiled (interpret=False; the interpreter cases ran in CI).
    timeout 200 python3 -m pytest -q tests/test_block_sparse_kernel.py -k "not True" -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_triton.txt"
    timeout 270 python3 benchmarks/e2e_bench.py --iters 3 --densities 0.2 --out-dir "$OUT" 2>&1 | tail -30 | tee "$OUT/e2e.txt"
    ;;
  all)  # everything this session measures, in one call of at most ~590 s
    timeout 80 python3 -m pytest -q tests/test_block_sparse_mosaic.py -p no:cacheprovider 2>&1 | tail -6 | tee "$OUT/pytest_mosaic.txt"
    timeout 120 python3 -m pytest -q tests/test_block_sparse_kernel.py -k "not True" -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/pytest_triton.txt"
    timeout 150 python3 benchmarks/kernel_bench.py --shapes 1.3b --densities 1.0,0.5,0.2,0.1,0.05 --repeats 5 \
      --out "$OUT/kernel_1.3b.json" > "$OUT/kernel_1.3b.txt" 2>&1; tail -4 "$OUT/kernel_1.3b.txt"
    timeout 90 python3 benchmarks/kernel_bench.py --shapes 14b,hunyuan --impls triton,mosaic_gpu --big-densities 1.0,0.2 \
      --random-only --repeats 3 --out "$OUT/kernel_big.json" > "$OUT/kernel_big.txt" 2>&1; tail -3 "$OUT/kernel_big.txt"
    timeout 140 python3 benchmarks/e2e_bench.py --iters 3 --densities 0.2 --out-dir "$OUT" > "$OUT/e2e.txt" 2>&1; tail -16 "$OUT/e2e.txt"
    grep -h "TFLOP/s\|FAILED" "$OUT"/kernel_*.txt | tail -40
    ;;
  kernels)
    timeout 330 python3 benchmarks/kernel_bench.py --shapes 1.3b --out "$OUT/kernel_1.3b.json" 2>&1 | tee "$OUT/kernel_1.3b.txt" | tail -45
    timeout 200 python3 benchmarks/kernel_bench.py --shapes 1.3b-d64 --densities 1.0,0.5,0.2 --random-only \
      --out "$OUT/kernel_d64.json" 2>&1 | tee "$OUT/kernel_d64.txt" | tail -12
    ;;
  big)
    timeout 540 python3 benchmarks/kernel_bench.py --shapes 14b,hunyuan --random-only --repeats 5 \
      --out "$OUT/kernel_big.json" 2>&1 | tee "$OUT/kernel_big.txt" | tail -30
    ;;
esac
