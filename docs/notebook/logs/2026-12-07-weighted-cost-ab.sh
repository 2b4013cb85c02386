#!/usr/bin/env bash
# One call, one GPU: where the weighted- kernels' time over the plain codec's goes, at one
# rank. A copy of the tree with logs/2026-12-07-weighted-cost-ab.patch (A/B-only defines,
# and ML_AB_UNIT_SCALES: the benchmark's synthetic channel scales all 1.0, so that every
# variant gives the reference's bits and passes the benchmark's check):
#   base      the committed kernels (no define: the patch only adds #ifndef lines)
#   notie     the restore without its tie test (exact for scales that are powers of two)
#   noscale1  the first stage without the scaling (exact for unit scales only)
#   both      both: a restore that is one product, as with scales folded into the weights
# built in parallel, then two rounds of alternating runs (base first and last), plus one
# base run on the usual log-uniform scales (the speed should not depend on the values).
# One rank, 64 MB, 6 blocks per SM, tools/bench_allreduce.py --host-overhead (CUDA-graph
# medians); logs archived into $OUT/all.tgz after each run.
#   BUDGET=580 bash docs/notebook/logs/2026-12-07-weighted-cost-ab.sh   (repository root)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=/tmp/o_w; rm -rf $O; mkdir -p $O; S0=$(date +%s); R=/tmp/abw
pack() { tar czf "$OUT/all.tgz" -C $O . ; }
left() { echo $(( ${BUDGET:-580} - ($(date +%s) - S0) )); }
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv > $O/env.txt 2>&1; cat $O/env.txt
rm -rf $R; mkdir -p $R
tar cf - kernels megatron_lite tools tests pyproject.toml | tar xf - -C $R
(cd $R && patch -p1 < $OLDPWD/docs/notebook/logs/2026-12-07-weighted-cost-ab.patch > $O/patch.log 2>&1) \
  || { echo "patch failed"; cat $O/patch.log; exit 1; }
declare -A DEF=([base]="" [notie]="ML_AB_NOTIE" [noscale1]="ML_AB_NOSCALE1" [both]="ML_AB_NOTIE,ML_AB_NOSCALE1")
for v in base notie noscale1 both; do
  (cd $R && PYTHONPATH=$R MEGATRON_LITE_CUDA_DEFINES="${DEF[$v]}" timeout 330 python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > $O/build_$v.log 2>&1) &
done; wait
echo "built at $(( $(date +%s) - S0 )) s"; tail -qn1 $O/build_*.log
i=0
for v in base notie noscale1 both random both noscale1 notie base; do
  [ $(left) -gt 35 ] || break
  d=${DEF[$v]-}; [ $v = random ] && d=""
  u=1; [ $v = random ] && u=""
  (cd $R && PYTHONPATH=$R MEGATRON_LITE_CUDA_DEFINES="$d" ML_AB_UNIT_SCALES=$u MEGATRON_LITE_BLOCKS_PER_SM=6 \
    timeout $(( $(left) - 5 )) torchrun --nproc_per_node=1 tools/bench_allreduce.py --host-overhead \
    --min-size 64MB --max-size 64MB \
    --comm int8:128,path=fused --comm weighted-int8:128,path=fused \
    --comm hadamard-int8:128,path=fused --comm weighted-hadamard-int8:128,path=fused \
    --comm int4:128,path=fused --comm hadamard-int4:128,path=fused \
    --comm weighted-hadamard-int4:128,path=fused \
    --comm hadamard-int4:128,algo=one-shot --comm weighted-hadamard-int4:128,algo=one-shot \
    --json $O/run_${i}_$v.json > $O/run_$i.log 2>&1)
  echo "== run $i, $v at $(( $(date +%s) - S0 )) s"
  grep -E "dispatch|error|Error" $O/run_$i.log | sed -E 's/ dispatch.*device / /; s/ rel err.*//'
  i=$((i + 1)); pack
done
echo "done at $(( $(date +%s) - S0 )) s"; pack
