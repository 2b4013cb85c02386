#!/usr/bin/env bash
# scratch (one call, one GPU): HEAD (base) against three kernel variants (scratch_dev/patch.py):
# v5 = the weighted- kernels at 5 blocks per SM (96 registers, no spills); vg = peers and
# arguments as __grid_constant__ (no local copy); v5g = both. GPU tests of v5g first.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=/tmp/o_ab; rm -rf $O; mkdir -p $O; S0=$(date +%s); ROOT=$PWD; BASE=$ROOT/scratch_dev/base
pack() { tar czf "$OUT/all.tgz" -C $O . ; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > $O/env.txt 2>&1; cat $O/env.txt
for v in 5 g 5g; do
  rm -rf /tmp/v$v; mkdir -p /tmp/v$v && (cd $BASE && tar cf - .) | tar xf - -C /tmp/v$v
  python3 scratch_dev/patch.py $v /tmp/v$v
done
for d in $BASE /tmp/v5 /tmp/vg /tmp/v5g; do
  (cd $d && PYTHONPATH=$d timeout 300 python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > $O/build_$(basename $d).log 2>&1) &
done; wait
echo "built at $(( $(date +%s) - S0 )) s"; tail -n 2 $O/build_*.log
(cd /tmp/v5g && PYTHONPATH=/tmp/v5g timeout 150 python3 -m pytest -q -rf tests/gpu/test_fused_allreduce.py tests/gpu/test_codec_cuda.py 2>&1 | tail -4 | tee $O/gpu_tests_v5g.log)
echo "tests at $(( $(date +%s) - S0 )) s"; pack
i=0
for d in $BASE /tmp/v5 /tmp/vg /tmp/v5g /tmp/v5g /tmp/vg /tmp/v5 $BASE; do
  [ $(( $(date +%s) - S0 )) -lt ${LIMIT:-470} ] || break
  (cd $d && PYTHONPATH=$d MEGATRON_LITE_BLOCKS_PER_SM=6 timeout 60 torchrun --nproc_per_node=1 \
    tools/bench_allreduce.py --host-overhead --min-size 64MB --max-size 64MB \
    --comm int8:128,path=fused --comm hadamard-int8:128,path=fused \
    --comm weighted-int8:128,path=fused --comm weighted-hadamard-int8:128,path=fused \
    --comm int4:128,path=fused --comm hadamard-int4:128,path=fused \
    --comm weighted-hadamard-int4:128,path=fused \
    --comm hadamard-int4:128,algo=one-shot --comm weighted-hadamard-int4:128,algo=one-shot \
    --comm weighted-hadamard-int6-sym:128,algo=one-shot \
    --json $O/run_${i}_$(basename $d).json > $O/run_$i.log 2>&1)
  echo "== run $i, $(basename $d) at $(( $(date +%s) - S0 )) s"
  grep -E "dispatch|error|Error" $O/run_$i.log | sed -E 's/ dispatch.*device / /; s/ rel err.*//'
  i=$((i + 1)); pack
done
echo "done at $(( $(date +%s) - S0 )) s"; pack
