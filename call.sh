#!/usr/bin/env bash
# scratch: one device call (not committed)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
T0=$(date +%s); left() { echo $(( ${BOX:-450} - $(date +%s) + T0 )); }
nvidia-smi --query-gpu=name,power.limit,clocks.max.sm --format=csv
timeout 120 python -m pytest -q -rf tests/gpu/test_gemv.py 2>&1 | tail -4 | tee $OUT/gemv_tests.log
echo "[$(( $(date +%s)-T0 ))s]"
i=0
for pf in 0.5 0 0.5 0 0.5; do
  [ "$(left)" -gt 100 ] || break
  MEGATRON_LITE_GEMV_PREFETCH=$pf timeout $(left) torchrun --nproc_per_node=1 tools/bench_generate.py \
    --compile --random-weights llama3-8b --comm native --no-lower-bound --prefill 512x1 \
    --decode-batches 1 --decode-steps 100 --repeats 3 --check-tokens 0 \
    --json $OUT/tpot_${i}_pf$pf.json > $OUT/tpot_${i}_pf$pf.log 2>&1
  echo "run $i prefetch $pf [$(( $(date +%s)-T0 ))s]"
  grep -hE "decode  b1|TFLOP" $OUT/tpot_${i}_pf$pf.log | cut -c1-300
  i=$((i+1))
done
