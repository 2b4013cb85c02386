#!/usr/bin/env bash
# One call, one GPU, whatever card comes; logs archived into $OUT/all.tgz after each step.
# 1. Three copies of the tree, built in parallel (MEGATRON_LITE_CUDA_DEFINES names each
#    build), all with logs/2026-12-07-weighted-cost-ab.patch (A/B only: ML_AB_UNIT_SCALES
#    makes the benchmark's synthetic channel scales 1.0; define ML_AB_NOSCALE1 drops the
#    fused kernels' first-stage scaling, exact for unit scales only):
#      div       the committed tree (the reference restores by division; the kernels by the
#                reciprocals, with the tie test that keeps the quotient's bits);
#      prod      with logs/2026-12-07-restore-product.patch: the reference and the kernels
#                restore by one product, fl32(1/s), no tie test;
#      noscale1  prod without the first stage's scaling: what folding power-of-two scales
#                into the row-parallel weights would leave (one exact product in the restore).
# 2. The GPU tests of div: tests/gpu/test_fused_allreduce.py and test_codec_cuda.py.
# 3. Alternating timing runs on unit scales (every build then gives the reference's bits
#    and passes the benchmark's check), div prod noscale1 noscale1 prod div, then div on the
#    usual log-uniform scales: one rank, 64 MB, 6 blocks per SM, CUDA-graph medians.
#   BUDGET=570 bash docs/notebook/logs/2026-12-07-one-gpu-call-5.sh   (repository root)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=/tmp/o5; rm -rf $O; mkdir -p $O; S0=$(date +%s); L=$PWD/docs/notebook/logs
pack() { tar czf "$OUT/all.tgz" -C $O . ; }
left() { echo $(( ${BUDGET:-580} - ($(date +%s) - S0) )); }
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > $O/env.txt 2>&1; cat $O/env.txt
for v in div prod noscale1; do
  rm -rf /tmp/$v; mkdir -p /tmp/$v
  tar cf - kernels megatron_lite tools tests pyproject.toml | tar xf - -C /tmp/$v
  (cd /tmp/$v && patch -p1 < $L/2026-12-07-weighted-cost-ab.patch > $O/patch_$v.log 2>&1) || { echo "patch failed"; cat $O/patch_$v.log; }
done
for v in prod noscale1; do
  (cd /tmp/$v && patch -p1 < $L/2026-12-07-restore-product.patch >> $O/patch_$v.log 2>&1) \
    || { echo "product patch failed"; cat $O/patch_$v.log; }
done
declare -A DEF=([div]="" [prod]="" [noscale1]="ML_AB_NOSCALE1")
for v in div prod noscale1; do
  (cd /tmp/$v && PYTHONPATH=/tmp/$v MEGATRON_LITE_CUDA_DEFINES="${DEF[$v]}" timeout 330 python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > $O/build_$v.log 2>&1) &
done; wait
echo "built at $(( $(date +%s) - S0 )) s"; tail -qn1 $O/build_*.log
(cd /tmp/div && PYTHONPATH=/tmp/div timeout 170 python3 -m pytest -q -rf \
  tests/gpu/test_fused_allreduce.py tests/gpu/test_codec_cuda.py 2>&1 | tail -25 | tee $O/gpu_tests_div.log)
echo "== tests at $(( $(date +%s) - S0 )) s"; pack
i=0
for v in div prod noscale1 noscale1 prod div random; do
  [ $(left) -gt 40 ] || break
  d=$v; u=1; [ $v = random ] && { d=div; u=""; }
  (cd /tmp/$d && PYTHONPATH=/tmp/$d MEGATRON_LITE_CUDA_DEFINES="${DEF[$d]}" ML_AB_UNIT_SCALES=$u \
    MEGATRON_LITE_BLOCKS_PER_SM=6 timeout $(( $(left) - 5 )) torchrun --nproc_per_node=1 \
    tools/bench_allreduce.py --host-overhead --min-size 64MB --max-size 64MB \
    --comm int8:128,path=fused --comm weighted-int8:128,path=fused \
    --comm hadamard-int8:128,path=fused --comm weighted-hadamard-int8:128,path=fused \
    --comm int4:128,path=fused --comm weighted-int4:128,path=fused \
    --comm hadamard-int4:128,path=fused --comm weighted-hadamard-int4:128,path=fused \
    --comm hadamard-int4:128,algo=one-shot --comm weighted-hadamard-int4:128,algo=one-shot \
    --comm weighted-hadamard-int6-sym:128,algo=one-shot \
    --json $O/run_${i}_$v.json > $O/run_$i.log 2>&1)
  echo "== run $i, $v at $(( $(date +%s) - S0 )) s"
  grep -E "dispatch|error|Error" $O/run_$i.log | sed -E 's/ dispatch.*device / /; s/ rel err.*//'
  i=$((i + 1)); pack
done
echo "done at $(( $(date +%s) - S0 )) s"; pack
