#!/usr/bin/env bash
# (the tree with docs/notebook/logs/2026-12-07-restore-mul-ab.patch applied; one call, one GPU)
# the weighted- restore of the fused kernels as a product by stored reciprocals
# (ML_RESTORE_MUL=1; timing only: its bits differ from today's reference by design), and
# with zero dividends kept out of __fdiv_rn (ML_RESTORE_ZERO=1; the reference's bits),
# against __fdiv_rn (the defines off), at one rank, 4 blocks per SM, builds alternating
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p /tmp/o
S0=$(date +%s)
pack() { tar czf "$OUT/all.tgz" -C /tmp/o . ; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > /tmp/o/env.txt 2>&1; cat /tmp/o/env.txt
for v in "" "ML_RESTORE_MUL=1" "ML_RESTORE_ZERO=1"; do
  MEGATRON_LITE_CUDA_DEFINES="$v" timeout 300 python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > "/tmp/o/build_${v//[^A-Za-z0-9]/_}.log" 2>&1 &
done; wait
echo "built at $(( $(date +%s) - S0 )) s"
i=0
for size in 64MB 16MB; do
  for v in "" "ML_RESTORE_MUL=1" "ML_RESTORE_ZERO=1" "" "ML_RESTORE_MUL=1" "ML_RESTORE_ZERO=1"; do
    MEGATRON_LITE_CUDA_DEFINES="$v" MEGATRON_LITE_BLOCKS_PER_SM=4 timeout 100 torchrun --nproc_per_node=1 \
      tools/bench_allreduce.py --host-overhead --min-size $size --max-size 64MB \
      --comm int8:128,path=fused --comm hadamard-int8:128,path=fused \
      --comm weighted-int8:128,path=fused --comm weighted-hadamard-int8:128,path=fused \
      --comm int4:128,path=fused --comm weighted-hadamard-int4:128,path=fused \
      --comm weighted-hadamard-int4:128,algo=one-shot --comm weighted-hadamard-int6-sym:128,algo=one-shot \
      --json /tmp/o/mul_${i}.json > /tmp/o/mul_$i.log 2>&1
    echo "== $i $size '$v'"; grep -E "dispatch|error" /tmp/o/mul_$i.log | sed -E 's/ +/ /g' | cut -c1-120
    i=$((i + 1)); pack
  done
done
echo "done at $(( $(date +%s) - S0 )) s"
