"""Triton quantize / dequantize(+sum) kernels for the group codecs of
``megatron_lite/comm/codecs/group.py`` (described to them as ``config.KernelCodec``).

The arithmetic is a line-by-line copy of the reference (see that module's docstring), so
integer codes and bf16 metadata match it bit for bit and decoded values match exactly:

* every division is ``div_rn`` (Triton's plain ``/`` on fp32 is the approximate
  ``div.full.f32``), and kernels launch with ``enable_fp_fusion=False`` so that no
  ``a*b + c`` is contracted into an FMA with a single rounding;
* ``rint`` is the 1.5 * 2^23 trick (exact round-half-to-even for |v| < 2^22; every value
  rounded here is bounded by qmax), which also runs under ``TRITON_INTERPRET=1``
  (libdevice does not);
* bf16 and e4m3 conversions are done with integer ops, because the interpreter's float
  downcasts truncate; on the GPU they give the same bits as the hardware conversions.

The helpers work on a tile ``[NG, G]`` of NG whole groups. A tile of a chunk in the
reference layout is itself a chunk in that layout, so the fused all-reduce stores every
tile as ``[payload][meta0][meta1]`` and reuses them unchanged.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import maps
from .calls import (BF16_MAX, check_rotation, dequantize_buffers, error_buffers, geometry,
                    out_limit, quantize_buffers)
from .config import KIND_BF16, KernelCodec, launch_opts  # noqa: F401  (KIND_* for callers)
_RND = 12582912.0  # 1.5 * 2^23


# ----------------------------------------------------------------------------- bit helpers
@triton.jit
def rint(v):
    """Round half to even, exact for |v| < 2^22 (needs fp fusion off: no FMA with v)."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def bf16_bits(v):
    """fp32 -> bf16 bit pattern (uint32 in [0, 65535]), RNE; NaN -> 0x7FC0 as in c10."""
    u = v.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where(v != v, 0x7FC0, r)


@triton.jit
def bits_to_f32(b):
    """bf16 bit pattern (any int type holding 16 bits) -> fp32 (exact)."""
    return (b.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def load_f32(ptr, offs, mask):
    """Load as fp32. bf16 goes through its bits (exact, and the interpreter's own bf16
    upcast mishandles some values)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        b = tl.load(ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + offs, mask=mask, other=0,
                    cache_modifier=".cg")
        r = bits_to_f32(b)
    else:
        r = tl.load(ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return r


@triton.jit
def round_up_bf16(v):
    """fp32 v >= 0 toward +inf onto the bf16 grid (as the reference's round_up_bf16)."""
    b = v.to(tl.int32, bitcast=True)
    return ((b + 0xFFFF) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def round_down_bf16(v):
    b = v.to(tl.int32, bitcast=True)
    r = tl.where(b < 0, (b + 0xFFFF) & -65536, b & -65536)
    return r.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_encode(v):
    """fp32 |v| <= 448 -> e4m3fn code (int32), round to nearest even, sign kept."""
    u = v.to(tl.uint32, bitcast=True)
    s = (u >> 31).to(tl.int32)
    a = tl.abs(v)
    # subnormal range (a < 2^-6): units of 2^-9; m == 8 is exactly the smallest normal
    sub = rint(a * 512.0).to(tl.int32)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127           # floor(log2 a)
    e = tl.maximum(e, -6)
    scale = ((130 - e) << 23).to(tl.float32, bitcast=True)            # 2^(3 - e)
    mant = rint(a * scale).to(tl.int32)                                # in [8, 16]
    nrm = ((e + 7) << 3) + mant - 8
    code = tl.where(a < 0.015625, sub, nrm)
    return code | (s << 7)


@triton.jit
def e4m3_decode(c):
    """e4m3fn code (int32, no NaN codes: the encoder never makes one) -> fp32."""
    s = tl.where((c & 0x80) != 0, -1.0, 1.0)
    ex = (c >> 3) & 0xF
    m = (c & 7).to(tl.float32)
    p2 = ((ex + 117) << 23).to(tl.float32, bitcast=True)              # 2^(ex - 10)
    val = tl.where(ex == 0, m * 0.001953125, (m + 8.0) * p2)
    return s * val


# Sub-byte codes are (un)packed pairwise with tl.split / tl.join, which keeps the pairs in
# registers. (Shifting each code into place and reducing over a byte's codes gives the
# same bytes but goes through layout conversions: on 2 x H200 the fused int4:128
# two-shot took 691 us at 128 MB that way against 269 us with pairs, 4 blocks/SM;
# docs/notebook/2026-11-22-packing.md.)
@triton.jit
def _pair(c, NG: tl.constexpr, K: tl.constexpr, SH: tl.constexpr):
    """[NG, 2K] -> [NG, K]: element 2i | element 2i+1 << SH."""
    lo, hi = tl.split(tl.reshape(c, (NG, K, 2)))
    return lo | (hi << SH)


@triton.jit
def _unpair(c, NG: tl.constexpr, K: tl.constexpr, SH: tl.constexpr):
    """[NG, K] -> [NG, 2K], the inverse of ``_pair``."""
    return tl.reshape(tl.join(c & ((1 << SH) - 1), c >> SH), (NG, 2 * K))


@triton.jit
def pack(c, NG: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr):
    """codes [NG, G] (int32 in [0, 2^BITS)) -> bytes [NG, G*BITS//8], LSB first."""
    if BITS == 8:
        r = c.to(tl.uint8)
    elif BITS == 4:
        r = _pair(c, NG, G // 2, 4).to(tl.uint8)
    elif BITS == 2:
        r = _pair(_pair(c, NG, G // 2, 2), NG, G // 4, 4).to(tl.uint8)
    else:
        r = _pair(_pair(_pair(c, NG, G // 2, 1), NG, G // 4, 2), NG, G // 8, 4).to(tl.uint8)
    return r


@triton.jit
def unpack(b, NG: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr):
    """bytes [NG, G*BITS//8] -> codes [NG, G] int32."""
    bi = b.to(tl.int32)
    if BITS == 8:
        r = bi
    elif BITS == 4:
        r = _unpair(bi, NG, G // 2, 4)
    elif BITS == 2:
        r = _unpair(_unpair(bi, NG, G // 4, 4), NG, G // 2, 2)
    else:
        r = _unpair(_unpair(_unpair(bi, NG, G // 8, 4), NG, G // 4, 2), NG, G // 2, 1)
    return r


# ----------------------------------------------------------------------------- tiles
@triton.jit
def encode_tile(x, pay_ptr, p1_off, m0_ptr, m1_ptr, gmask, NG: tl.constexpr, G: tl.constexpr,
                KIND: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, C2: tl.constexpr):
    """Quantize x [NG, G] (fp32) and store it in the codec's chunk layout.

    pay_ptr: uint8 payload of this tile (for a code of two bit planes, int3 = 2 + 1 and
    int5 = 4 + 1 bits: its low plane; the high plane of the tile starts ``p1_off`` bytes
    further); m0_ptr/m1_ptr: uint16 meta arrays at this
    tile's first group; gmask [NG]: the groups that exist."""
    gi = tl.arange(0, NG)
    if KIND == 0:
        off = gi[:, None] * G + tl.arange(0, G)[None, :]
        tl.store(pay_ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + off,
                 bf16_bits(x).to(tl.uint16), mask=gmask[:, None])
    else:
        ok = tl.abs(x) <= 3.3895313892515355e38                       # False for NaN/Inf
        finite = tl.min(ok.to(tl.int32), axis=1) == 1
        xz = tl.where(finite[:, None], x, 0.0)
        if KIND == 1:
            hi = tl.max(xz, axis=1)
            m = round_down_bf16(tl.min(xz, axis=1)) + 0.0       # -0.0 -> +0.0, as the reference
            d = (0.5 * hi - 0.5 * m) * C2
            s = round_up_bf16(tl.maximum(d, 1.1754943508222875e-38))
            s = tl.where(hi > m, s, 0.0)
            r2 = tl.where(s > 0, tl.math.div_rn(tl.full(s.shape, 2.0, tl.float32),
                                                tl.where(s > 0, s, 1.0)), 0.0)
            u = (0.5 * xz - (0.5 * m)[:, None]) * r2[:, None]
            q = tl.minimum(tl.maximum(rint(u), 0.0), QMAX)
            codes = tl.where(finite[:, None], q, 0.0).to(tl.int32)
            meta0 = s
            meta1 = tl.where(finite, m, 0.0)
        else:
            a = round_up_bf16(tl.max(tl.abs(xz), axis=1))
            tiny = a < 5.421010862427522e-20                               # 2^-64
            e = tl.where(tiny, 1.8446744073709552e19, 1.0)
            ae = a * e
            r = tl.where(a > 0, tl.math.div_rn(tl.full(a.shape, QMAX, tl.float32),
                                               tl.where(a > 0, ae, 1.0)), 0.0)
            v = (xz * e[:, None]) * r[:, None]
            if KIND == 2:
                q = tl.minimum(tl.maximum(rint(v), -QMAX), QMAX)
                q = tl.where(finite[:, None], q, 0.0).to(tl.int32)
                if BITS == 8:
                    codes = q & 0xFF
                else:
                    codes = q + (1 << (BITS - 1))
            else:
                v = tl.minimum(tl.maximum(v, -448.0), 448.0)
                codes = tl.where(finite[:, None], e4m3_encode(v), 0)
            meta0 = a
            meta1 = a
        meta0 = tl.where(finite, meta0, float("nan"))
        if (BITS & (BITS - 1)) != 0:
            # two bit planes over the tile: [low P0 bits | the P1 bits above them]
            P1: tl.constexpr = BITS & -BITS
            P0: tl.constexpr = BITS - P1
            tl.static_assert((P0 & (P0 - 1)) == 0, "a code of more than two bit planes")
            off0 = gi[:, None] * (G * P0 // 8) + tl.arange(0, G * P0 // 8)[None, :]
            tl.store(pay_ptr + off0, pack(codes & ((1 << P0) - 1), NG, G, P0),
                     mask=gmask[:, None])
            off1 = p1_off + gi[:, None] * (G * P1 // 8) + tl.arange(0, G * P1 // 8)[None, :]
            tl.store(pay_ptr + off1, pack(codes >> P0, NG, G, P1), mask=gmask[:, None])
        else:
            PB: tl.constexpr = G * BITS // 8
            offp = gi[:, None] * PB + tl.arange(0, PB)[None, :]
            tl.store(pay_ptr + offp, pack(codes, NG, G, BITS), mask=gmask[:, None])
        tl.store(m0_ptr + gi, bf16_bits(meta0).to(tl.uint16), mask=gmask)
        if KIND == 1:
            tl.store(m1_ptr + gi, bf16_bits(meta1).to(tl.uint16), mask=gmask)


@triton.jit
def decode_tile(pay_ptr, p1_off, m0_ptr, m1_ptr, gmask, LIM: tl.constexpr, NG: tl.constexpr,
                G: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr):
    """Load and decode a tile stored by ``encode_tile``: fp32 [NG, G], clamped to +-LIM
    (NaN passes) like the reference's ``saturate``; the bf16 codec is not clamped."""
    gi = tl.arange(0, NG)
    if KIND == 0:
        off = gi[:, None] * G + tl.arange(0, G)[None, :]
        b = tl.load(pay_ptr.to(tl.pointer_type(tl.uint16), bitcast=True) + off,
                    mask=gmask[:, None], other=0, cache_modifier=".cg")
        y = bits_to_f32(b)
    else:
        if (BITS & (BITS - 1)) != 0:     # two bit planes, as encode_tile stores them
            P1: tl.constexpr = BITS & -BITS
            P0: tl.constexpr = BITS - P1
            off0 = gi[:, None] * (G * P0 // 8) + tl.arange(0, G * P0 // 8)[None, :]
            off1 = p1_off + gi[:, None] * (G * P1 // 8) + tl.arange(0, G * P1 // 8)[None, :]
            lo = tl.load(pay_ptr + off0, mask=gmask[:, None], other=0, cache_modifier=".cg")
            hb = tl.load(pay_ptr + off1, mask=gmask[:, None], other=0, cache_modifier=".cg")
            codes = unpack(lo, NG, G, P0) | (unpack(hb, NG, G, P1) << P0)
        else:
            PB: tl.constexpr = G * BITS // 8
            offp = gi[:, None] * PB + tl.arange(0, PB)[None, :]
            pb = tl.load(pay_ptr + offp, mask=gmask[:, None], other=0, cache_modifier=".cg")
            codes = unpack(pb, NG, G, BITS)
        meta0 = bits_to_f32(tl.load(m0_ptr + gi, mask=gmask, other=0, cache_modifier=".cg"))
        if KIND == 1:
            meta1 = bits_to_f32(tl.load(m1_ptr + gi, mask=gmask, other=0, cache_modifier=".cg"))
            q = codes.to(tl.float32)
            y = 2.0 * (q * (0.5 * meta0)[:, None] + (0.5 * meta1)[:, None])
        else:
            a = meta0
            tiny = a < 5.421010862427522e-20
            e = tl.where(tiny, 1.8446744073709552e19, 1.0)
            inv_e = tl.where(tiny, 5.421010862427522e-20, 1.0)
            if KIND == 2:
                if BITS == 8:
                    qi = codes.to(tl.int8).to(tl.int32)
                else:
                    qi = codes - (1 << (BITS - 1))
                q = qi.to(tl.float32)
                top = (qi == QMAX) | (qi == -QMAX)
            else:
                q = e4m3_decode(codes)
                top = tl.abs(q) == 448.0
            step = tl.math.div_rn(a * e, tl.full(a.shape, QMAX, tl.float32))
            y = (q * step[:, None]) * inv_e[:, None]
            y = tl.where(top, tl.where(q > 0, a[:, None], -a[:, None]), y)
        y = tl.where(y != y, y, tl.minimum(tl.maximum(y, -LIM), LIM))
    return y


@triton.jit
def cast_out(y, dtype: tl.constexpr):
    """fp32 -> output dtype, round to nearest even (integer path for bf16, see above)."""
    if dtype == tl.bfloat16:
        r = bf16_bits(y).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = y.to(dtype)
    return r


# ----------------------------------------------------------------------------- chunk kernels
@triton.jit
def _tile_ptrs(buf_ptr, row, t0, n, nbytes_row, KIND: tl.constexpr, BITS: tl.constexpr,
               G: tl.constexpr):
    """Pointers of the tile starting at value t0 of row ``row`` in the reference layout
    (and, for the two-plane codes int3 and int5, the distance from its plane-0 bytes to its
    plane-1 bytes)."""
    base = buf_ptr + row.to(tl.int64) * nbytes_row
    ngr = n // G
    p1_off = 0
    if KIND == 0:
        pay = base + t0 * 2
        m0 = base
        m1 = base
    else:
        if (BITS & (BITS - 1)) != 0:
            # two bit planes of P0 and P1 bits: plane 1 of the chunk starts at n*P0/8
            P1: tl.constexpr = BITS & -BITS
            P0: tl.constexpr = BITS - P1
            pay = base + (t0 * P0) // 8
            p1_off = (n * P0) // 8 + (t0 * P1) // 8 - (t0 * P0) // 8
        else:
            pay = base + (t0 * BITS) // 8
        meta = base + (n * BITS) // 8
        m0 = meta.to(tl.pointer_type(tl.uint16), bitcast=True) + t0 // G
        m1 = meta.to(tl.pointer_type(tl.uint16), bitcast=True) + ngr + t0 // G
    return pay, p1_off, m0, m1


@triton.jit
def _tile_of(n, TILE: tl.constexpr):
    """``(row, first value)`` of this program's tile. One flat grid axis: the second axis
    of a CUDA grid stops at 65535 blocks, which a 128 MB chunk of two-group tiles exceeds
    (seen on an H200 as "invalid argument" at 256 MB over 4 rows)."""
    pid = tl.program_id(0).to(tl.int64)
    tiles = tl.cdiv(n, TILE)
    return pid // tiles, (pid % tiles) * TILE


@triton.jit
def _load_row_tile(x_ptr, n, NG: tl.constexpr, G: tl.constexpr, ROT: tl.constexpr,
                   LOG2G: tl.constexpr, RSCALE):
    """This program's tile of whole groups: ``(row, t0, gmask, offs, x)``, x in fp32 and,
    for hadamard- codecs, already rotated group by group."""
    row, t0 = _tile_of(n, NG * G)
    gi = tl.arange(0, NG)
    gmask = (t0 + gi * G) < n
    offs = row.to(tl.int64) * n + t0 + gi[:, None] * G + tl.arange(0, G)[None, :]
    x = load_f32(x_ptr, offs, gmask[:, None])
    if ROT:
        x = maps.fwht_tile(x, NG, G, LOG2G, RSCALE)
    return row, t0, gmask, offs, x


@triton.jit
def _quantize_kernel(x_ptr, buf_ptr, n, nbytes_row, NG: tl.constexpr, G: tl.constexpr,
                     KIND: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr,
                     C2: tl.constexpr, ROT: tl.constexpr, LOG2G: tl.constexpr, RSCALE):
    row, t0, gmask, offs, x = _load_row_tile(x_ptr, n, NG, G, ROT, LOG2G, RSCALE)
    pay, p1, m0, m1 = _tile_ptrs(buf_ptr, row, t0, n, nbytes_row, KIND, BITS, G)
    encode_tile(x, pay, p1, m0, m1, gmask, NG, G, KIND, BITS, QMAX, C2)


@triton.jit
def _dequantize_kernel(buf_ptr, out_ptr, n, nbytes_row, rows_per_out, LIM: tl.constexpr,
                       NG: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr,
                       BITS: tl.constexpr, QMAX: tl.constexpr, SUM: tl.constexpr,
                       ROT: tl.constexpr, LOG2G: tl.constexpr, RSCALE):
    """SUM=False: out[r] = decode(buf[r]). SUM=True: out[o] = sum over the
    ``rows_per_out`` rows of group o, fp32, in row order (the all-reduce's fixed order).
    ROT: the result (the sum) is rotated back, unclamped."""
    o, t0 = _tile_of(n, NG * G)
    gi = tl.arange(0, NG)
    gmask = (t0 + gi * G) < n
    if SUM:
        pay, p1, m0, m1 = _tile_ptrs(buf_ptr, o * rows_per_out, t0, n, nbytes_row, KIND, BITS, G)
        acc = decode_tile(pay, p1, m0, m1, gmask, LIM, NG, G, KIND, BITS, QMAX)
        for r in range(1, rows_per_out):
            pay, p1, m0, m1 = _tile_ptrs(buf_ptr, o * rows_per_out + r, t0, n, nbytes_row,
                                         KIND, BITS, G)
            acc += decode_tile(pay, p1, m0, m1, gmask, LIM, NG, G, KIND, BITS, QMAX)
    else:
        pay, p1, m0, m1 = _tile_ptrs(buf_ptr, o, t0, n, nbytes_row, KIND, BITS, G)
        acc = decode_tile(pay, p1, m0, m1, gmask, LIM, NG, G, KIND, BITS, QMAX)
    if ROT:
        acc = maps.fwht_tile(acc, NG, G, LOG2G, RSCALE)
    offs = o.to(tl.int64) * n + t0 + gi[:, None] * G + tl.arange(0, G)[None, :]
    tl.store(out_ptr + offs, cast_out(acc, out_ptr.dtype.element_ty), mask=gmask[:, None])


@triton.jit
def _error_kernel(x_ptr, buf_ptr, out_ptr, n, nbytes_row, LIM: tl.constexpr,
                  NG: tl.constexpr, G: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
                  QMAX: tl.constexpr, ROT: tl.constexpr, LOG2G: tl.constexpr, RSCALE):
    """out[r] = nan_to_num(rot(decode(buf[r]) - rot(x[r]))): the quantization error of
    each row in the original basis, as ``Scheme.own_error`` computes it."""
    row, t0, gmask, offs, x = _load_row_tile(x_ptr, n, NG, G, ROT, LOG2G, RSCALE)
    pay, p1, m0, m1 = _tile_ptrs(buf_ptr, row, t0, n, nbytes_row, KIND, BITS, G)
    d = decode_tile(pay, p1, m0, m1, gmask, LIM, NG, G, KIND, BITS, QMAX) - x
    if ROT:
        d = maps.fwht_tile(d, NG, G, LOG2G, RSCALE)
    # torch.nan_to_num(d, 0, 0, 0): NaN and +-Inf (|d| above the fp32 maximum) to 0
    d = tl.where((d != d) | (tl.abs(d) > 3.4028234663852886e38), 0.0, d)
    tl.store(out_ptr + offs, d, mask=gmask[:, None])


def _tile_groups(kc: KernelCodec, n: int) -> int:
    """Groups per program: a fixed 2048-value tile (a short row masks its tail), so the
    compiled variant depends on the codec only, not on the row length."""
    return 2048 if kc.kind == KIND_BF16 else 2048 // kc.group


def _rotation(kc: KernelCodec, rot):
    """(ROT, LOG2G, RSCALE) kernel arguments for a rotation of ``rot`` values (None: none);
    the rotation group must be the codec's group (hadamard- codecs)."""
    check_rotation(kc, rot)
    log2g, rscale = geometry(rot)
    return {"ROT": rot is not None, "LOG2G": log2g, "RSCALE": rscale}


def quantize(kc: KernelCodec, x: torch.Tensor, rot=None) -> torch.Tensor:
    """The reference ``codec.encode(x)`` of the codec ``kc`` describes, on the GPU (or the
    interpreter): ``[..., n] -> [..., nbytes]``; with ``rot`` = the group size,
    ``codec.encode(fwht(x, rot))`` (comm/codecs/hadamard.py)."""
    rk = _rotation(kc, rot)
    x, out, rows, n, nb = quantize_buffers(kc, x)
    if out.numel() == 0:
        return out
    g = kc.group if kc.kind else 1
    ng = _tile_groups(kc, n)
    grid = (rows * -(-n // (ng * g)),)
    _quantize_kernel[grid](x, out, n, nb, NG=ng, G=g, **kc.constexprs(), **rk, **launch_opts())
    return out


def dequantize(kc: KernelCodec, buf: torch.Tensor, n: int, out_dtype=torch.float32,
               sum_rows: bool = False, rot=None) -> torch.Tensor:
    """``codec.decode(buf, n, out_dtype)``; with ``sum_rows`` the leading dim is summed in
    fp32 in order (rows 0, 1, ...): the all-reduce's reduction, one output row. With
    ``rot`` (fp32 output only) the result is ``fwht(result, rot)``, not clamped again."""
    rk = _rotation(kc, rot)
    buf, out, outs, per = dequantize_buffers(kc, buf, n, out_dtype, sum_rows, rot)
    if out.numel() == 0:
        return out
    nb, lim = kc.nbytes(n), out_limit(out_dtype)
    g = kc.group if kc.kind else 1
    ng = _tile_groups(kc, n)
    grid = (outs * -(-n // (ng * g)),)
    _dequantize_kernel[grid](buf, out, n, nb, per, LIM=lim, NG=ng, G=g, KIND=kc.kind,
                             BITS=kc.bits, QMAX=kc.qmax, SUM=sum_rows, **rk, **launch_opts())
    return out


def error_part(kc: KernelCodec, x: torch.Tensor, buf: torch.Tensor, rot=None) -> torch.Tensor:
    """fp32 ``nan_to_num(rot(codec.decode(buf) - rot(x)))`` for ``buf = quantize(kc, x,
    rot)``, ``x`` ``[rows, n]``: each row's quantization error in the original basis (the
    error part of ``Scheme.own_error``, bit for bit)."""
    rk = _rotation(kc, rot)
    x, buf, out, rows, n, nb = error_buffers(kc, x, buf)
    if out.numel() == 0:
        return out
    g = kc.group if kc.kind else 1
    ng = _tile_groups(kc, n)
    grid = (rows * -(-n // (ng * g)),)
    _error_kernel[grid](x, buf, out, n, nb, LIM=BF16_MAX, NG=ng, G=g, KIND=kc.kind,
                        BITS=kc.bits, QMAX=kc.qmax, **rk, **launch_opts())
    return out
