"""The group codecs (bf16, int8, int6-sym, int5, int4, int4-sym, int3, int2, fp8, and Flash
Communication's two-stage int4-int8): the wire formats and the bit-exact reference every
kernel matches, with their scheme (flat chunking, comm/algorithms.py).

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
  packed as 1-bit: n/8 bytes]`` (5 bits per value). int6-sym is the same with a 2-bit
  plane (``[low 4 bits: n/2 bytes][bits 4-5, packed as int2: n/4 bytes]``), and 7 bits
  (only inside the ``klt`` codecs, klt.py) follows the same rule: planes of 4, 2 and 1
  bits, low bits first (6 = 4 + 2, 7 = 4 + 2 + 1).
* meta arrays hold bf16 bit patterns. Asymmetric codecs (int5, int4, int3, int2, and the
  1- to 8-bit widths inside ``klt``; 8-bit codes one byte each): array 0 is the step
  ``s``, array 1 the offset ``m``. Symmetric codecs (int8, int6-sym, int4-sym, fp8): array
  0 is the group's bound ``A`` (no array 1); below 8 bits their codes are offset binary,
  ``q + 2^(b-1)``.

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
    symmetric int, qmax = 2^(b-1) - 1 (127, 31 or 7):
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
  the figure Flash Communication quotes), bf16 range covers every bf16/fp16 activation.
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
from typing import Optional

import torch

from megatron_lite.comm.codecs.base import (BF16_MAX, Codec, CodecError, CodecSpec, NoKernelError,
                                            Scheme, Traits, bf16_bytes, bf16_from_bytes,
                                            bit_planes, finite_only, non_finite_bound,
                                            pack_bits, round_down_bf16, round_up_bf16,
                                            saturate, unpack_bits)
from megatron_lite.comm.codecs.registry import GROUP, NO_GROUP, Entry, parse_codec_spec, register
from megatron_lite.kernels.config import (BF16_KERNEL, KIND_ASYM, KIND_FP8, KIND_SYM,
                                          KernelCodec, KernelPlan)

_S_MIN = 2.0 ** -126     # smallest normal fp32: floor of the asymmetric step, keeps 2/s finite
_TINY = 2.0 ** -64       # symmetric groups with A below this are rescaled by 2^64
_TINY_SCALE = 2.0 ** 64


# ----------------------------------------------------------------------------- wire formats
class BF16Codec(Codec):
    """No compression: bf16 on the wire (round-to-nearest-even; NaN/Inf pass through
    element by element; finite values saturate to an fp16 output's range)."""

    name = "bf16"
    bits_per_value = 16.0
    carries_inf = True

    def encoded_nbytes(self, n: int) -> int:
        return 2 * n

    def encode(self, x):
        x = self._check(x)
        return x.to(torch.bfloat16).contiguous().view(torch.uint8)

    def decode(self, buf, n, out_dtype=torch.float32):
        self._check_buf(buf, n)
        # fp16's 65504 rounds up to bf16 65536: saturate finite values, keep Inf/NaN.
        return saturate(buf.contiguous().view(torch.bfloat16).float(), out_dtype, keep_inf=True)

    def kernel_codec(self) -> KernelCodec:
        return BF16_KERNEL

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
        self._kernel = None
        if bits in (1, 2, 3, 4, 5, 6, 8):   # one bit plane or two (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2)
            kk = {"asym": KIND_ASYM, "sym": KIND_SYM, "fp8": KIND_FP8}[kind]
            c2 = float(torch.tensor(2.0 / self.qmax, dtype=torch.float32)) if kind == "asym" else 0.0
            self._kernel = KernelCodec(kk, bits, group_size, self.qmax, c2, self.n_meta)

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
            for b in bit_planes(self.bits):
                out.append(pack_bits((q >> lo) & (2 ** b - 1), b))
                lo += b
            return torch.cat(out, -1)
        return pack_bits(q, self.bits)

    def _unpack(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        if self.bits == 8:
            return payload.view(torch.int8).to(torch.int32) if self.kind == "sym" else payload
        if self.bits in (3, 5, 6, 7):
            q, lo, at = 0, 0, 0
            for b in bit_planes(self.bits):
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
        parts = [self._pack(codes)] + [bf16_bytes(t) for t in metas]
        return torch.cat(parts, -1)

    def _split(self, buf: torch.Tensor, n: int):
        self._check_buf(buf, n)
        npay, ng = n * self.bits // 8, n // self.group_size
        metas = [bf16_from_bytes(buf[..., npay + 2 * ng * i: npay + 2 * ng * (i + 1)])
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
        return non_finite_bound(eb, finite.unsqueeze(-1)).reshape(*lead, n)

    def kernel_codec(self) -> Optional[KernelCodec]:
        """None for the 6/7-bit widths used inside klt (no kernel takes them)."""
        return self._kernel


# ----------------------------------------------------------------------------- the scheme
class GroupScheme(Scheme):
    """A group codec's all-reduce: flatten, zero-pad to ``W * c`` with ``c`` a multiple of
    the group size, chunk j = values ``[j*c, (j+1)*c)``. ``rs`` codes the reduce-scatter
    stage and ``ag`` the all-gather; they differ only for the two-stage int4-int8."""

    def __init__(self, name: str, rs: Codec, ag: Optional[Codec] = None):
        self.rs, self.ag = rs, ag or rs
        self.name, self.group_size = name, rs.group_size
        self.spec = name if name == "bf16" else f"{name}:{rs.group_size}"
        # each value crosses the wire once in each step
        self.bits_per_value = (self.rs.bits_per_value + self.ag.bits_per_value) / 2
        self.traits = Traits(two_stage=self.ag is not self.rs)
        self._plan: Optional[KernelPlan] = None
        kr, ka = self.rs.kernel_codec(), self.ag.kernel_codec()
        if kr is not None and ka is not None:
            self._plan = KernelPlan(kr, ka)

    def chunk(self, x, world_size):
        n, g = x.numel(), self.group_size
        c = -(-n // (world_size * g)) * g
        flat = x.reshape(-1)
        if c * world_size != n:
            flat = torch.cat([flat, flat.new_zeros(c * world_size - n)])
        shape = x.shape

        def restore(y: torch.Tensor) -> torch.Tensor:
            return y.reshape(-1)[:n].reshape(shape)
        return flat.view(world_size, c), restore

    def rs_encode(self, chunks, src):
        return self.rs.encode(chunks)

    def piece_quantum(self):
        return self.group_size            # groups are coded from their own values only

    def rs_decode(self, recv, chunk_id, c):
        return self.rs.decode(recv, c, torch.float32)

    def ag_encode(self, acc, chunk_id):
        return self.ag.encode(acc)

    def ag_decode(self, gathered, c, out_dtype):
        return self.ag.decode(gathered, c, out_dtype)

    def finish(self, acc, out_dtype):
        """The decode's saturation (the bf16 codec keeps an Inf, as its decode does). A
        finite sum beyond the bf16 range saturates here, where two-step's re-encoding
        would turn its group to NaN."""
        return saturate(acc, out_dtype, keep_inf=self.rs.carries_inf)

    def own_error(self, chunks, acc, rank):
        c = chunks.shape[-1]
        x = chunks.float()
        err = (self.rs.decode(self.rs.encode(x), c, torch.float32) - x).clone()
        if acc is not None:
            err[rank] += self.ag.decode(self.ag.encode(acc), c, torch.float32) - acc
        return finite_only(err)

    def rs_error_bound(self, chunks, src):
        return self.rs.error_bound(chunks)

    def ag_error_bound(self, acc, chunk_id):
        return self.ag.error_bound(acc)

    def kernel_plan(self, x):
        if self._plan is None:
            raise NoKernelError(f"no Triton kernel for codec {self.spec!r}")
        return self._plan


# ----------------------------------------------------------------------------- registry
# name: (kind, bits) of the one-stage group codecs
PLAIN = {
    "int8": ("sym", 8),
    "int5": ("asym", 5),
    "int4": ("asym", 4),
    "int4-sym": ("sym", 4),
    "int6-sym": ("sym", 6),
    "int3": ("asym", 3),
    "int2": ("asym", 2),
    "fp8": ("fp8", 8),
}
TWO_STAGE = {"int4-int8": ("int4", "int8")}


def make_codec(name: str, group_size: int) -> GroupCodec:
    """The wire format of a one-stage group codec name."""
    kind, bits = PLAIN[name]
    return GroupCodec(name, bits, kind, group_size)


def get_codec(spec) -> Codec:
    """The wire format of a one-stage group codec spec (``bf16``, ``int4:128``, ...)."""
    cs = parse_codec_spec(spec)
    if cs.name == "bf16":
        return BF16Codec()
    if cs.name not in PLAIN:
        raise CodecError(f"{cs} is not a one-stage group codec (its scheme: get_scheme)")
    return make_codec(cs.name, cs.group_size)


def asym_codec(bits: int, group_size: int) -> GroupCodec:
    """The asymmetric b-bit group code (b = 1..8; the widths the klt codecs mix)."""
    return GroupCodec(f"int{bits}", bits, "asym", group_size)


def plain_scheme(cs: CodecSpec) -> GroupScheme:
    """The scheme of a plain (unmapped) group codec spec, for the mapped families."""
    if cs.name == "bf16":
        return GroupScheme("bf16", BF16Codec())
    if cs.name in TWO_STAGE:
        rs, ag = TWO_STAGE[cs.name]
        return GroupScheme(cs.name, make_codec(rs, cs.group_size), make_codec(ag, cs.group_size))
    return GroupScheme(cs.name, make_codec(cs.name, cs.group_size))


def _bits(cs: CodecSpec) -> float:
    return plain_scheme(cs).bits_per_value


register(Entry("bf16", "group", lambda cs, ctx: plain_scheme(cs), _bits, group=NO_GROUP))
for _name in PLAIN:
    register(Entry(_name, "group", lambda cs, ctx: plain_scheme(cs), _bits, group=GROUP))
for _name in TWO_STAGE:
    register(Entry(_name, "group", lambda cs, ctx: plain_scheme(cs), _bits, group=GROUP,
                   traits=Traits(two_stage=True)))
# The names the mapped families (hadamard-, weighted-) wrap, in registration order.
WRAPPABLE = tuple(PLAIN) + tuple(TWO_STAGE)
