#!/usr/bin/env bash
# One call, one GPU, whatever card comes; logs archived into $OUT/all.tgz as each stage
# ends. Always: the CUDA kernels built, then tests/gpu/test_fused_allreduce.py (its
# one-rank one-shot section is new). On an H200: the decode and prefill stages of
# tests/gpu/device_run.sh (gemv1, prefill1) first, which have run only on H100s so far.
# On another card: the restore-prefetch A/B instead (logs/2026-12-07-restore-prefetch-ab.sh).
#   bash docs/notebook/logs/2026-12-07-one-gpu-call-2.sh   (repository root)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
S0=$(date +%s); W=/tmp/w2; rm -rf $W; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . ; }
left() { echo $(( ${BUDGET:-585} - ($(date +%s) - S0) )); }
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > $W/env.txt 2>&1
case "$GPU" in *H200*) STAGES="gemv1 prefill1";; *) STAGES="";; esac
for st in $STAGES; do
  OUT=$W STAGES=$st timeout $(left) bash tests/gpu/device_run.sh > $W/stage_$st.log 2>&1
  tail -30 $W/stage_$st.log; echo "== $st done at $(( $(date +%s) - S0 )) s"; pack
done
if [ -z "$STAGES" ]; then   # not an H200: the restore-prefetch A/B, GPU tests first
  LIMIT=$(( ${BUDGET:-585} - 130 )) TOTAL=${BUDGET:-585} exec bash docs/notebook/logs/2026-12-07-restore-prefetch-ab.sh
fi
if [ $(left) -gt 200 ]; then
  timeout $(left) python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > $W/build.log 2>&1
  echo "== built at $(( $(date +%s) - S0 )) s"
  timeout $(left) python3 -m pytest -q -rf tests/gpu/test_fused_allreduce.py 2>&1 | tail -15 \
    | tee $W/gpu_tests.log
  echo "== tests at $(( $(date +%s) - S0 )) s"; pack
fi
echo "done at $(( $(date +%s) - S0 )) s"; pack
