#!/usr/bin/env bash
# One call, one GPU. On an H200: the committed CUDA kernels built, their GPU tests
# (tests/gpu/test_fused_allreduce.py, test_codec_cuda.py), then the codec kernel table
# (tools/bench_codec_kernels.py, the JSON of docs/results/codec_kernels_h200.json). On any
# other card: logs/2026-12-07-one-gpu-call-5.sh (the same tests, then the restore A/B).
# Logs and JSON archived into $OUT/all.tgz as each step ends.
#   BUDGET=570 bash docs/notebook/logs/2026-12-07-one-gpu-call-6.sh   (repository root)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "GPU: $GPU"
case "$GPU" in *H200*) ;; *) exec bash docs/notebook/logs/2026-12-07-one-gpu-call-5.sh;; esac
S0=$(date +%s); W=/tmp/w6; rm -rf $W; mkdir -p $W
pack() { tar czf "$OUT/all.tgz" -C $W . ; }
left() { echo $(( ${BUDGET:-570} - ($(date +%s) - S0) )); }
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > $W/env.txt 2>&1
timeout 330 python3 -c "
import time; t = time.time()
from megatron_lite.kernels import codec_cuda
codec_cuda.build(); print(f'CUDA codec kernels built in {time.time() - t:.0f} s')" > $W/build.log 2>&1
tail -2 $W/build.log; echo "== built at $(( $(date +%s) - S0 )) s"; pack
timeout 170 python3 -m pytest -q -rf tests/gpu/test_fused_allreduce.py tests/gpu/test_codec_cuda.py \
  2>&1 | tail -25 | tee $W/gpu_tests.log
echo "== tests at $(( $(date +%s) - S0 )) s"; pack
timeout $(( $(left) - 5 )) python3 tools/bench_codec_kernels.py --json $W/codec_kernels.json \
  > $W/codec_bench.log 2>&1; echo "bench rc=$?"
grep -v "it/s" $W/codec_bench.log | grep -A 40 "^64 MB" | head -40
echo "done at $(( $(date +%s) - S0 )) s"; pack
