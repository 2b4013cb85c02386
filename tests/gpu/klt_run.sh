#!/usr/bin/env bash
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())"
mkdir -p $OUT/bench
timeout 200 torchrun --nproc_per_node=2 tools/bench_allreduce.py --min-size 16KB --max-size 64MB \
  --codecs int4:128 --two-step-codecs '' --one-shot-codecs int4:128,klt4:64 \
  --backends nccl,fused,one-shot-q,one-shot-k --iters 20 --channels 2048 \
  --json $OUT/bench/allreduce_w2_klt.json 2>&1 | grep -v "it/s\]" | tee $OUT/bench.log | tail -45
timeout 360 python3 -m pytest -q -rA tests/gpu -p no:cacheprovider 2>&1 | tee $OUT/tests.log | grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|klt4" | tail -60
