#!/usr/bin/env bash
# Qwen2.5-Coder-1.5B's recommended rows under the calibration the recommendation tells
# users to run (32 windows, 32 for the channel scales; the committed Qwen rows used 8),
# at TP 2 and 4, on prose and on Python source, 4088 tokens each: new files beside the
# committed ones (docs/results/data/accuracy/qwen2.5-coder-1.5b-tp{2,4}-{wiki,code}-cal32.*).
#   bash docs/notebook/logs/2026-12-07-qwen-cal32.sh   (repository root; about an hour on 2 cores)
set -eu -o pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
H=~/.cache/megatron_lite/hf; D=../shared/data; A=docs/results/data/accuracy
C=/work/runs/calib; R=/work/runs; mkdir -p $C
python -c "from megatron_lite.checkpoint.gguf import ensure_hf_model; ensure_hf_model('qwen2.5-coder-1.5b')"
python - <<'PY'   # the code text of the committed Qwen rows (2026-12-04.md), same modules and order
import os, sysconfig
lib = sysconfig.get_paths()["stdlib"]
with open("/work/runs/stdlib_code.txt", "w") as out:
    for f in ["argparse.py", "textwrap.py", "heapq.py", "json/decoder.py", "bisect.py", "shlex.py"]:
        out.write(open(os.path.join(lib, f)).read() + "\n\n")
PY
for tp in 2 4; do
  [ -f $C/qwen2.5-coder-1.5b-tp$tp-w32.safetensors ] || python tools/calibrate.py \
      --ckpt $H/qwen2.5-coder-1.5b --text $D/wiki_passages.txt --tp $tp --skip-seqs 64 \
      --num-seqs 32 --scale-seqs 32 --no-progress --out $C/qwen2.5-coder-1.5b-tp$tp-w32.safetensors
  for text in wiki code; do
    T=$D/wiki_passages.txt; [ $text = code ] && T=$R/stdlib_code.txt
    python tools/evaluate.py --ckpt $H/qwen2.5-coder-1.5b --tp $tp \
        --comm weighted-hadamard-int8:128 --comm "ef+weighted-hadamard-int6-sym:128,algo=one-shot" \
        --comm "ef+weighted-hadamard-int4:128,algo=one-shot" \
        --calibration $C/qwen2.5-coder-1.5b-tp$tp-w32.safetensors --text $T --max-tokens 4088 \
        --no-progress --json $A/qwen2.5-coder-1.5b-tp$tp-$text-cal32.json \
        --details $A/qwen2.5-coder-1.5b-tp$tp-$text-cal32.details.json
  done
done
