"""Measured size thresholds for the ``auto`` all-reduce backend, per GPU kind and world size.

Each entry: ``oneshot_max`` (bytes): messages up to this size use the one-shot bf16
kernel; ``fused_min`` (bytes per codec name, ``"*"`` for any other codec): messages at
least this large use the fused two-shot kernel with the site's codec; everything in
between goes to NCCL. Entries come from ``tools/bench_allreduce.py --json`` runs (the
tool prints the derived entry; see docs/benchmarks.md for the run each one came from).
"""
from __future__ import annotations

from typing import Dict

# GPU kinds without a measured entry get this: one-shot only for small messages (it moves
# W times the bytes, so it loses as soon as bandwidth matters), and fused quantized only
# where a 4x smaller payload has to pay for two extra codec passes.
DEFAULT: Dict = {"oneshot_max": 256 << 10, "fused_min": {"*": 8 << 20}}

# (substring of torch.cuda.get_device_name(), world size) -> entry
MEASURED: Dict = {}


def thresholds_for(device_name: str, world: int) -> Dict:
    for (kind, w), entry in MEASURED.items():
        if w == world and kind in device_name:
            return entry
    return DEFAULT
