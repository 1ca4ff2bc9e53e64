#!/usr/bin/env bash
# Wan2.1-14B over two H200s (device kind nvidia-h200-x2): benchmarks/NOTES.md, "Several GPUs".
# Two calls of at most ~6.5 minutes each (a stage killed at its timeout keeps what it measured:
# the JSON is rewritten after every measurement):
#   bash benchmarks/multi_gpu_session.sh one   # GPU check (sharded == single, 4-layer 1.3B) + 14B on 1 GPU
#   bash benchmarks/multi_gpu_session.sh two   # 14B on 2 GPUs: guidance, then heads; table of this call
#   bash benchmarks/multi_gpu_session.sh diag  # where a sharded run goes wrong (~5-7 min; DIAG_ARGS narrow it)
#   bash benchmarks/multi_gpu_session.sh a2a   # the heads mode's all-to-alls alone at one 14B layer (~30 s)
# then, from the repository root: python -m benchmarks.multi_gpu_bench --table <call 1>/multi_1.json <call 2>/multi_2*.json
# (or copy call 1's multi_1.json into the tree and give it as BASELINE=path to call 2: scaling and
# the table then come in call 2's output already).
# JSON, logs and the table go to $OUT (default: out/).
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m 2>&1 | head -6 | tee -a "$OUT/gpu.txt"
bench() {  # bench NAME TIMEOUT ARGS...: one variant per process (its own memory peaks)
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 -m benchmarks.multi_gpu_bench "$@" ${BASELINE:+--baseline "$BASELINE"} --out "$OUT/multi_$name.json" > "$OUT/multi_$name.txt" 2>&1
  echo "--- $name (exit $?)"; grep -E "^\[|tokens|weights|Error|error" "$OUT/multi_$name.txt" | tail -12
}
case "${1:-one}" in
  one)
    timeout 120 python3 -m benchmarks.multi_gpu_check --dtypes bfloat16 --out "$OUT/multi_check.json" 2>&1 \
      | grep -v "sampling (" | tail -8 | tee "$OUT/multi_check.txt"
    bench 1 270 --devices 1
    ;;
  two)
    bench 2g 200 --devices 2 --mode guidance
    bench 2h 200 --devices 2 --mode heads
    python3 -m benchmarks.multi_gpu_bench --table ${BASELINE:-} "$OUT"/multi_[12]*.json 2>/dev/null | tee "$OUT/multi_table.md"
    ;;
  diag)
    timeout 480 python3 -m benchmarks.multi_gpu_diag ${DIAG_ARGS:-} --out "$OUT/multi_diag.json" > "$OUT/multi_diag.txt" 2>&1
    echo "--- diag (exit $?)"; grep -vE "^\[" "$OUT/multi_diag.txt" | tail -60
    ;;
  a2a)
    timeout 200 python3 -m benchmarks.all_to_all_bench --devices "${DEVICES:-2}" --out "$OUT/all_to_all.json" 2>&1 | tail -12
    ;;
  check)
    timeout 200 python3 -m benchmarks.multi_gpu_check --out "$OUT/multi_check.json" 2>&1 | grep -v "sampling ("
    ;;
esac
