"""Measured size thresholds for the ``auto`` all-reduce backend, per GPU kind and world size.

Each entry: ``oneshot_max`` (bytes): messages up to this size use the one-shot bf16
kernel; ``fused_min`` (bytes per codec name, ``"*"`` for any other codec): messages at
least this large use the fused two-shot kernel with the site's codec; everything in
between goes to NCCL. ``dense_min`` (bytes, optional): messages at least this large run
the fused two-shot kernel with ``dense_bpsm`` blocks per SM instead of 1
(``dense_min_mapped`` for the codecs whose maps are folded into the kernel). Entries
come from ``tools/bench_allreduce.py --json`` runs (the tool prints the derived entry;
see docs/benchmarks.md for the run each one came from).
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
    # dense_min / dense_bpsm: the two-shot grid's blocks per SM from that message size
    # up, measured on 2026-11-30 (tests/gpu/sweep_grid.py, push, split packing, 1-256 MB,
    # 1/2/4/8 blocks per SM, then tools/bench_allreduce.py; docs/benchmarks.md "Blocks per
    # SM by message size"): 4 blocks per SM made int2/int4/int8 1.2-1.8x faster from 16 MB
    # up and 2-13% faster at 8 MB (fused bf16 3% slower there); 1 block stayed as fast or
    # faster below 8 MB (bf16 at 2 MB: 23.8 against 28.1 us). 8 were within 2% of 4.
    # dense_min_mapped: the same for the hadamard-/weighted- codecs (maps folded into the
    # kernel), whose 8 MB messages were 4-10% slower with 4 blocks and 1.1-1.5x faster
    # with them from 16 MB up (same day, docs/benchmarks.md).
    ("H200", 2): {"oneshot_max": 2 << 20,
                  "fused_min": {"bf16": 1 << 20, "int8": 1 << 20, "int4": 1 << 20,
                                "int4-sym": 1 << 20, "int4-int8": 1 << 20, "int3": 1 << 20,
                                "int2": 1 << 20},
                  "dense_min": 8 << 20, "dense_min_mapped": 16 << 20, "dense_bpsm": 4},
    ("H200", 4): {"oneshot_max": 512 << 10,
                  "fused_min": {"int2": 2 << 20, "int4": 4 << 20, "fp8": 4 << 20,
                                "int8": 2 << 20, "int4-int8": 4 << 20}},
}


def thresholds_for(device_name: str, world: int) -> Dict:
    for (kind, w), entry in MEASURED.items():
        if w == world and kind in device_name:
            return entry
    return DEFAULT


def blocks_per_sm(device_name: str, world: int, nbytes: int, mapped: bool = False) -> int:
    """Blocks per SM of the two-shot grid for a message of ``nbytes`` input bytes: the
    measured entry's ``dense_bpsm`` from ``dense_min`` up (``dense_min_mapped`` when the
    kernel runs a codec's maps, ``mapped``), else 1 (a GPU kind or world
    size without this measurement keeps 1, which a sweep on 4 x H200 found best on
    2026-11-21, before the split packing)."""
    entry = thresholds_for(device_name, world)
    dense = entry.get("dense_min_mapped" if mapped else "dense_min", entry.get("dense_min"))
    return int(entry.get("dense_bpsm", 1)) if dense is not None and nbytes >= dense else 1
