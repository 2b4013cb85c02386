#!/usr/bin/env bash
# One call, one GPU. On an H200: the decode and prefill stages of tests/gpu/device_run.sh
# (gemv1, prefill1: run on H100s only so far), then, if time is left, the committed CUDA
# kernels built and their GPU tests. On any other card: logs/2026-12-07-one-gpu-call-5.sh
# (the GPU tests, then the restore A/B). Logs and JSON archived into $OUT/all.tgz.
#   BUDGET=570 bash docs/notebook/logs/2026-12-07-one-gpu-call-6.sh   (repository root)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) ;; *) exec bash docs/notebook/logs/2026-12-07-one-gpu-call-5.sh;; esac
S0=$(date +%s); W=/tmp/w6; rm -rf $W; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . ; }
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - S0) )); }
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > $W/env.txt 2>&1
for st in gemv1 prefill1; do
  [ $(left) -gt 60 ] || break
  OUT=$W STAGES=$st timeout $(left) bash tests/gpu/device_run.sh > $W/stage_$st.log 2>&1
  tail -30 $W/stage_$st.log; echo "== $st done at $(( $(date +%s) - S0 )) s"; pack
done
if [ $(left) -gt 250 ]; then
  timeout $(( $(left) - 60 )) python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > $W/build.log 2>&1
  echo "== built at $(( $(date +%s) - S0 )) s"
  timeout $(( $(left) - 5 )) python3 -m pytest -q -rf tests/gpu/test_fused_allreduce.py \
    tests/gpu/test_codec_cuda.py 2>&1 | tail -25 | tee $W/gpu_tests.log
fi
echo "done at $(( $(date +%s) - S0 )) s"; pack
