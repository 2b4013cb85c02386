"""``outlier-int4``: static outlier channels in bf16, the rest int4 (Dong et al., arXiv
2411.07942), as a two-step all-reduce scheme, plus the calibration file it reads.

Channels. A message is ``[..., H]`` (H = hidden size); its T = numel / H rows are tokens,
and channel = index % H. The calibration names, per site, ``k_eff = W * kw`` outlier
channels (k rounded up to a multiple of the TP size W, so every rank's chunk holds the
same number). With ``nn = H/W - kw`` normal channels per chunk, a static permutation
gives chunk j the channels::

    perm[j*H/W : (j+1)*H/W] = normal[j*nn : (j+1)*nn] ++ outlier[j*kw : (j+1)*kw]

(``normal`` and ``outlier`` each ascending). The two-step all-reduce moves chunk j of
every token to rank j, so each chunk knows its channels, and all chunks have equal size.

Chunk byte layout (chunk j, T tokens, values token-major; P = T*nn rounded up to a
multiple of 32 (static) or of G (dynamic), zero-padded)::

    static  (outlier-int4):    [P/2 bytes int4 codes][T*kw bf16 outlier values]
    dynamic (outlier-int4:G):  [int4-sym:G encoding of the P normal values
                                (codecs.py layout: P/2 code bytes, P/G bf16 bounds)]
                               [T*kw bf16 outlier values]

Static codes: value ``t*nn + i`` is token t, i-th normal channel of the chunk, packed like
int4 (low nibble first), offset binary ``q + 8``, ``q = clamp(rint(x * fl(1/s_c)), -7, 7)``
with the calibrated step ``s_c`` (fp32; ``1/s_c`` taken as 0 when ``s_c == 0``); decode
``q * s_c``. Code 0 (q = -8, never produced for finite x) marks a non-finite input and
decodes to NaN; outlier channels carry NaN/Inf through bf16 unchanged. Steps differ per
stage: the reduce-scatter encodes rank r's partial sums with ``rs_scale[r, c]``, the
all-gather encodes the reduced sums with ``ag_scale[c]``.

Bits per value, all on-the-wire bytes counted (indices and static scales travel in the
calibration file, not on the wire, as in the paper): static ``4 + 12*kw/(H/W)``, which
is 4.1875 at k = H/64; dynamic ``(4 + 16/G)*nn/(H/W) + 16*kw/(H/W)``; plus the padding
of the normal stream to P values.

The calibration file (outlier indices and static steps per site) is comm/calibration.py.
"""
from __future__ import annotations

import math

import torch

from megatron_lite.comm.codecs.base import (BF16_MAX, CodecError, CodecSpec, Scheme, Traits,
                                            finite_only, non_finite_bound, pack_bits,
                                            saturate, unpack_bits)
from megatron_lite.comm.codecs.group import GroupCodec
from megatron_lite.comm.codecs.registry import OPTIONAL_GROUP, BuildContext, Entry, register


def nominal_bits(cs: CodecSpec, k_ratio: float = 1 / 64, tp: int = 1) -> float:
    """bits/value at k = k_ratio * hidden with no padding (the figure quoted in tables)."""
    kw_frac = k_ratio
    if cs.group_size is None:
        return 4.0 + 12.0 * kw_frac
    return (4.0 + 16.0 / cs.group_size) * (1 - kw_frac) + 16.0 * kw_frac


class OutlierScheme(Scheme):
    """Two-step scheme for one site: chunk by permuted channels, int4 + bf16 outliers."""

    def __init__(self, cs: CodecSpec, calib, site: str):
        sc = calib.site(site)
        self.spec, self.site, self.calib = str(cs), site, calib
        self.name, self.group_size = cs.name, cs.group_size
        self.tp, self.hidden, self.kw = calib.tp, calib.hidden, calib.k_per_rank
        self.hw = self.hidden // self.tp
        self.nn = self.hw - self.kw
        is_out = torch.zeros(self.hidden, dtype=torch.bool)
        is_out[sc.outlier_idx] = True
        normal = torch.nonzero(~is_out).flatten()
        outl = sc.outlier_idx
        self.perm = torch.cat([torch.cat([normal[j * self.nn:(j + 1) * self.nn],
                                          outl[j * self.kw:(j + 1) * self.kw]])
                               for j in range(self.tp)])
        # Static steps per chunk in the chunk's channel order (normal channels only).
        pc = self.perm.view(self.tp, self.hw)[:, : self.nn]
        # rs_step[src, chunk, i], ag_step[chunk, i]
        self.rs_step = torch.stack([sc.rs_scale[r][pc] for r in range(self.tp)])
        self.ag_step = sc.ag_scale[pc]
        self.dyn = None if cs.group_size is None else GroupCodec("int4-sym", 4, "sym",
                                                                 cs.group_size)
        self.pad_to = 32 if self.dyn is None else cs.group_size
        self.bits_per_value = (nominal_bits(cs, self.kw / self.hw))
        self.traits = Traits(calibrated=True)

    # -- chunking ----------------------------------------------------------------------
    def chunk(self, x: torch.Tensor, world_size: int):
        if world_size != self.tp:
            raise CodecError(f"outlier-int4 calibration is for TP {self.tp}, not {world_size}")
        if x.shape[-1] != self.hidden:
            raise CodecError(f"outlier-int4 at {self.site}: message last dim {x.shape[-1]} "
                             f"!= calibrated hidden size {self.hidden}")
        shape, t = x.shape, x.numel() // self.hidden
        perm = self.perm.to(x.device)
        xp = x.reshape(t, self.hidden).index_select(1, perm)
        chunks = xp.view(t, self.tp, self.hw).transpose(0, 1).reshape(self.tp, t * self.hw)

        def restore(y: torch.Tensor) -> torch.Tensor:
            yp = y.view(self.tp, t, self.hw).transpose(0, 1).reshape(t, self.hidden)
            out = torch.empty_like(yp)
            out[:, perm] = yp
            return out.reshape(shape)
        return chunks, restore

    # -- one chunk -----------------------------------------------------------------------
    def _npad(self, t: int) -> int:
        return -(-t * self.nn // self.pad_to) * self.pad_to

    def chunk_nbytes(self, n: int) -> int:
        t = n // self.hw
        p = self._npad(t)
        body = p // 2 if self.dyn is None else self.dyn.encoded_nbytes(p)
        return body + 2 * t * self.kw

    def encode_chunk(self, xc: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """One chunk ``[T*hw]`` (channel-permuted) -> bytes; ``step`` [nn] static steps."""
        t = xc.numel() // self.hw
        x = xc.float().view(t, self.hw)
        normal, outl = x[:, : self.nn], x[:, self.nn:]
        p = self._npad(t)
        flat = torch.zeros(p, dtype=torch.float32, device=x.device)
        if self.dyn is not None:
            flat[: t * self.nn] = normal.reshape(-1)
            body = self.dyn.encode(flat)
        else:
            step = step.to(x.device)
            rinv = torch.where(step > 0, torch.ones_like(step)
                               / torch.where(step > 0, step, torch.ones_like(step)),
                               torch.zeros_like(step))
            q = torch.round(normal * rinv).clamp(-7, 7) + 8
            q = torch.where(normal.abs() <= BF16_MAX, q, torch.zeros_like(q))  # 0 = NaN mark
            codes = torch.zeros(p, dtype=torch.int32, device=x.device)
            codes[: t * self.nn] = q.reshape(-1).to(torch.int32)
            body = pack_bits(codes, 4)
        tail = outl.reshape(-1).to(torch.bfloat16).view(torch.uint8)
        return torch.cat([body, tail])

    def decode_chunk(self, buf: torch.Tensor, n: int, step: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
        t = n // self.hw
        p = self._npad(t)
        nbody = self.chunk_nbytes(n) - 2 * t * self.kw
        if self.dyn is not None:
            normal = self.dyn.decode(buf[:nbody], p, torch.float32)[: t * self.nn]
        else:
            codes = unpack_bits(buf[:nbody], 4, p)[: t * self.nn].view(t, self.nn)
            normal = (codes - 8).float() * step.to(buf.device)
            normal = torch.where(codes == 0, torch.full_like(normal, math.nan), normal)
        outl = buf[nbody:].contiguous().view(torch.bfloat16).float()
        y = torch.cat([normal.reshape(t, self.nn), outl.view(t, self.kw)], 1)
        # Only bf16 outlier values can be Inf here (int4 codes decode to finite or NaN).
        return saturate(y.reshape(-1), out_dtype, keep_inf=True)

    def chunk_error_bound(self, xc: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """Per-element bound on |decode(encode(xc)) - xc| (fp32 output)."""
        t = xc.numel() // self.hw
        x = xc.float().view(t, self.hw)
        normal, outl = x[:, : self.nn], x[:, self.nn:]
        if self.dyn is not None:
            p = self._npad(t)
            flat = torch.zeros(p, dtype=torch.float32, device=x.device)
            flat[: t * self.nn] = normal.reshape(-1)
            eb_n = self.dyn.error_bound(flat)[: t * self.nn].view(t, self.nn)
        else:
            s = step.to(x.device)
            clip = (normal.abs() - 7 * s).clamp(min=0)
            eb_n = torch.maximum(s * (0.5 + 2.0 ** -10), clip + s * 2.0 ** -10)
            eb_n = eb_n + normal.abs() * 2.0 ** -22 + 2.0 ** -148
            eb_n = non_finite_bound(eb_n, normal.abs() <= BF16_MAX)
        eb_o = outl.abs() * 2.0 ** -8 + 2.0 ** -134
        eb_o = non_finite_bound(eb_o, outl.abs() <= BF16_MAX)
        return torch.cat([eb_n, eb_o], 1).reshape(-1)

    # -- the Scheme stages (comm/codecs/base.py) ------------------------------------------
    def rs_encode(self, chunks, src):
        return torch.stack([self.encode_chunk(chunks[j], self.rs_step[src, j])
                            for j in range(self.tp)])

    def rs_decode(self, recv, chunk_id, c):
        return torch.stack([self.decode_chunk(recv[r], c, self.rs_step[r, chunk_id], torch.float32)
                            for r in range(self.tp)])

    def ag_encode(self, acc, chunk_id):
        return self.encode_chunk(acc, self.ag_step[chunk_id])

    def ag_decode(self, gathered, c, out_dtype):
        return torch.stack([self.decode_chunk(gathered[j], c, self.ag_step[j], out_dtype)
                            for j in range(self.tp)])

    def finish(self, acc, out_dtype):
        """One-shot output of the fp32 sums ``acc`` [W, c], saturated as ``decode_chunk``."""
        return saturate(acc, out_dtype, keep_inf=True)

    def own_error(self, chunks, acc, rank):
        c = chunks.shape[-1]
        x = chunks.float()
        err = torch.stack([self.decode_chunk(self.encode_chunk(x[j], self.rs_step[rank, j]), c,
                                             self.rs_step[rank, j], torch.float32) - x[j]
                           for j in range(x.shape[0])])
        if acc is not None:
            st = self.ag_step[rank]
            err[rank] += self.decode_chunk(self.encode_chunk(acc, st), c, st, torch.float32) - acc
        return finite_only(err)

    def rs_error_bound(self, chunks, src):
        return torch.stack([self.chunk_error_bound(chunks[j], self.rs_step[src, j])
                            for j in range(self.tp)])

    def ag_error_bound(self, acc, chunk_id):
        return self.chunk_error_bound(acc, self.ag_step[chunk_id])

    def __repr__(self) -> str:
        return f"<codec {self.spec} at {self.site}: {self.bits_per_value:.4g} bits/value>"


def _build(cs: CodecSpec, ctx: BuildContext) -> OutlierScheme:
    return OutlierScheme(cs, ctx.calibration, ctx.site)


register(Entry("outlier-int4", "outlier", _build, nominal_bits, group=OPTIONAL_GROUP,
               traits=Traits(calibrated=True)))
