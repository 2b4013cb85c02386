#!/usr/bin/env bash
# One call, one GPU: the committed tree (base) against variant p
# (logs/2026-12-07-restore-prefetch-patch.py: the restore's reciprocal scales of the next
# chunk loaded before this chunk is unscaled). Alternating runs (a run starts before LIMIT
# seconds), then the GPU tests of p (same products, so the same bits) until TOTAL seconds;
# logs archived into $OUT/all.tgz after each step.
#   bash docs/notebook/logs/2026-12-07-restore-prefetch-ab.sh   (from the repository root)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
O=/tmp/o_p; rm -rf $O; mkdir -p $O; S0=$(date +%s)
pack() { tar czf "$OUT/all.tgz" -C $O . ; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > $O/env.txt 2>&1; cat $O/env.txt
for v in base p; do
  rm -rf /tmp/$v; mkdir -p /tmp/$v
  tar cf - kernels megatron_lite tools tests pyproject.toml | tar xf - -C /tmp/$v
done
python3 docs/notebook/logs/2026-12-07-restore-prefetch-patch.py /tmp/p
for d in /tmp/base /tmp/p; do
  (cd $d && PYTHONPATH=$d timeout 300 python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > $O/build_$(basename $d).log 2>&1) &
done; wait
echo "built at $(( $(date +%s) - S0 )) s"
i=0
for d in /tmp/base /tmp/p /tmp/p /tmp/base /tmp/base /tmp/p; do
  [ $(( $(date +%s) - S0 )) -lt ${LIMIT:-420} ] || break
  (cd $d && PYTHONPATH=$d MEGATRON_LITE_BLOCKS_PER_SM=6 timeout 60 torchrun --nproc_per_node=1 \
    tools/bench_allreduce.py --host-overhead --min-size 64MB --max-size 64MB \
    --comm int8:128,path=fused --comm weighted-int8:128,path=fused \
    --comm hadamard-int8:128,path=fused --comm weighted-hadamard-int8:128,path=fused \
    --comm int4:128,path=fused --comm hadamard-int4:128,path=fused \
    --comm weighted-hadamard-int4:128,path=fused \
    --comm hadamard-int4:128,algo=one-shot --comm weighted-hadamard-int4:128,algo=one-shot \
    --json $O/run_${i}_$(basename $d).json > $O/run_$i.log 2>&1)
  echo "== run $i, $(basename $d) at $(( $(date +%s) - S0 )) s"
  grep -E "dispatch|error|Error" $O/run_$i.log | sed -E 's/ dispatch.*device / /; s/ rel err.*//'
  i=$((i + 1)); pack
done
# then the GPU tests of p, in the time left (the patch leaves the codec kernels alone)
(cd /tmp/p && PYTHONPATH=/tmp/p timeout $(( ${TOTAL:-560} - ($(date +%s) - S0) )) python3 -m pytest \
  -q -rf tests/gpu/test_fused_allreduce.py 2>&1 | tail -3 | tee $O/gpu_tests_p.log)
echo "done at $(( $(date +%s) - S0 )) s"; pack
