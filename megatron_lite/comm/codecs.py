"""Wire codecs for the quantized all-reduce: the bit-exact reference every kernel matches.

A codec turns a 1-D chunk of ``n`` floats (``n`` a multiple of the group size ``g``) into
``encoded_nbytes(n)`` bytes and back. ``encode``/``decode`` accept leading batch dims
(``[..., n]`` -> ``[..., nbytes]``); every row is an independent chunk.

Byte layout (structure of arrays, little-endian, G = n / g groups)::

    [ payload: n values packed LSB-first ][ meta array 0: G x bf16 ][ meta array 1: G x bf16 ]

* packing of a b-bit code (b in 1, 2, 4): value i sits in byte ``i * b // 8`` at bit
  ``(i % (8 // b)) * b``; so for int4 the low nibble of byte i is value 2i, the high nibble
  value 2i + 1. int8 codes are one byte each (two's complement for ``int8``, e4m3fn bits
  for ``fp8``).
* int3 is two bit planes over the whole chunk: ``[low 2 bits of every value, packed as
  int2: n/4 bytes][bit 2 of every value, packed as 1-bit: n/8 bytes]``. Exactly 3 bits per
  value, no value straddles a byte, and a kernel decodes it with two loads and shifts.
  int5 is the same with a 4-bit plane: ``[low 4 bits, packed as int4: n/2 bytes][bit 4,
  packed as 1-bit: n/8 bytes]`` (5 bits per value; reference only, no fused kernel).
  6 and 7 bits (only inside the ``klt`` codecs, comm/transform.py) follow the same rule:
  planes of 4, 2 and 1 bits, low bits first (6 = 4 + 2, 7 = 4 + 2 + 1).
* meta arrays hold bf16 bit patterns. Asymmetric codecs (int5, int4, int3, int2, and the
  1- to 8-bit widths inside ``klt``; 8-bit codes one byte each): array 0 is the step
  ``s``, array 1 the offset ``m``. Symmetric codecs (int8, int4-sym, fp8): array 0 is the
  group's bound ``A`` (no array 1).

Arithmetic (all fp32, every division and product IEEE round-to-nearest-even, ``rint`` is
round-half-to-even; a kernel must use correctly rounded division, e.g. ``div_rn``)::

    finite = all(|x| <= BF16_MAX) over the group     # NaN, +-Inf and fp32 beyond bf16 fail
    x      = where(finite, x, 0)

    asymmetric, qmax = 2^b - 1:
      m  = RD_bf16(min x)                            # round toward -inf: m <= every x
      s  = 0                                 if max x == m     (constant group)
           RU_bf16(max(fl(fl(0.5*max - 0.5*m) * C), 2^-126))   C = fl32(2 / qmax)
      r2 = fl(2 / s)  (0 when s == 0)                # finite: s >= 2^-126
      q  = clamp(rint(fl(fl(0.5*x - 0.5*m) * r2)), 0, qmax)
      decode: y = 2 * fl(q * (0.5*s) + 0.5*m)        # q*(0.5 s) is exact, so FMA or not
                                                     # gives the same bits
    symmetric int, qmax = 2^(b-1) - 1 (127 or 7):
      A  = RU_bf16(max |x|)                          # exact for bf16 inputs
      e  = 2^64 if A < 2^-64 else 1                  # tiny groups: exact power-of-2 rescale
      r  = fl(qmax / fl(A*e))  (0 when A == 0)
      q  = clamp(rint(fl(fl(x*e) * r)), -qmax, qmax)
      decode: y = sign(q)*A if |q| == qmax else fl(fl(q * fl(fl(A*e) / qmax)) * (1/e))
    fp8 (e4m3fn, max 448): as symmetric with qmax = 448, but
      v = clamp(fl(fl(x*e) * r), -448, 448);  f = e4m3fn(v) (round-nearest-even)
      decode: y = sign(f)*A if |f| == 448 else fl(fl(f * fl(fl(A*e) / 448)) * (1/e))

    non-finite group: payload codes 0, meta array 0 = NaN (0x7FC0), array 1 = 0
    output: y = clamp(y, -L, L) with L = 65504 for fp16 output, BF16_MAX otherwise
            (NaN propagates), then round-to-nearest-even into the output dtype.

Why these choices (the full discussion is in docs/codecs.md):
* bf16 metadata: 32 bits per group for the asymmetric codecs (int4:128 = 4.25 bits/value,
  the figure the issue quotes), bf16 range covers every bf16/fp16 activation.
* Rounding the stored step *up* and the offset *down* means the stored grid always
  covers [min, max], so the error stays within s/2 of the stored s (no clipping).
* The halving in the asymmetric path keeps ``max - min`` finite for groups spanning
  +-BF16_MAX; the ``e`` rescale keeps ``qmax / A`` finite for denormal groups; the
  ``|q| == qmax -> A`` rule makes every constant group (of a bf16 value) decode exactly.
* A group holding NaN/Inf decodes entirely to NaN: no finite grid can carry an Inf,
  the failure stays loud, and every rank decodes the same bytes, so it is identical on
  all ranks. A plain sum in the all-reduce would also have made those outputs non-finite.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_lite.errors import MegatronLiteError

BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # 3.3895313892515355e38
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
_S_MIN = 2.0 ** -126     # smallest normal fp32: floor of the asymmetric step, keeps 2/s finite
_TINY = 2.0 ** -64       # symmetric groups with A below this are rescaled by 2^64
_TINY_SCALE = 2.0 ** 64


class CodecError(MegatronLiteError, ValueError):
    """Bad codec spec or bad codec input (unknown codec, group size that does not fit)."""


# ----------------------------------------------------------------------------- bit helpers
def round_up_bf16(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v >= 0`` (finite) rounded toward +inf to a bf16 value, returned as fp32."""
    b = v.contiguous().view(torch.int32)
    return ((b + 0xFFFF) & -65536).view(torch.float32)


def round_down_bf16(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v`` (finite) rounded toward -inf to a bf16 value, returned as fp32."""
    b = v.contiguous().view(torch.int32)
    up = (b + 0xFFFF) & -65536    # magnitude up: toward -inf for negatives
    down = b & -65536             # truncate: toward -inf for non-negatives
    return torch.where(b < 0, up, down).view(torch.float32)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``q`` (integers in [0, 2^bits), last dim a multiple of 8/bits) LSB-first."""
    per = 8 // bits
    q = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=q.device) * bits
    return (q << shifts).sum(-1).to(torch.uint8)


def unpack_bits(buf: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes as int32."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=buf.device) * bits
    q = (buf.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*buf.shape[:-1], buf.shape[-1] * per)[..., :n]


def _planes(bits: int) -> Tuple[int, ...]:
    """Bit-plane widths of a b-bit code, low bits first: 3 -> (2, 1), 5 -> (4, 1),
    6 -> (4, 2), 7 -> (4, 2, 1) (1, 2, 4, 8: one plane)."""
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def saturate(y: torch.Tensor, out_dtype: torch.dtype, keep_inf: bool = False) -> torch.Tensor:
    """Clamp fp32 ``y`` to the finite range of the output (NaN passes), then round to it.

    The decoded grid may overshoot the input's max by up to half a step; the input itself
    was finite in its dtype, so clamping only moves ``y`` closer to it. ``keep_inf``: a
    value that is already +-Inf (carried verbatim, e.g. bf16 on the wire) stays Inf.
    """
    lim = FP16_MAX if out_dtype == torch.float16 else BF16_MAX
    c = y.clamp(-lim, lim)
    if keep_inf:
        c = torch.where(torch.isinf(y), y, c)
    return c.to(out_dtype)


def _bf16_bytes(v: torch.Tensor) -> torch.Tensor:
    """fp32 values that are exact bf16 (or NaN) -> their bf16 bit patterns as bytes."""
    return v.to(torch.bfloat16).contiguous().view(torch.uint8)


def _bf16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


# ----------------------------------------------------------------------------- codecs
class Codec:
    """One wire format. Subclasses define ``bits_per_value`` and the encode/decode pair.

    ``rs``/``ag`` are the codecs of the two steps of the quantized all-reduce
    (reduce-scatter, all-gather); for a plain codec both are the codec itself.
    """

    name: str = ""
    group_size: int = 1
    bits_per_value: float = 16.0

    @property
    def spec(self) -> str:
        return self.name if self.group_size == 1 else f"{self.name}:{self.group_size}"

    @property
    def rs(self) -> "Codec":
        return self

    @property
    def ag(self) -> "Codec":
        return self

    def encoded_nbytes(self, n: int) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, buf: torch.Tensor, n: int, out_dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        raise NotImplementedError

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound on ``|decode(encode(x), n, fp32) - x|`` (inf in non-finite groups)."""
        raise NotImplementedError

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise CodecError(f"{self.spec}: input must be a float tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] % self.group_size:
            raise CodecError(f"{self.spec}: chunk length {x.shape[-1] if x.dim() else 0} is not "
                             f"a multiple of the group size {self.group_size}")
        return x.float()

    def _check_buf(self, buf: torch.Tensor, n: int) -> None:
        if buf.dtype != torch.uint8 or buf.shape[-1] != self.encoded_nbytes(n):
            raise CodecError(f"{self.spec}: expected {self.encoded_nbytes(n)} uint8 bytes for "
                             f"{n} values, got {tuple(buf.shape)} {buf.dtype}")

    def __repr__(self) -> str:
        return f"<codec {self.spec}: {self.bits_per_value:g} bits/value>"


class BF16Codec(Codec):
    """No compression: bf16 on the wire (round-to-nearest-even; NaN/Inf pass through
    element by element; finite values saturate to an fp16 output's range)."""

    name = "bf16"
    bits_per_value = 16.0

    def encoded_nbytes(self, n: int) -> int:
        return 2 * n

    def encode(self, x):
        x = self._check(x)
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)

    def decode(self, buf, n, out_dtype=torch.float32):
        self._check_buf(buf, n)
        # fp16's 65504 rounds up to bf16 65536: saturate finite values, keep Inf/NaN.
        return saturate(buf.contiguous().view(torch.bfloat16).float(), out_dtype, keep_inf=True)

    def error_bound(self, x):
        # RNE to bf16 (8 significant bits): half an ulp is at most 2^-8 |x| for normals,
        # 2^-134 among the denormals.
        xf = x.float()
        eb = xf.abs() * 2.0 ** -8 + 2.0 ** -134
        return torch.where(xf.abs() <= BF16_MAX, eb, torch.full_like(eb, math.inf))


class GroupCodec(Codec):
    """Group-wise integer / fp8 codec; see the module docstring for the exact arithmetic."""

    def __init__(self, name: str, bits: int, kind: str, group_size: int):
        assert kind in ("asym", "sym", "fp8")
        self.name, self.bits, self.kind, self.group_size = name, bits, kind, group_size
        self.n_meta = 2 if kind == "asym" else 1
        self.bits_per_value = bits + 16.0 * self.n_meta / group_size
        if kind == "asym":
            self.qmax = 2 ** bits - 1
        elif kind == "sym":
            self.qmax = 2 ** (bits - 1) - 1
        else:
            self.qmax = 448  # e4m3fn max

    # -- layout ------------------------------------------------------------------------
    def encoded_nbytes(self, n: int) -> int:
        if n % self.group_size:
            raise CodecError(f"{self.spec}: chunk length {n} is not a multiple of the group "
                             f"size {self.group_size}")
        return n * self.bits // 8 + 2 * self.n_meta * (n // self.group_size)

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return q.to(torch.int8).view(torch.uint8) if self.kind == "sym" else q.to(torch.uint8)
        if self.bits in (3, 5, 6, 7):   # bit planes, low bits first (module docstring)
            out, lo = [], 0
            for b in _planes(self.bits):
                out.append(pack_bits((q >> lo) & (2 ** b - 1), b))
                lo += b
            return torch.cat(out, -1)
        return pack_bits(q, self.bits)

    def _unpack(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        if self.bits == 8:
            return payload.view(torch.int8).to(torch.int32) if self.kind == "sym" else payload
        if self.bits in (3, 5, 6, 7):
            q, lo, at = 0, 0, 0
            for b in _planes(self.bits):
                q = q | (unpack_bits(payload[..., at: at + n * b // 8], b, n) << lo)
                lo, at = lo + b, at + n * b // 8
            return q
        return unpack_bits(payload, self.bits, n)

    # -- quantization ------------------------------------------------------------------
    def _params(self, xg: torch.Tensor):
        """Per-group stored metadata (fp32 holding exact bf16 values) and the finite mask."""
        finite = (xg.abs() <= BF16_MAX).all(-1)
        xz = torch.where(finite.unsqueeze(-1), xg, torch.zeros_like(xg))
        if self.kind == "asym":
            lo, hi = xz.amin(-1), xz.amax(-1)
            # + 0.0 turns -0.0 into +0.0: which signed zero amin returns from a group holding
            # both is implementation-defined (CPU vs GPU vs kernels); the stored bits must not be.
            m = round_down_bf16(lo) + 0.0
            c = torch.tensor(2.0 / self.qmax, dtype=torch.float32)
            d = (0.5 * hi - 0.5 * m) * c
            s = round_up_bf16(torch.clamp(d, min=_S_MIN))
            s = torch.where(hi > m, s, torch.zeros_like(s))
            return xz, finite, (s, m)
        a = round_up_bf16(xz.abs().amax(-1))
        return xz, finite, (a,)

    def _tiny_rescale(self, a: torch.Tensor) -> torch.Tensor:
        return torch.where(a < _TINY, torch.full_like(a, _TINY_SCALE), torch.ones_like(a))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        xf = self._check(x)
        lead, n, g = xf.shape[:-1], xf.shape[-1], self.group_size
        xg = xf.reshape(*lead, n // g, g)
        xz, finite, meta = self._params(xg)
        if self.kind == "asym":
            s, m = meta
            # tensor / tensor everywhere: ``scalar / tensor`` is reciprocal-then-multiply in
            # torch (Tensor.__rtruediv__), which is not the correctly rounded quotient.
            safe_s = torch.where(s > 0, s, torch.ones_like(s))
            r2 = torch.where(s > 0, torch.full_like(s, 2.0) / safe_s, torch.zeros_like(s))
            u = (0.5 * xz - (0.5 * m).unsqueeze(-1)) * r2.unsqueeze(-1)
            q = torch.round(u).clamp(0, self.qmax)
        else:
            (a,) = meta
            e = self._tiny_rescale(a)
            ae = a * e
            r = torch.where(a > 0, torch.full_like(ae, float(self.qmax))
                            / torch.where(a > 0, ae, torch.ones_like(ae)), torch.zeros_like(ae))
            v = (xz * e.unsqueeze(-1)) * r.unsqueeze(-1)
            if self.kind == "sym":
                q = torch.round(v).clamp(-self.qmax, self.qmax)
            else:
                q = v.clamp(-448.0, 448.0)
        q = torch.where(finite.unsqueeze(-1), q, torch.zeros_like(q))
        if self.kind == "fp8":
            codes = q.to(torch.float8_e4m3fn).view(torch.uint8).reshape(*lead, n)
        else:
            codes = q.to(torch.int32).reshape(*lead, n)
            if self.kind == "sym" and self.bits < 8:
                codes = codes + (1 << (self.bits - 1))  # offset binary: int4-sym stores q + 8
        nan = torch.full_like(meta[0], math.nan)
        metas = [torch.where(finite, meta[0], nan)]
        if self.kind == "asym":
            metas.append(torch.where(finite, meta[1], torch.zeros_like(meta[1])))
        parts = [self._pack(codes)] + [_bf16_bytes(t) for t in metas]
        return torch.cat(parts, -1)

    def _split(self, buf: torch.Tensor, n: int):
        self._check_buf(buf, n)
        npay, ng = n * self.bits // 8, n // self.group_size
        metas = [_bf16_from_bytes(buf[..., npay + 2 * ng * i: npay + 2 * ng * (i + 1)])
                 for i in range(self.n_meta)]
        return buf[..., :npay], metas

    def decode(self, buf, n, out_dtype=torch.float32):
        payload, metas = self._split(buf, n)
        lead, g = buf.shape[:-1], self.group_size
        if self.kind == "fp8":
            codes = payload.contiguous().view(torch.float8_e4m3fn).float()
        else:
            codes = self._unpack(payload, n)
            if self.kind == "sym" and self.bits < 8:
                codes = codes - (1 << (self.bits - 1))
            codes = codes.float()
        q = codes.reshape(*lead, n // g, g)
        if self.kind == "asym":
            s, m = metas
            y = 2.0 * (q * (0.5 * s).unsqueeze(-1) + (0.5 * m).unsqueeze(-1))
        else:
            (a,) = metas
            e = self._tiny_rescale(a)
            # tensor / tensor: CUDA turns ``tensor / python_scalar`` into a multiply by the
            # scalar's reciprocal (BinaryDivTrueKernel.cu), CPU divides; this is IEEE on both.
            step = (a * e) / torch.full_like(a, float(self.qmax))
            y = (q * step.unsqueeze(-1)) * (1.0 / e).unsqueeze(-1)
            top = q.abs() == self.qmax
            y = torch.where(top, torch.sign(q) * a.unsqueeze(-1), y)
        return saturate(y.reshape(*lead, n), out_dtype)

    # -- analytic error ----------------------------------------------------------------
    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Bound from the *stored* (rounded) metadata; derivation in docs/codecs.md."""
        xf = self._check(x)
        lead, n, g = xf.shape[:-1], xf.shape[-1], self.group_size
        xg = xf.reshape(*lead, n // g, g)
        xz, finite, meta = self._params(xg)
        ax = xz.abs()
        if self.kind == "asym":
            step = meta[0].unsqueeze(-1)
            eb = step * (0.5 + 2.0 ** -10) + ax * 2.0 ** -23
        elif self.kind == "sym":
            step = (meta[0] / self.qmax).unsqueeze(-1)
            eb = step * (0.5 + 2.0 ** -10) + ax * 2.0 ** -22
        else:  # e4m3: 3 mantissa bits -> half ulp 2^-4 relative; subnormal spacing 2^-9
            step = (meta[0] / 448.0).unsqueeze(-1)
            eb = ax * (2.0 ** -4 + 2.0 ** -18) + step * 2.0 ** -10
        eb = eb + 2.0 ** -148
        eb = torch.where(finite.unsqueeze(-1), eb, torch.full_like(eb, math.inf))
        return eb.reshape(*lead, n)


class MixedCodec(Codec):
    """Flash Communication's mixed mode: ``rs`` codec for the reduce-scatter, ``ag`` for
    the all-gather. bits/value is the mean of the two (each value crosses the wire once in
    each step)."""

    def __init__(self, name: str, rs: Codec, ag: Codec):
        self.name, self._rs, self._ag = name, rs, ag
        self.group_size = rs.group_size
        self.bits_per_value = (rs.bits_per_value + ag.bits_per_value) / 2

    @property
    def rs(self):
        return self._rs

    @property
    def ag(self):
        return self._ag

    def _no_single_format(self, *args, **kwargs):
        raise CodecError(f"{self.spec} is a two-step scheme: use .rs / .ag for wire formats")

    encoded_nbytes = encode = decode = error_bound = _no_single_format


# ----------------------------------------------------------------------------- registry
_PLAIN = {
    "int8": ("sym", 8),
    "int5": ("asym", 5),
    "int4": ("asym", 4),
    "int4-sym": ("sym", 4),
    "int3": ("asym", 3),
    "int2": ("asym", 2),
    "fp8": ("fp8", 8),
}
_ALIASES = {"int6": "int4-int8", "fp8-e4m3": "fp8"}
CODEC_NAMES = ("bf16",) + tuple(_PLAIN) + ("int4-int8", "outlier-int4")
# Block-Hadamard rotation before any group codec (comm/rotation.py; same bits per value).
CODEC_NAMES += tuple("hadamard-" + n for n in tuple(_PLAIN) + ("int4-int8",))
# Static channel scales from measured sensitivity before a plain or rotated codec
# (comm/weighting.py; same bits per value, needs a calibration file with scales).
CODEC_NAMES += tuple("weighted-" + n for n in CODEC_NAMES[1:] if n != "outlier-int4")
CODEC_NAMES += tuple(f"klt{b}" for b in range(2, 9))   # comm/transform.py


@dataclass(frozen=True)
class CodecSpec:
    """A parsed ``CODEC[:GROUP]`` string. ``group_size`` is None when the codec takes none
    (bf16) or when outlier-int4 uses static per-channel scales."""

    name: str
    group_size: Optional[int]

    def __str__(self) -> str:
        return self.name if self.group_size is None else f"{self.name}:{self.group_size}"


_SPEC_RE = re.compile(r"^\s*([A-Za-z0-9_\-]+)\s*(?::\s*([^\s]*)\s*)?$")


def parse_codec_spec(spec: str) -> CodecSpec:
    """``"int4:128"`` -> CodecSpec("int4", 128). Raises CodecError with a one-line reason."""
    if isinstance(spec, CodecSpec):
        return spec
    m = _SPEC_RE.match(str(spec))
    if not m:
        raise CodecError(f"bad codec spec {spec!r}: expected CODEC[:GROUP], e.g. int4:128")
    name = _ALIASES.get(m.group(1).lower(), m.group(1).lower())
    if name not in CODEC_NAMES:
        raise CodecError(f"unknown codec {m.group(1)!r}; choose one of {', '.join(CODEC_NAMES)}")
    group = m.group(2)
    if group is None:
        g = None if name in ("bf16", "outlier-int4") else DEFAULT_GROUP_SIZE
    else:
        if name == "bf16":
            raise CodecError("codec bf16 takes no group size")
        if not group.isdigit() or int(group) not in GROUP_SIZES:
            raise CodecError(f"group size {group!r} for {name} does not fit: choose one of "
                             f"{', '.join(map(str, GROUP_SIZES))}")
        g = int(group)
    return CodecSpec(name, g)


def get_codec(spec, calibration=None, site: Optional[str] = None,
              budget: Optional[float] = None) -> Codec:
    """Codec object for a spec string (or CodecSpec).

    ``outlier-int4``, ``weighted-`` and ``klt`` need per-site calibration state: pass
    ``calibration`` (a path or a loaded :class:`megatron_lite.comm.outlier.Calibration`)
    and ``site``. ``budget`` (klt only): the site's bits per value instead of N + 1/4.
    """
    cs = parse_codec_spec(spec)
    if cs.name == "bf16":
        return BF16Codec()
    if cs.name in _PLAIN:
        kind, bits = _PLAIN[cs.name]
        return GroupCodec(cs.name, bits, kind, cs.group_size)
    if cs.name == "int4-int8":
        return MixedCodec(cs.name, GroupCodec("int4", 4, "asym", cs.group_size),
                          GroupCodec("int8", 8, "sym", cs.group_size))
    if cs.name.startswith("hadamard-"):
        from megatron_lite.comm import rotation
        return rotation.hadamard_codec(cs)
    if cs.name.startswith("weighted-"):
        from megatron_lite.comm import weighting  # per-site state, like outlier-int4
        return weighting.weighted_codec(cs, calibration, site)
    if cs.name.startswith("klt"):
        from megatron_lite.comm import transform  # per-site, per-rank state
        return transform.transform_codec(cs, calibration, site, budget)
    from megatron_lite.comm import outlier  # outlier-int4: per-site state
    return outlier.outlier_codec(cs, calibration, site)


def codec_bits(spec) -> float:
    """bits/value of a spec without building per-site state (outlier: the nominal figure)."""
    cs = parse_codec_spec(spec)
    if cs.name == "outlier-int4":
        from megatron_lite.comm import outlier
        return outlier.nominal_bits(cs)
    if cs.name.startswith("klt"):          # the budget; a built codec has its exact figure
        from megatron_lite.comm import transform
        return transform.budget_bits(cs.name)
    if cs.name.startswith("weighted-"):   # the wire format is the inner codec's
        return get_codec(CodecSpec(cs.name[len("weighted-"):], cs.group_size)).bits_per_value
    return get_codec(cs).bits_per_value


def stage_codecs(codec: Codec) -> Tuple[Codec, Codec]:
    """(reduce-scatter codec, all-gather codec) of a two-step scheme."""
    return codec.rs, codec.ag
