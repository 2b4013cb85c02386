#!/usr/bin/env bash
# The accuracy side of power-of-two weighted- channel scales on every model and TP size of
# docs/results/accuracy.md: one calibration per (model, TP), then the same file with every
# scale rounded to 2^round(log2 s) (logs/2026-12-07-pow2-scales.py), each evaluated with the
# recommended weighted- rows against its own bf16 row on the same tokens.
# (Qwen2.5-Coder-1.5B, slower on 2 cores: NSEQ=8 TOKENS=2040, CODECS without the last.)
#   MODELS="gemma-3-270m:2 smollm2-135m:3 qwen2.5-coder-1.5b:2" bash docs/notebook/logs/2026-12-07-pow2-scales-all.sh
set -u -o pipefail
export OMP_NUM_THREADS=2
CODECS=${CODECS:-"--comm weighted-hadamard-int8:128 --comm ef+weighted-hadamard-int6-sym:128,algo=one-shot
  --comm ef+weighted-hadamard-int4:128,algo=one-shot --comm weighted-hadamard-int4:128"}
H=~/.cache/megatron_lite/hf; D=../shared/data; W=${W:-/tmp/p2}; mkdir -p $W
for mt in ${MODELS:-gemma-3-270m:2 smollm2-135m:3}; do
  m=${mt%:*}; tp=${mt#*:}; tag=$m-tp$tp
  python -c "from megatron_lite.checkpoint.gguf import ensure_hf_model; ensure_hf_model('$m')" || exit 1
  [ -f $W/$tag-w.safetensors ] || python tools/calibrate.py --ckpt $H/$m --text $D/wiki_passages.txt \
    --tp $tp --skip-seqs 64 --num-seqs ${NSEQ:-32} --scale-seqs ${NSEQ:-32} --out $W/$tag-w.safetensors || exit 1
  python docs/notebook/logs/2026-12-07-pow2-scales.py $W/$tag-w.safetensors $W/$tag-p2.safetensors
  for c in w p2; do
    [ -f $W/$tag-$c.details.json ] || python tools/evaluate.py --ckpt $H/$m --tp $tp \
      $CODECS \
      --calibration $W/$tag-$c.safetensors --text $D/wiki_passages.txt --max-tokens ${TOKENS:-4088} \
      --no-progress --json $W/$tag-$c.json --details $W/$tag-$c.details.json \
      --markdown $W/$tag-$c.md || exit 1
    echo "## $tag, scales: $c"; cat $W/$tag-$c.md
  done
done
