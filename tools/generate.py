#!/usr/bin/env python
"""Generate text with a tensor-parallel model: ``torchrun --nproc_per_node=N
tools/generate.py --prompt TEXT [--ckpt DIR] ...`` (``--help`` for every flag).

The implementation is megatron_lite/cli/generate.py (also the ``megatron-lite-generate``
console script).
"""
import sys

from megatron_lite.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
