"""The codec registry: every codec name, the family that builds it, and the one parser of
``CODEC[:GROUP]``.

A codec family (one module of this package) registers one :class:`Entry` per name it
serves; ``get_scheme`` looks the name up and calls the entry's ``build``. Nothing
dispatches on a name's prefix: a composite name (``weighted-hadamard-int4``) is an entry
of its own, registered by the family that builds it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from megatron_lite.comm.codecs.base import (DEFAULT_GROUP_SIZE, GROUP_SIZES, CodecError,
                                            CodecSpec, Scheme, Traits)

# Group handling of a name: it takes a group size (default 128), takes none (bf16), or
# takes one optionally (outlier-int4: static steps without, dynamic int4-sym groups with).
GROUP, NO_GROUP, OPTIONAL_GROUP = "group", "none", "optional"


@dataclass(frozen=True)
class BuildContext:
    """Per-site state a calibrated scheme is built from: the loaded calibration
    (comm/calibration.py), the site's name and, for the klt codecs, the site's budget in
    bits per value (None: the codec's own N + 1/4)."""

    calibration: object = None
    site: Optional[str] = None
    budget: Optional[float] = None


@dataclass(frozen=True)
class Entry:
    """One codec name. ``build(spec, ctx) -> Scheme``; ``bits(spec)``: bits per value
    without per-site state (the nominal figure of calibrated codecs).
    ``model_budgets(calibration, sites, spec) -> {site: bits per value}``: how the codec
    shares its bits over the model's sites (``budget=model``); None where it cannot."""

    name: str
    family: str
    build: Callable[[CodecSpec, BuildContext], Scheme]
    bits: Callable[[CodecSpec], float]
    group: str = GROUP
    traits: Traits = Traits()
    model_budgets: Optional[Callable] = None


_ENTRIES: Dict[str, Entry] = {}
_ALIASES = {"int6": "int4-int8", "fp8-e4m3": "fp8"}
_SPEC_RE = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?::\s*([^\s]*)\s*)?$")


def register(entry: Entry) -> None:
    if entry.name in _ENTRIES:
        raise ValueError(f"codec {entry.name!r} registered twice")
    _ENTRIES[entry.name] = entry


def names() -> Tuple[str, ...]:
    """Every registered codec name, in registration order."""
    return tuple(_ENTRIES)


def entry(name: str) -> Entry:
    try:
        return _ENTRIES[name]
    except KeyError:
        raise CodecError(f"unknown codec {name!r}; choose one of {', '.join(_ENTRIES)}") from None


def parse_codec_spec(spec) -> CodecSpec:
    """``"int4:128"`` -> CodecSpec("int4", 128). Raises CodecError with a one-line reason."""
    if isinstance(spec, CodecSpec):
        return spec
    m = _SPEC_RE.match(str(spec))
    if not m:
        raise CodecError(f"bad codec spec {spec!r}: expected CODEC[:GROUP], e.g. int4:128")
    name = _ALIASES.get(m.group(1).lower(), m.group(1).lower())
    e = entry(name)
    group = m.group(2)
    if group is None:
        return CodecSpec(name, DEFAULT_GROUP_SIZE if e.group == GROUP else None)
    if e.group == NO_GROUP:
        raise CodecError(f"codec {name} takes no group size")
    if not group.isdigit() or int(group) not in GROUP_SIZES:
        raise CodecError(f"group size {group!r} for {name} does not fit: choose one of "
                         f"{', '.join(map(str, GROUP_SIZES))}")
    return CodecSpec(name, int(group))


def traits(spec) -> Traits:
    return entry(parse_codec_spec(spec).name).traits


def get_scheme(spec, calibration=None, site: Optional[str] = None,
               budget: Optional[float] = None) -> Scheme:
    """The scheme of a spec. Calibrated codecs need ``calibration`` (a loaded
    :class:`~megatron_lite.comm.calibration.Calibration` or a path) and ``site``;
    ``budget`` (klt only): the site's bits per value instead of N + 1/4."""
    cs = parse_codec_spec(spec)
    e = entry(cs.name)
    if e.traits.calibrated:
        if calibration is None or site is None:
            raise CodecError(f"{cs.name} needs a calibration file (--calibration FILE from "
                             "tools/calibrate.py) and a site")
        if isinstance(calibration, str):
            from megatron_lite.comm.calibration import load_calibration
            calibration = load_calibration(calibration)
    return e.build(cs, BuildContext(calibration, site, budget))


def codec_bits(spec) -> float:
    """Bits per value of a spec without per-site state (calibrated codecs: nominal)."""
    cs = parse_codec_spec(spec)
    return entry(cs.name).bits(cs)
