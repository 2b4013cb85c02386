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

# (substring of torch.cuda.get_device_name(), world size) -> entry.
# Derived by tools/bench_allreduce.py on 4 x H200 (NV18), NCCL 2.28.9, torch 2.11,
# 2026-11-21: docs/benchmarks/allreduce_w{2,4}.json, "auto_thresholds". A codec missing
# from fused_min never beat NCCL at the largest sizes there, so auto keeps NCCL for it.
MEASURED: Dict = {
    # world 2 re-measured on 2026-11-22 with the "split" packing (2 x H200, NCCL 2.28.9):
    # docs/benchmarks/allreduce_w2_2026-11-22_split.json
    ("H200", 2): {"oneshot_max": 2 << 20,
                  "fused_min": {"bf16": 1 << 20, "int8": 1 << 20, "int4": 1 << 20,
                                "int4-sym": 1 << 20, "int4-int8": 1 << 20, "int3": 1 << 20,
                                "int2": 1 << 20}},
    ("H200", 4): {"oneshot_max": 512 << 10,
                  "fused_min": {"int2": 2 << 20, "int4": 4 << 20, "fp8": 4 << 20,
                                "int8": 2 << 20, "int4-int8": 4 << 20}},
}


def thresholds_for(device_name: str, world: int) -> Dict:
    for (kind, w), entry in MEASURED.items():
        if w == world and kind in device_name:
            return entry
    return DEFAULT
