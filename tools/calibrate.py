#!/usr/bin/env python
"""Calibrate the calibrated codecs (outlier-, weighted-, klt): per-channel statistics of
every row-parallel partial sum, written to a calibration file for ``--comm ...,calibration=FILE``.

The implementation is megatron_lite/cli/calibrate.py (also the ``megatron-lite-calibrate`` console
script); ``--help`` lists every flag.
"""
import sys

from megatron_lite.cli.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
