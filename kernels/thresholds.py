"""The ``auto`` chooser's table: message size ranges -> the path that carries them, per
transport (comm/transport.py), GPU kind and world size (vLLM's style of measured table).

Paths: ``oneshot`` the one-shot bf16 kernel (reads peers' memory: needs peer access);
``nccl`` the process group's own all-reduce, uncompressed (NCCL; gloo on CPU); ``fused``
the fused two-shot kernel with the site's codec (needs peer access); ``portable`` the
portable path with the site's codec (comm/algorithms.py: codec ops around the group's
all_to_all / all_gather, chunked so that coding overlaps the exchange).

Measured entries (``nvlink`` only, today): ``oneshot_max`` (bytes): messages up to this
size use the one-shot bf16 kernel; ``fused_min`` (bytes per codec name, ``"*"`` for any
other codec): messages at least this large use the fused two-shot kernel with the site's
codec; everything in between goes to NCCL. ``dense_min`` (bytes, optional): messages at
least this large run the fused two-shot kernel with ``dense_bpsm`` blocks per SM instead
of 1 (``dense_min_mapped`` for the codecs whose maps are folded into the kernel). Entries
come from ``tools/bench_allreduce.py --json`` runs (the tool prints the derived entry;
see docs/benchmarks.md for the run each one came from).

Transports without a measurement (``UNMEASURED``: host memory, sockets, one process) get
no numbers, only the conservative rule: the ``auto`` keyword takes the group's own
all-reduce (nothing measured says anything beats it), and a named codec under
``path=auto`` keeps the portable path with that codec (nothing measured says sending it
uncompressed is faster). ``Table.explain`` says so ("unmeasured: falls back to ...").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Tuple

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


# The transports no run has measured yet: why, and where their measurement would come from.
UNMEASURED: Dict[str, str] = {
    "host-memory": "no all-reduce run without peer access yet (bench_allreduce.py "
                   "--transport host-memory)",
    "socket": "no all-reduce run across hosts or over NCCL sockets yet (bench_allreduce.py "
              "--transport socket)",
    "local": "one process: nothing crosses a link",
}

ONESHOT, NCCL, FUSED, PORTABLE = "oneshot", "nccl", "fused", "portable"
WORDS = {ONESHOT: "the one-shot bf16 kernel", NCCL: "the group's own all-reduce",
         FUSED: "the fused two-shot kernel", PORTABLE: "the portable path with the codec"}


def thresholds_for(device_name: str, world: int) -> Dict:
    """The ``nvlink`` entry of a GPU kind and world size (DEFAULT where none is measured)."""
    for (kind, w), entry in MEASURED.items():
        if w == world and kind in device_name:
            return entry
    return DEFAULT


Range = Tuple[int, Optional[int], str]      # bytes in [lo, hi) -> path; hi None: no end


@dataclass(frozen=True)
class Table:
    """The size ranges of one transport, GPU kind and world size. ``entry``: the measured
    entry's fields (None: an unmeasured transport, which has no kernel ranges);
    ``source``: where the numbers come from, or why there are none."""

    transport: str
    source: str
    entry: Optional[Mapping] = field(default=None, compare=False)

    @property
    def measured(self) -> bool:
        return self.entry is not None and self.entry is not DEFAULT

    def ranges(self, codec: str, auto: bool = False) -> Tuple[Range, ...]:
        """The ranges of the site's codec (``codec``: the scheme's name; ``auto``: the
        ``auto`` keyword, whose wire format where a kernel carries it is bf16)."""
        if self.entry is None:
            return ((0, None, NCCL if auto else PORTABLE),)
        om = int(self.entry["oneshot_max"]) + 1           # oneshot_max is inclusive
        fmin = self.entry["fused_min"].get(codec, self.entry["fused_min"].get("*"))
        out = [(0, om, ONESHOT)]
        if fmin is None:
            return tuple(out + [(om, None, NCCL)])
        if fmin > om:
            out.append((om, fmin, NCCL))
        return tuple(out + [(max(om, fmin), None, FUSED)])

    def choose(self, codec: str, nbytes: int, auto: bool = False) -> str:
        return next(p for lo, hi, p in self.ranges(codec, auto)
                    if nbytes >= lo and (hi is None or nbytes < hi))

    def explain(self, codec: str, nbytes: int, auto: bool = False) -> str:
        """Why ``choose`` picks its path for ``nbytes``, in one clause."""
        path = self.choose(codec, nbytes, auto)
        if self.entry is None:
            return f"{self.transport} unmeasured ({self.source}): falls back to {WORDS[path]}"
        lo, hi = next((lo, hi) for lo, hi, p in self.ranges(codec, auto)
                      if nbytes >= lo and (hi is None or nbytes < hi))
        return f"{self.transport} table ({self.source}): {_span(lo, hi)} -> {WORDS[path]}"


def _span(lo: int, hi: Optional[int]) -> str:
    """``[lo, hi)`` in words (the inclusive one-shot limit makes bounds like 2 MiB + 1)."""
    words = []
    if lo:
        words.append(f"from {_size(lo)}" if lo % 1024 == 0 else f"above {_size(lo - 1)}")
    if hi is not None:
        words.append(f"below {_size(hi)}" if hi % 1024 == 0 else f"up to {_size(hi - 1)}")
    return " ".join(words) or "any size"


def _size(n: int) -> str:
    for unit, k in (("MiB", 20), ("KiB", 10)):
        if n and n % (1 << k) == 0:
            return f"{n >> k} {unit}"
    return f"{n} B"


def table_for(transport: str, device_name: str, world: int,
              entry: Optional[Mapping] = None) -> Table:
    """The table of a transport (a ``comm.transport.Transport`` value), GPU kind and world
    size. ``entry`` (nvlink only) replaces the measured one (tests, sweeps)."""
    if transport != "nvlink":
        return Table(transport, UNMEASURED[transport])
    if entry is not None:
        return Table(transport, "given", entry)
    entry = thresholds_for(device_name, world)
    source = (f"measured, {device_name} x {world}" if entry is not DEFAULT else
              f"no measurement for {device_name} x {world}: default entry, not measured")
    return Table(transport, source, entry)


def blocks_per_sm(device_name: str, world: int, nbytes: int, mapped: bool = False) -> int:
    """Blocks per SM of the two-shot grid for a message of ``nbytes`` input bytes: the
    measured entry's ``dense_bpsm`` from ``dense_min`` up (``dense_min_mapped`` when the
    kernel runs a codec's maps, ``mapped``), else 1 (a GPU kind or world
    size without this measurement keeps 1, which a sweep on 4 x H200 found best on
    2026-11-21, before the split packing)."""
    entry = thresholds_for(device_name, world)
    dense = entry.get("dense_min_mapped" if mapped else "dense_min", entry.get("dense_min"))
    return int(entry.get("dense_bpsm", 1)) if dense is not None and nbytes >= dense else 1
