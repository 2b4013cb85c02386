#!/usr/bin/env bash
# One call, one GPU, whatever card comes. On an H200: the decode and prefill stages of
# tests/gpu/device_run.sh (gemv1, prefill1), which have run only on H100s so far. On any
# other card: the restore-channel A/B (logs/2026-12-07-restore-channel-ab.sh; relative, so
# any card will do). Every stage's logs and JSON are archived into $OUT/all.tgz as it ends.
#   bash docs/notebook/logs/2026-12-07-one-gpu-call.sh [h200|ab]   (repository root)
export PYTHONUNBUFFERED=1
S0=$(date +%s); W=/tmp/w; rm -rf $W; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . ; }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > $W/env.txt 2>&1
MODE=${1:-auto}
[ "$MODE" = auto ] && { case "$GPU" in *H200*) MODE=h200;; *) MODE=ab;; esac; }
echo "mode $MODE"
if [ "$MODE" = h200 ]; then
  for st in gemv1 prefill1; do
    OUT=$W STAGES=$st timeout $(( 585 - ($(date +%s) - S0) )) bash tests/gpu/device_run.sh \
      > $W/stage_$st.log 2>&1
    tail -30 $W/stage_$st.log; echo "== $st done at $(( $(date +%s) - S0 )) s"; pack
  done
else
  # archives its own directory into $OUT/all.tgz
  LIMIT=${LIMIT:-420} exec bash docs/notebook/logs/2026-12-07-restore-channel-ab.sh
fi
echo "done at $(( $(date +%s) - S0 )) s"; pack
