#!/usr/bin/env bash
# scratch (one call, one GPU): the working tree (6 blocks per SM, loads before the scaling,
# Unscale saturating) against HEAD~ 8cfcdac (scratch_dev/base, 4 blocks) and against
# 8cfcdac with only the 6 blocks (v6); GPU tests of the working tree at one rank first.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p /tmp/o; S0=$(date +%s); ROOT=$PWD; BASE=$ROOT/scratch_dev/base
pack() { tar czf "$OUT/all.tgz" -C /tmp/o . ; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > /tmp/o/env.txt 2>&1; cat /tmp/o/env.txt
mkdir -p /tmp/v6 && (cd $BASE && tar cf - .) | tar xf - -C /tmp/v6
sed -i "s/^MAX_BLOCKS = 512 /MAX_BLOCKS = 1024/" /tmp/v6/megatron_lite/kernels/workspace.py
sed -i "s/__launch_bounds__(kMaxTwoShotThreads, 4)/__launch_bounds__(kMaxTwoShotThreads, 6)/" \
  /tmp/v6/kernels/csrc/two_shot.cu /tmp/v6/kernels/csrc/one_shot_q.cu
grep -c "MAX_BLOCKS = 1024" /tmp/v6/megatron_lite/kernels/workspace.py; grep -c "Threads, 6)" /tmp/v6/kernels/csrc/two_shot.cu
for d in $BASE $ROOT /tmp/v6; do
  (cd $d && PYTHONPATH=$d timeout 300 python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > /tmp/o/build_$(basename $d).log 2>&1) &
done; wait
echo "built at $(( $(date +%s) - S0 )) s"
PYTHONPATH=$ROOT timeout 150 python3 -m pytest -q -rf tests/gpu/test_fused_allreduce.py tests/gpu/test_codec_cuda.py 2>&1 | tail -8 | tee /tmp/o/gpu_tests.log
echo "tests at $(( $(date +%s) - S0 )) s"; pack
i=0
for v in "$BASE:4" "/tmp/v6:6" "$ROOT:6" "$ROOT:4" "$BASE:4" "/tmp/v6:6" "$ROOT:6" "$ROOT:4"; do
  d=${v%:*}; b=${v#*:}
  [ $(( $(date +%s) - S0 )) -lt ${LIMIT:-420} ] || break
  (cd $d && PYTHONPATH=$d MEGATRON_LITE_BLOCKS_PER_SM=$b timeout 60 torchrun --nproc_per_node=1 \
    tools/bench_allreduce.py --host-overhead --min-size 64MB --max-size 64MB \
    --comm int8:128,path=fused --comm hadamard-int8:128,path=fused \
    --comm weighted-int8:128,path=fused --comm weighted-hadamard-int8:128,path=fused \
    --comm int4:128,path=fused --comm hadamard-int4:128,path=fused \
    --comm weighted-hadamard-int4:128,path=fused \
    --comm hadamard-int4:128,algo=one-shot --comm weighted-hadamard-int4:128,algo=one-shot \
    --comm weighted-hadamard-int6-sym:128,algo=one-shot \
    --json /tmp/o/fin_${i}.json > /tmp/o/fin_$i.log 2>&1)
  echo "== $i ${d#$ROOT/} bpsm=$b at $(( $(date +%s) - S0 )) s"
  grep -E "dispatch|error|Error" /tmp/o/fin_$i.log | sed -E 's/ dispatch.*device / /; s/ rel err.*//'
  i=$((i + 1)); pack
done
echo "done at $(( $(date +%s) - S0 )) s"; pack
