#!/usr/bin/env python
"""Per-layer bit allocation from measured sensitivity: the ``--comm`` string that
minimises the summed single-site KL within a mean bits-per-value budget.

The implementation is megatron_lite/cli/sensitivity.py (also the ``megatron-lite-sensitivity`` console
script); ``--help`` lists every flag.
"""
import sys

from megatron_lite.cli.sensitivity import main

if __name__ == "__main__":
    sys.exit(main())
