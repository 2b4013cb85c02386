#!/usr/bin/env bash
# scratch (one call, one GPU): blocks per SM of the tile kernels (two_shot_kernel,
# one_shot_q_kernel). Variant trees copied from this one: MAX_BLOCKS 512 -> 1024
# (workspace.py) and __launch_bounds__(128, 4) -> (128, N); each run with
# MEGATRON_LITE_BLOCKS_PER_SM = N. Trees alternate; one rank; host-overhead device us.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p /tmp/o
S0=$(date +%s)
ROOT=$PWD
pack() { tar czf "$OUT/all.tgz" -C /tmp/o . ; }
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > /tmp/o/env.txt 2>&1; cat /tmp/o/env.txt
BASE=$ROOT/scratch_dev/base   # HEAD (git archive); ROOT: the working tree (Unscale saturates)
mk() {  # mk DIR MINB: a copy of BASE with MAX_BLOCKS 1024 and the launch bounds' MINB
  mkdir -p $1 && (cd $BASE && tar cf - .) | tar xf - -C $1
  sed -i "s/^MAX_BLOCKS = 512 /MAX_BLOCKS = 1024/" $1/megatron_lite/kernels/workspace.py
  sed -i "s/__launch_bounds__(kMaxTwoShotThreads, 4)/__launch_bounds__(kMaxTwoShotThreads, $2)/" \
    $1/kernels/csrc/two_shot.cu $1/kernels/csrc/one_shot_q.cu
  grep -c "MAX_BLOCKS = 1024" $1/megatron_lite/kernels/workspace.py
  grep -c "kMaxTwoShotThreads, $2)" $1/kernels/csrc/two_shot.cu $1/kernels/csrc/one_shot_q.cu
}
mk /tmp/v5 5; mk /tmp/v6 6; mk /tmp/ns 4; mk /tmp/nr 4
# diagnostics (two-shot only, timing only: wrong bits): no stage-1 scaling; no restore
sed -i "s/if (SCALE) scale_chunk(v\[k\], scale, a.h, ch.at(k));/if (false) scale_chunk(v[k], scale, a.h, ch.at(k));/" /tmp/ns/kernels/csrc/two_shot.cu
sed -i "s/          unscale(y\[k\]);/          (void)unscale;/" /tmp/nr/kernels/csrc/two_shot.cu
grep -c "if (false) scale_chunk" /tmp/ns/kernels/csrc/two_shot.cu; grep -c "(void)unscale;" /tmp/nr/kernels/csrc/two_shot.cu
for d in $BASE $ROOT /tmp/v5 /tmp/v6 /tmp/ns /tmp/nr; do
  (cd $d && PYTHONPATH=$d timeout 300 python3 -c "
from megatron_lite.kernels import codec_cuda; codec_cuda.build()" > /tmp/o/build_$(basename $d).log 2>&1) &
done; wait
echo "built at $(( $(date +%s) - S0 )) s"; tail -2 /tmp/o/build_*.log
i=0
for size in 64MB; do
  for v in "$BASE:4" "$ROOT:4" "/tmp/v5:5" "/tmp/v6:6" "/tmp/ns:4" "/tmp/nr:4" "$BASE:4" "$ROOT:4" "/tmp/v5:5" "/tmp/v6:6" "/tmp/v5:4"; do
    d=${v%:*}; b=${v#*:}
    [ $(( $(date +%s) - S0 )) -lt ${LIMIT:-540} ] || break
    (cd $d && PYTHONPATH=$d MEGATRON_LITE_BLOCKS_PER_SM=$b timeout 70 torchrun --nproc_per_node=1 \
      tools/bench_allreduce.py --host-overhead --min-size $size --max-size 64MB \
      --comm int8:128,path=fused --comm hadamard-int8:128,path=fused \
      --comm weighted-int8:128,path=fused --comm weighted-hadamard-int8:128,path=fused \
      --comm int4:128,path=fused --comm hadamard-int4:128,path=fused \
      --comm weighted-hadamard-int4:128,path=fused \
      --comm hadamard-int4:128,algo=one-shot --comm weighted-hadamard-int4:128,algo=one-shot \
      --json /tmp/o/occ_${i}.json > /tmp/o/occ_$i.log 2>&1)
    echo "== $i $size ${d#$ROOT/} bpsm=$b at $(( $(date +%s) - S0 )) s"
    grep -E "dispatch|error|Error" /tmp/o/occ_$i.log | sed -E 's/ +/ /g' | cut -c1-90
    i=$((i + 1)); pack
  done
done
echo "done at $(( $(date +%s) - S0 )) s"; pack
