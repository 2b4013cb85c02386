#!/usr/bin/env bash
# One call, one GPU, whatever card comes; logs archived into $OUT/all.tgz after each step.
# 1. The committed tree (cur) and a copy with the fused kernels' restore as before its
#    prefetch (base: logs/2026-12-07-spill-rows-base.patch, i.e. kernels/csrc at 4d3c026^),
#    built in parallel.
# 2. The GPU tests of cur: tests/gpu/test_fused_allreduce.py and test_codec_cuda.py (the
#    prefetching restore, the one-rank one-shot section, the grid-cap lookup test).
# 3. Alternating timing runs, base and cur, of the rows ptxas says spill more in cur
#    (weighted-int4, the int6-sym one-shot kernels without the error part) and of G = 64
#    weighted- rows; one rank, 64 MB, 6 blocks per SM, CUDA-graph medians.
#   BUDGET=585 bash docs/notebook/logs/2026-12-07-one-gpu-call-3.sh   (repository root)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=/tmp/o3; rm -rf $O; mkdir -p $O; S0=$(date +%s)
pack() { tar czf "$OUT/all.tgz" -C $O . ; }
left() { echo $(( ${BUDGET:-585} - ($(date +%s) - S0) )); }
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > $O/env.txt 2>&1; cat $O/env.txt
for v in base cur; do
  rm -rf /tmp/$v; mkdir -p /tmp/$v
  tar cf - kernels megatron_lite tools tests pyproject.toml | tar xf - -C /tmp/$v
done
(cd /tmp/base && patch -p1 < $OLDPWD/docs/notebook/logs/2026-12-07-spill-rows-base.patch > $O/patch.log 2>&1) \
  || { echo "patch failed"; cat $O/patch.log; }
for d in /tmp/base /tmp/cur; do
  (cd $d && PYTHONPATH=$d timeout 300 python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > $O/build_$(basename $d).log 2>&1) &
done; wait
echo "built at $(( $(date +%s) - S0 )) s"; tail -2 $O/build_*.log
(cd /tmp/cur && PYTHONPATH=/tmp/cur timeout $(( $(left) - 60 )) python3 -m pytest -q -rf \
  tests/gpu/test_fused_allreduce.py tests/gpu/test_codec_cuda.py 2>&1 | tail -25 | tee $O/gpu_tests_cur.log)
echo "== tests at $(( $(date +%s) - S0 )) s"; pack
i=0
for d in /tmp/base /tmp/cur /tmp/cur /tmp/base /tmp/base /tmp/cur; do
  [ $(left) -gt 30 ] || break
  (cd $d && PYTHONPATH=$d MEGATRON_LITE_BLOCKS_PER_SM=6 timeout $(( $(left) - 5 )) torchrun --nproc_per_node=1 \
    tools/bench_allreduce.py --host-overhead --min-size 64MB --max-size 64MB \
    --comm int4:128,path=fused --comm weighted-int4:128,path=fused \
    --comm weighted-hadamard-int4:64,path=fused --comm hadamard-int6-sym:128,algo=one-shot \
    --comm weighted-hadamard-int6-sym:128,algo=one-shot \
    --comm weighted-hadamard-int5:64,algo=one-shot \
    --json $O/run_${i}_$(basename $d).json > $O/run_$i.log 2>&1)
  echo "== run $i, $(basename $d) at $(( $(date +%s) - S0 )) s"
  grep -E "dispatch|error|Error" $O/run_$i.log | sed -E 's/ dispatch.*device / /; s/ rel err.*//'
  i=$((i + 1)); pack
done
echo "done at $(( $(date +%s) - S0 )) s"; pack
