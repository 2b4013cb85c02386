"""``CommSpec``: the one typed form of ``--comm``, with its one parser and formatter.

Every tool takes ``--comm SPEC`` (repeated where a tool compares several), and
``Engine.from_pretrained(comm=SPEC)`` takes the same string or a CommSpec. Grammar::

    SPEC  := [ef+]CODEC { ,ITEM }
    CODEC := native | auto | NAME[:GROUP]             (comm/codecs: names and groups)
    ITEM  := GLOB=CODEC                               per-site override, first match wins
           | min_bytes=SIZE                           smaller messages stay native
           | path=auto|fused|two-step                 which implementation carries a site
           | algo=two-step|one-shot                   the all-reduce algorithm
           | budget=site|model                        klt: bits per site or per model
           | transport=nvlink|host-memory|socket      instead of the detected transport
           | chunk=SIZE                               portable path's piece size (0: whole)
           | calibration=FILE                         state of the calibrated codecs

``native`` (or ``none``) is the backend's own uncompressed all-reduce. ``auto`` lets the
chooser decide, never below bf16: the transport's measured table (kernels/thresholds.py)
picks the one-shot bf16 kernel, NCCL or the fused two-shot kernel with bf16 on the wire,
and wherever nothing is measured faster (no peer access, an unmeasured transport, no
kernels) the backend's own all-reduce. ``bf16`` is the bf16 codec like any other: the
same kernels where the table picks them, else the portable two-step path (bf16 on the
wire, fp32 sum in rank order), the reference the tests compare the two-step paths with.
``ef+`` adds error feedback (comm/feedback.py). Globs are :mod:`fnmatch` patterns on site names
(``layers.3.mlp.down_proj``, ``layers.3.self_attn.o_proj``, ``embed_tokens``); a negative
layer index counts from the last layer (``layers.-1.*``). The embedding reduce stays
native unless an override names it. Examples::

    int4:128,layers.0.*=int8,layers.-1.*=int8      # first and last layer at int8
    native,embed_tokens=int8                       # only the embedding reduce
    weighted-hadamard-int8:128,calibration=c.safetensors
    ef+weighted-hadamard-int4:128,algo=one-shot,calibration=c.safetensors
    klt4:64,algo=one-shot,budget=model,calibration=c.safetensors

``transport``: how the ranks reach each other, which picks the chooser's table; detected
when the group is made (comm/transport.py). ``chunk``: the portable path cuts messages
larger than SIZE (input bytes, default 4 MiB) into pieces, so that coding one piece
overlaps the exchange of the one before; same bits at any size (comm/algorithms.py).

``path``: ``auto`` (default) lets the size chooser send a message uncompressed where that
measured faster than the codec's fused kernel; ``fused`` keeps every message compressed
(the fused two-shot kernel wherever it takes it, else the portable path); ``two-step``
always takes the portable path. Compressed paths give the same bits, so ``path``
changes speed, never results. ``algo`` changes results: one-shot quantizes each value
once (module docstring of comm/algorithms.py).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Optional, Tuple

from megatron_lite.comm.algorithms import DEFAULT_CHUNK_BYTES, Algo
from megatron_lite.comm.codecs import CodecError, CodecSpec, parse_codec_spec
from megatron_lite.comm.codecs.registry import entry
from megatron_lite.comm.transport import LINKS, Transport

NATIVE = "native"
EF = "ef+"
EMBED_SITE = "embed_tokens"
# ``auto`` in a codec position: not a registered codec but the chooser's keyword; where a
# kernel carries such a site, its wire format is bf16 (``CommSpec.codecs``).
AUTO = CodecSpec("auto", None)
BF16 = CodecSpec("bf16", None)


class Path(str, Enum):
    AUTO = "auto"
    FUSED = "fused"
    TWO_STEP = "two-step"


class Budget(str, Enum):
    SITE = "site"
    MODEL = "model"


@dataclass(frozen=True)
class CommSpec:
    """A parsed ``--comm`` (module docstring). ``codec`` None: native for every site
    without an override. ``overrides``: ``(glob, codec or None)`` in order."""

    codec: Optional[CodecSpec] = None
    overrides: Tuple[Tuple[str, Optional[CodecSpec]], ...] = field(default_factory=tuple)
    min_bytes: int = 0
    path: Path = Path.AUTO
    algo: Algo = Algo.TWO_STEP
    budget: Budget = Budget.SITE
    error_feedback: bool = False
    calibration: Optional[str] = None
    transport: Optional[Transport] = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self):
        # Everything is checked here, before any compute: a typo must fail in one line.
        if self.min_bytes < 0:
            raise CodecError(f"min_bytes must be >= 0, got {self.min_bytes}")
        if self.chunk_bytes < 0:
            raise CodecError(f"chunk must be >= 0, got {self.chunk_bytes}")
        specs = self.codecs()
        entries = [entry(s.name) for s in specs]
        tr = [e.traits for e in entries]
        if self.algo == Algo.ONE_SHOT and self.path == Path.FUSED:
            raise CodecError("path=fused runs the fused two-shot kernel (algo=two-step); "
                             "algo=one-shot takes path=auto or path=two-step")
        for s, t in zip(specs, tr):
            if self.algo == Algo.ONE_SHOT and t.two_stage:
                raise CodecError(f"algo=one-shot: {s} is a two-stage codec (int4 "
                                 "reduce-scatter, int8 all-gather); one-shot has one stage")
            if self.algo == Algo.TWO_STEP and t.one_shot_only:
                raise CodecError(f"{s} codes each rank's partial in its own basis: it "
                                 "needs algo=one-shot")
            if t.calibrated and not self.calibration:
                raise CodecError(f"{s.name} needs a calibration file (calibration=FILE or "
                                 "--calibration FILE, from tools/calibrate.py)")
        if self.budget == Budget.MODEL and not any(e.model_budgets for e in entries):
            raise CodecError("budget=model shares the bits of a klt codec between sites: "
                             "it needs a klt codec")
        if self.error_feedback and not specs:
            raise CodecError(f"--comm {self}: error feedback needs a quantizing codec")

    @property
    def is_native(self) -> bool:
        """No site is compressed: the base communicator serves every call."""
        return self.codec is None and not self.overrides

    def codecs(self) -> Tuple[CodecSpec, ...]:
        """Every codec the spec names (default and overrides; ``auto`` as bf16, its wire
        format where a kernel carries it)."""
        return tuple(BF16 if c == AUTO else c
                     for c in (self.codec,) + tuple(c for _, c in self.overrides)
                     if c is not None)

    def replace(self, **changes) -> "CommSpec":
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return format_comm(self)


_SIZE_RE = re.compile(r"^(\d+)\s*(|b|k|kb|kib|m|mb|mib)$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 2 ** 20, "mb": 2 ** 20,
              "mib": 2 ** 20}
_ENUMS = {"path": Path, "algo": Algo, "budget": Budget}


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text.strip())
    if not m:
        raise CodecError(f"bad size {text!r}: expected e.g. 65536, 64KiB or 1MiB")
    return int(m.group(1)) * _SIZE_MULT[m.group(2).lower()]


def _codec(text: str) -> Optional[CodecSpec]:
    t = text.strip().lower()
    if t in (NATIVE, "none"):
        return None
    if t == AUTO.name:
        return AUTO
    return parse_codec_spec(text)


def parse_comm(text, calibration: Optional[str] = None) -> CommSpec:
    """Parse a ``--comm`` value (module docstring). ``calibration`` (``--calibration``)
    fills the spec's calibration unless it names its own. None parses as native."""
    if isinstance(text, CommSpec):
        return text if text.calibration or not calibration else text.replace(
            calibration=calibration)
    if text is None:
        return CommSpec(calibration=calibration)
    items = [s.strip() for s in str(text).split(",")]
    head = items[0]
    ef = head.lower().startswith(EF)
    if ef:
        head = head[len(EF):].strip()
    if not head or "=" in head:
        raise CodecError(f"bad --comm {text!r}: it must start with a codec, e.g. int4:128")
    fields = {"codec": _codec(head), "error_feedback": ef, "calibration": calibration}
    overrides = []
    for item in items[1:]:
        if "=" not in item:
            raise CodecError(f"bad --comm item {item!r}: expected GLOB=CODEC, min_bytes=SIZE, "
                             "path=PATH, algo=ALGO, budget=site|model, transport=T, "
                             "chunk=SIZE or calibration=FILE")
        key, val = (t.strip() for t in item.split("=", 1))
        if key == "min_bytes":
            fields["min_bytes"] = parse_size(val)
        elif key == "chunk":
            fields["chunk_bytes"] = parse_size(val)
        elif key == "transport":
            fields["transport"] = parse_transport(val)
        elif key in _ENUMS:
            try:
                fields[key] = _ENUMS[key](val.lower())
            except ValueError:
                choices = ", ".join(e.value for e in _ENUMS[key])
                raise CodecError(f"{key}={val!r}: expected one of {choices}") from None
        elif key == "calibration":
            if not val:
                raise CodecError("calibration= needs a file")
            fields["calibration"] = val
        elif not key:
            raise CodecError(f"bad --comm item {item!r}: empty site pattern")
        else:
            overrides.append((key, _codec(val)))
    return CommSpec(overrides=tuple(overrides), **fields)


def parse_transport(text: str) -> Transport:
    """``transport=T``: one of the links (comm/transport.py LINKS), else a one-line error."""
    t = next((t for t in LINKS if t.value == text.strip().lower()), None)
    if t is None:
        raise CodecError(f"transport={text!r}: expected one of "
                         f"{', '.join(t.value for t in LINKS)}")
    return t


def format_comm(spec: CommSpec, with_calibration: bool = True) -> str:
    """The canonical ``--comm`` string of a spec: ``parse_comm(format_comm(s)) == s``.
    ``with_calibration=False``: without the file (a label for tables)."""
    head = NATIVE if spec.codec is None else str(spec.codec)
    items = [(EF if spec.error_feedback else "") + head]
    items += [f"{p}={NATIVE if c is None else c}" for p, c in spec.overrides]
    if spec.min_bytes:
        items.append(f"min_bytes={spec.min_bytes}")
    for key, default in (("path", Path.AUTO), ("algo", Algo.TWO_STEP), ("budget", Budget.SITE)):
        value = getattr(spec, key)
        if value != default:
            items.append(f"{key}={value.value}")
    if spec.transport is not None:
        items.append(f"transport={spec.transport.value}")
    if spec.chunk_bytes != DEFAULT_CHUNK_BYTES:
        items.append(f"chunk={spec.chunk_bytes}")
    if spec.calibration and with_calibration:
        items.append(f"calibration={spec.calibration}")
    return ",".join(items)
