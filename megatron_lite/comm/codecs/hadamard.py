"""``hadamard-<codec>``: a block Hadamard rotation of every quantization group before a
group codec, undone after decoding (the rotation idea of QuaRot / QuIP#, applied to the
communicated partial sums).

Why. A group codec's step is set by the group's largest value; one large value in a group
of 128 coarsens the grid for the other 127. The normalised Hadamard transform
``H_G / sqrt(G)`` is orthogonal, so it preserves the group's energy while spreading any
single large value evenly over all G outputs: the rotated group is close to Gaussian,
its max/rms ratio drops (typically from 4-10 to about 3 at G = 128), and so does the
quantization error measured back in the original basis (the rotation is orthogonal, so
the error's energy is the same in both bases).

Two-step all-reduce in the rotated basis. Rotation is linear, so the sum of rotated
partial sums is the rotated sum: rank r rotates and encodes its chunks; rank j decodes
and sums in the *rotated* basis (fp32, rank order), re-encodes the sum without rotating
again; after the all-gather every rank decodes and applies the inverse rotation. Each
value is rotated once and unrotated once, whatever the TP size.

Definition (bit-exact reference; the byte layout is the inner codec's, docs/codecs.md)::

    rot(v)  for each group of G = group size values (G a power of two):
            fast Walsh-Hadamard transform, log2(G) butterfly stages, stage h = 1, 2, 4, ...
            pairs (a, b) = (v[i], v[i + h]) within blocks of 2h -> (a + b, a - b),
            then every value times fl32(1 / sqrt(G))        (H is symmetric: rot = rot^-1)
    encode  = inner.encode(rot(x))              x zero-padded exactly as the inner codec
    decode  = saturate(rot(inner.decode(buf, fp32)), out_dtype)

Bits per value are the inner codec's (the rotation needs no metadata). NaN/Inf: the
transform spreads a non-finite value over its whole group, which the inner codec then
decodes as NaN (its rule for non-finite groups); so do groups whose rotated values exceed
the bf16 range (inputs near 1e38).

Fused kernels. The rotation is a fixed linear map of each group, so the fused two-shot
kernel of the inner codec runs on the rotated values (:meth:`HadamardScheme.kernel_plan`):
it rotates each loaded tile of whole groups and rotates back after decoding, then
saturates (kernels/maps.py). The kernel sums in fp32 in rank order like the two-step
path, so the result equals this reference bit for bit (tests/test_kernels_interpret.py,
tests/gpu/test_fused_allreduce.py).
"""
from __future__ import annotations

import math

import torch

from megatron_lite.comm.codecs.base import (CodecError, CodecSpec, NoKernelError, Scheme,
                                            finite_only, saturate)
from megatron_lite.comm.codecs.group import WRAPPABLE, plain_scheme
from megatron_lite.comm.codecs.registry import GROUP, Entry, entry, register
from megatron_lite.kernels.config import KernelPlan

PREFIX = "hadamard-"


def fwht(x: torch.Tensor, group: int) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform of each group of ``group`` values along the
    last dim (fp32, fixed butterfly order; its own inverse)."""
    if group & (group - 1):
        raise CodecError(f"Hadamard rotation needs a power-of-two group, got {group}")
    lead, n = x.shape[:-1], x.shape[-1]
    if n % group:
        raise CodecError(f"length {n} is not a multiple of the group size {group}")
    y = x.float().reshape(-1, group)
    h = 1
    while h < group:
        v = y.view(-1, group // (2 * h), 2, h)
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        y = torch.stack([a + b, a - b], dim=2).reshape(-1, group)
        h *= 2
    scale = torch.tensor(1.0 / math.sqrt(group), dtype=torch.float32)
    return (y * scale).reshape(*lead, n)


class HadamardScheme(Scheme):
    """``hadamard-<inner>``: the inner group codec on block-rotated groups."""

    def __init__(self, cs: CodecSpec):
        if cs.group_size is None:
            raise CodecError(f"{cs.name} needs a group size")
        inner = plain_scheme(CodecSpec(cs.name[len(PREFIX):], cs.group_size))
        self.spec, self.name, self.group_size = str(cs), cs.name, cs.group_size
        self.inner = inner                 # chunking and the wire formats are the inner's
        self.rs, self.ag = inner.rs, inner.ag
        self.bits_per_value = inner.bits_per_value
        self.traits = inner.traits

    def chunk(self, x, world_size):
        return self.inner.chunk(x, world_size)

    def rs_encode(self, chunks, src):
        return self.rs.encode(fwht(chunks, self.group_size))

    def piece_quantum(self):
        return self.group_size            # the rotation stays inside a group

    def rs_decode(self, recv, chunk_id, c):
        return self.rs.decode(recv, c, torch.float32)          # stays in the rotated basis

    def ag_encode(self, acc, chunk_id):
        return self.ag.encode(acc)                             # acc is already rotated

    def ag_decode(self, gathered, c, out_dtype):
        y = self.ag.decode(gathered, c, torch.float32)
        return saturate(fwht(y, self.group_size), out_dtype)

    def finish(self, acc, out_dtype):
        """One-shot output of the fp32 sums ``acc`` (still rotated): unrotate, saturate."""
        return saturate(fwht(acc, self.group_size), out_dtype)

    def own_error(self, chunks, acc, rank):
        """Errors are made in the rotated basis; the rotation is its own inverse, so
        rotating them back gives each rank's part in the original basis."""
        g, c = self.group_size, chunks.shape[-1]
        xr = fwht(chunks.float(), g)
        err = fwht(self.rs.decode(self.rs.encode(xr), c, torch.float32) - xr, g).clone()
        if acc is not None:
            err[rank] += fwht(self.ag.decode(self.ag.encode(acc), c, torch.float32) - acc, g)
        return finite_only(err)

    def kernel_plan(self, x):
        """The inner codec's kernels between a rotation of ``group`` values and its
        inverse (kernels/maps.py)."""
        kr, ka = self.rs.kernel_codec(), self.ag.kernel_codec()
        if kr is None or ka is None:
            raise NoKernelError(f"no Triton kernel for codec {self.inner.spec!r} inside "
                                f"{self.spec}")
        return KernelPlan(kr, ka, rot=self.group_size)

    # Error bounds in the original basis: an output value is a unit-norm combination of
    # its group's rotated errors, so |e_i| <= ||e_rot||_2 over the group (Cauchy-Schwarz);
    # plus fp32 rounding of the two transforms.
    def _bound(self, codec, rotated: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
        g = self.group_size
        eb = codec.error_bound(rotated)
        lead, n = eb.shape[:-1], eb.shape[-1]
        l2 = eb.reshape(-1, g).pow(2).sum(-1).sqrt()
        xn = orig.float().reshape(-1, g).pow(2).sum(-1).sqrt()
        tot = l2 + xn * (2.0 * math.log2(g) + 2) * 2.0 ** -24
        return tot.unsqueeze(-1).expand(-1, g).reshape(*lead, n)

    def rs_error_bound(self, chunks, src):
        return self._bound(self.rs, fwht(chunks, self.group_size), chunks)

    def ag_error_bound(self, acc, chunk_id):
        return self._bound(self.ag, acc, acc)


def _bits(cs: CodecSpec) -> float:
    return plain_scheme(CodecSpec(cs.name[len(PREFIX):], cs.group_size)).bits_per_value


for _inner in WRAPPABLE:
    register(Entry(PREFIX + _inner, "hadamard", lambda cs, ctx: HadamardScheme(cs), _bits,
                   group=GROUP, traits=entry(_inner).traits))
# The rotated names the weighted- family wraps.
ROTATED = tuple(PREFIX + n for n in WRAPPABLE)
