#!/usr/bin/env python
"""Split a Hugging Face checkpoint into tensor-parallel shards, or rebuild it (--to-hf).

    python tools/convert_hf_checkpoint.py --hf-dir DIR --tp N --out DIR [--dtype bf16|fp16|fp32] [--force]
    python tools/convert_hf_checkpoint.py --bundled smollm2-135m --tp 3 --out DIR
    python tools/convert_hf_checkpoint.py --bundled qwen2.5-coder-1.5b --tp 2 --out DIR
    python tools/convert_hf_checkpoint.py --to-hf --shards DIR --out DIR [--force]

The command line lives in megatron_lite/cli/convert.py, the conversion in
megatron_lite/checkpoint/convert.py; see ``--help``.
"""
import sys

from megatron_lite.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
