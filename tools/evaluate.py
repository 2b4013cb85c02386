#!/usr/bin/env python
"""Accuracy of low-bit communication: every ``--comm`` spec against bf16 communication,
run as ``python tools/evaluate.py`` (simulated TP) or under ``torchrun`` (real TP).

The implementation is megatron_lite/cli/evaluate.py (also the ``megatron-lite-evaluate`` console
script); ``--help`` lists every flag.
"""
import sys

from megatron_lite.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
