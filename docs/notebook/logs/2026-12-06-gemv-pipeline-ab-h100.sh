export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
VARS=("" "ML_GEMV_PIPE=1" "ML_GEMV_WORDS=8" "ML_GEMV_WORDS=8,ML_GEMV_PIPE=1" "ML_GEMV_WORDS=2,ML_GEMV_PIPE=1" "ML_GEMV_ROWS=4")
nvidia-smi --query-gpu=name,power.limit --format=csv,noheader
for v in "${VARS[@]}"; do
  MEGATRON_LITE_CUDA_DEFINES="$v" timeout 300 python3 -c "from megatron_lite.kernels import codec_cuda; codec_cuda.gemv_ext()" > /dev/null 2>&1 &
done
wait; echo built $SECONDS
i=0
for v in "${VARS[@]}" ""; do
  MEGATRON_LITE_CUDA_DEFINES="$v" timeout 100 python3 tools/bench_gemv.py --json $OUT/gemv_$i.json > $OUT/gemv_$i.log 2>&1 || tail -3 $OUT/gemv_$i.log
  python3 - "$i" "$v" <<'PY'
import json, sys
d = json.load(open(f"{__import__('os').environ['OUT']}/gemv_{sys.argv[1]}.json"))
print(f"[{sys.argv[1]}] {sys.argv[2]!r:34} step gemv {d['step']['gemv_less_producers_ms']:.3f} cublas {d['step']['cublas_less_producers_ms']:.3f} | " + " ".join(f"{r['layer']} {r['gemv_us']:.1f}" for r in d['rows']))
PY
  i=$((i+1))
done
BEST=$(python3 - <<'PY'
import json, os
V = ["", "ML_GEMV_PIPE=1", "ML_GEMV_WORDS=8", "ML_GEMV_WORDS=8,ML_GEMV_PIPE=1", "ML_GEMV_WORDS=2,ML_GEMV_PIPE=1", "ML_GEMV_ROWS=4"]
t = [json.load(open(f"{os.environ['OUT']}/gemv_{i}.json"))['step']['gemv_less_producers_ms'] for i in range(len(V))]
print(V[min(range(1, len(V)), key=lambda i: t[i])])
PY
)
echo "best: $BEST  $SECONDS s"
j=0
for v in "" "$BEST" "" "$BEST"; do
  MEGATRON_LITE_CUDA_DEFINES="$v" timeout 100 torchrun --nproc_per_node=1 tools/bench_generate.py --compile \
    --random-weights llama3-8b --comm native --no-lower-bound --prefill 512x1 --decode-batches 1 \
    --decode-steps 100 --repeats 3 --check-tokens 0 --json $OUT/tpot_$j.json > $OUT/tpot_$j.log 2>&1
  echo "[$j] '$v' $(grep -E 'decode  b1|TPOT b1' $OUT/tpot_$j.log | tr '\n' ' ')"
  j=$((j+1))
done
MEGATRON_LITE_CUDA_DEFINES="$BEST" timeout 120 python3 -m pytest -q tests/gpu/test_gemv.py 2>&1 | tail -3
echo done $SECONDS
