#!/usr/bin/env bash
# Fidelity v2 (issue 14) on the GPU, in stages that fit one device call each (benchmarks/NOTES.md,
# "Fidelity v2 runbook"). Every stage is wrapped in `timeout`, writes JSON (and pictures) under
# $OUT and prints a short table last. Results that a later call extends (quality, search) are
# written to benchmarks/results first and copied to $OUT: copy them back into the repository
# before the next call of the same stage family.
#
#   bash benchmarks/fidelity_session.sh train       # v2 training, resumable; repeat until "complete": true
#   bash benchmarks/fidelity_session.sh v1          # v1: learning measures + quality benchmark (16 samples)
#   bash benchmarks/fidelity_session.sh v2a         # v2 quality: orders raster, hilbert2d, block3d
#   bash benchmarks/fidelity_session.sh v2b         # v2 quality: orders morton3d, hilbert3d + tile sizes
#   bash benchmarks/fidelity_session.sh v2c         # v2 quality: window, random, refresh + learning measures
#   bash benchmarks/fidelity_session.sh choose      # schedule search on v2, choose set
#   bash benchmarks/fidelity_session.sh report      # schedule search on v2, report set
#   bash benchmarks/fidelity_session.sh timing      # the chosen preset as whole 50-step runs on Wan2.1-1.3B
set -uo pipefail
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT" benchmarks/results
RES=benchmarks/results
SLUG=nvidia_h200

quality() {  # quality <model> <variants> <seconds>
  timeout "$3" python3 benchmarks/quality_bench.py --model "$1" --variants "$2" --max-s $(( $3 - 70 )) \
    --out-dir "$RES" > "$OUT/quality_$1.log" 2>&1
  echo "quality_bench $1 exit $?"; grep "^\[quality\] \(compiled\|done\|claim\)" "$OUT/quality_$1.log" | tail -12
  cp "$RES"/quality_*"$1"_"$SLUG"* "$OUT"/ 2>/dev/null
  sed -n '/^variant /,$p' "$OUT/quality_$1.log" | head -50
}

case "${1:-}" in
  train)
    # Resumes from out/train_v2 (a warm machine) or carry/train_v2 (the compact checkpoint of the
    # last call, copied back from $OUT/ckpt); the compact checkpoint goes to $OUT/ckpt.
    timeout 590 python3 benchmarks/train_small.py --model v2 --out out/train_v2 --time-limit 420 \
      --carry-in carry/train_v2 --carry-out "$OUT/ckpt" --results "$OUT/results" \
      --export "$OUT/weights/small_video_dit_v2.safetensors" > out_train.log 2>&1
    echo "train_small exit $?"; grep -v "^step .*held-out\|^step [0-9]*: loss" out_train.log | tail -25
    grep "held-out" out_train.log | tail -4
    ls -la "$OUT"/ckpt "$OUT"/weights 2>/dev/null
    ;;
  v1)
    timeout 150 python3 benchmarks/learning_bench.py --models v1 --out-dir "$OUT" > "$OUT/learning_v1.log" 2>&1
    echo "learning_bench exit $?"; tail -4 "$OUT/learning_v1.log"
    quality v1 "group:order,group:tile,group:window,group:random,group:refresh" 420
    ;;
  v2a) quality v2 "raster/*,hilbert2d/*,block3d/*" 570 ;;
  v2b) quality v2 "morton3d/*,hilbert3d/d=*,hilbert3d/default,group:tile" 570 ;;
  v2c)
    quality v2 "group:window,group:random,group:refresh" 420
    timeout 150 python3 benchmarks/learning_bench.py --models v2 --out-dir "$OUT" > "$OUT/learning_v2.log" 2>&1
    echo "learning_bench exit $?"; tail -4 "$OUT/learning_v2.log"
    ;;
  choose|report)
    timeout 590 python3 benchmarks/schedule_search.py --model v2 --stage "$1" --max-s 520 --out-dir "$RES" \
      > "$OUT/search_$1.log" 2>&1
    echo "schedule_search exit $?"; cp "$RES"/schedule_search_v2_"$SLUG".* "$OUT"/ 2>/dev/null
    grep "^\[search\]" "$OUT/search_$1.log" | tail -30; grep -A3 "Winner\|report set:" "$OUT/search_$1.log" | tail -8
    ;;
  timing)
    timeout 560 python3 benchmarks/e2e_bench.py --measure-full --schedule fast --iters 3 --out-dir "$OUT" \
      > "$OUT/e2e_fast.log" 2>&1
    echo "e2e_bench exit $?"; tail -24 "$OUT/e2e_fast.log"
    ;;
  *) echo "usage: $0 train|v1|v2a|v2b|v2c|choose|report|timing" >&2; exit 2 ;;
esac
