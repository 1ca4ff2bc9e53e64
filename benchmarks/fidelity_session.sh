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
#   bash benchmarks/fidelity_session.sh v2c         # v2 quality: window, random, oracle, refresh
#   bash benchmarks/fidelity_session.sh choose      # schedule search on v2, choose set
#   bash benchmarks/fidelity_session.sh report      # schedule search on v2, report set
#   bash benchmarks/fidelity_session.sh timing      # the chosen preset as whole 50-step runs on Wan2.1-1.3B
#   bash benchmarks/fidelity_session.sh pair A B    # stages A and B at once, one per GPU (nvidia-h200-x2);
#                                                   # A or B may be a list run in order: report+timing
#
# `pair` doubles the work per device-minute (a machine's held time counts, not its GPU count). The
# two stages must write different files (two quality stages of one model share a results file,
# so pair a v2 quality stage with v1, choose, report or timing). Each stage's $OUT comes back as
# one archive, $OUT/gpu0.tar.gz and $OUT/gpu1.tar.gz (the device returns at most 8 files): unpack
# with `tar -xzf`.
set -uo pipefail
export PYTHONUNBUFFERED=1  # benches run as modules from the repository root: python3 -m benchmarks.<name>
OUT=${OUT:-out}
mkdir -p "$OUT" benchmarks/results
RES=benchmarks/results
SLUG=nvidia_h200

quality() {  # quality <model> <variants> <seconds>
  timeout "$3" python3 -m benchmarks.quality_bench --model "$1" --variants "$2" --max-s $(( $3 - 70 )) \
    --out-dir "$RES" > "$OUT/quality_$1.log" 2>&1
  echo "quality_bench $1 exit $?"; grep "^\[quality\] \(compiled\|done\|claim\)" "$OUT/quality_$1.log" | tail -12
  cp "$RES"/quality_*"$1"_"$SLUG"* "$OUT"/ 2>/dev/null
  sed -n '/^variant /,$p' "$OUT/quality_$1.log" | head -50
}

case "${1:-}" in
  train)
    # Resumes from out/train_v2 (a warm machine) or carry/train_v2 (the compact checkpoint of the
    # last call, copied back from $OUT/ckpt); the compact checkpoint goes to $OUT/ckpt.
    timeout 590 python3 -m benchmarks.train_small --model v2 --out out/train_v2 --time-limit 420 \
      --carry-in carry/train_v2 --carry-out "$OUT/ckpt" --results "$OUT/results" \
      --export "$OUT/weights/small_video_dit_v2.safetensors" > out_train.log 2>&1
    echo "train_small exit $?"; grep -v "^step .*held-out\|^step [0-9]*: loss" out_train.log | tail -25
    grep "held-out" out_train.log | tail -4
    ls -la "$OUT"/ckpt "$OUT"/weights 2>/dev/null
    ;;
  v1)
    # The learning measures merge into benchmarks/results/learning_*.json (v2's entry stays).
    timeout 150 python3 -m benchmarks.learning_bench --models v1 --out-dir "$RES" > "$OUT/learning_v1.log" 2>&1
    echo "learning_bench exit $?"; tail -4 "$OUT/learning_v1.log"; cp "$RES"/learning_*"$SLUG"* "$OUT"/ 2>/dev/null
    quality v1 "group:order,group:tile,group:window,group:random,group:oracle,group:refresh" 420
    ;;
  v2a) quality v2 "raster/*,hilbert2d/*,block3d/*" 570 ;;
  v2b) quality v2 "morton3d/*,hilbert3d/d=*,hilbert3d/default,group:tile" 570 ;;
  v2c) quality v2 "group:window,group:random,group:oracle,group:refresh" 570 ;;
  choose|report)
    # SEARCH_MAX_S: stop starting evaluations after this many seconds (smaller when another stage follows).
    timeout $(( ${SEARCH_MAX_S:-520} + 70 )) python3 -m benchmarks.schedule_search --model v2 --stage "$1" \
      --max-s "${SEARCH_MAX_S:-520}" --out-dir "$RES" \
      > "$OUT/search_$1.log" 2>&1
    echo "schedule_search exit $?"; cp "$RES"/schedule_search_v2_"$SLUG".* "$OUT"/ 2>/dev/null
    grep "^\[search\]" "$OUT/search_$1.log" | tail -30; grep -A6 "Winner\|report set:" "$OUT/search_$1.log" | tail -12
    ;;
  timing)
    timeout 560 python3 -m benchmarks.e2e_bench --measure-full --schedule fast --iters 3 --out-dir "$OUT" \
      > "$OUT/e2e_fast.log" 2>&1
    echo "e2e_bench exit $?"; tail -24 "$OUT/e2e_fast.log"
    ;;
  pair)
    if [ $# -ne 3 ] || [ "$2" = pair ] || [ "$3" = pair ]; then
      echo "usage: $0 pair STAGE_GPU0 STAGE_GPU1" >&2; exit 2
    fi
    pids=()
    for gpu in 0 1; do
      stages=$([ $gpu = 0 ] && echo "$2" || echo "$3")
      mkdir -p "$OUT/gpu$gpu"
      (
        for stage in ${stages//+/ }; do
          CUDA_VISIBLE_DEVICES=$gpu OUT="$OUT/gpu$gpu" bash "$0" "$stage" || echo "stage $stage exit $?"
        done
      ) > "$OUT/gpu$gpu/session.log" 2>&1 &
      pids+=($!)
    done
    for gpu in 0 1; do wait "${pids[$gpu]}"; echo "gpu$gpu exit $?" >> "$OUT/gpu$gpu/session.log"; done
    for gpu in 0 1; do
      echo "===== gpu$gpu: $([ $gpu = 0 ] && echo "$2" || echo "$3")"; tail -40 "$OUT/gpu$gpu/session.log"
      tar -czf "$OUT/gpu$gpu.tar.gz" -C "$OUT" "gpu$gpu" && rm -rf "${OUT:?}/gpu$gpu"
    done
    ;;
  *) echo "usage: $0 train|v1|v2a|v2b|v2c|choose|report|timing|pair A B" >&2; exit 2 ;;
esac
