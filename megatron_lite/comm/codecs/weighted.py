"""``weighted-<codec>``: static per-channel scales, chosen from measured loss sensitivity,
applied before a group codec and undone after it (noise shaping of the TP all-reduce).

Why. A group codec adds roughly white noise of the same variance to every channel of a
group, with a step set by the group's magnitude. The channels of a row-parallel output
are not equally important: what the model loses is, to second order, the noise weighted
by the diagonal Fisher information ``F_c = E[(dNLL/dy_c)^2]`` of the reduced output ``y``
(the curvature of the loss; the same approximation as Optimal Brain Surgeon and the
Fisher-weighted weight quantizers, here applied to communicated activations). Scaling
channel c by ``s_c`` before the codec and by ``1/s_c`` after it moves noise from
important channels to unimportant ones. With ``sigma_c`` the channel's RMS, a group's step
is proportional to ``sqrt(sum_c s_c^2 sigma_c^2)`` (exactly so after a Hadamard rotation,
which makes every rotated value carry the group's energy), and the expected loss is::

    cost ~ (sum_c s_c^2 sigma_c^2) * (sum_c F_c / s_c^2)      per group
         >= (sum_c sqrt(F_c) * sigma_c)^2                      (Cauchy-Schwarz)

with equality at ``s_c^2 ~ sqrt(F_c) / sigma_c``, i.e. ``s_c = F_c^(1/4) / sigma_c^(1/2)``
(``exponents = (0.25, 0.5)``). Against ``s = 1`` this gains
``mean(sigma^2) * mean(F) / mean(sqrt(F) * sigma)^2``: large when a few channels are huge
(Gemma 3's massive activations) or the sensitivity is uneven. docs/accuracy.md measures it.

Static and free on the wire. Scales are computed once per model (``tools/calibrate.py``,
``megatron_lite.lab.calibration.channel_statistics``) and stored in the calibration file; the bytes on the wire
are exactly the inner codec's (``bits_per_value`` unchanged). The scaling is linear, so
the two-step all-reduce of ``x * s`` is ``s *`` the two-step all-reduce of ``x``: every rank
scales its partial sum, the scheme runs unchanged, and the decoded sum is divided by
``s``. The scales depend on the model, not on the TP size (``F`` and ``sigma`` are
measured on the reduced output at TP 1).

Definition (bit-exact reference)::

    encode side  xs = fl32(x) * s          s: fp32 [H], broadcast on the last dim
                 the inner scheme (GroupScheme or HadamardScheme) runs on xs
    decode side  y = saturate(inner_decode_fp32 / s, out_dtype)

Non-finite inputs follow the inner codec (a non-finite value poisons its group, which
decodes as NaN). Fused kernels run the inner plain codec between the scaling and the
unscaling (:meth:`WeightedScheme.kernel_plan`, kernels/maps.py), equal to this reference
bit for bit.
"""
from __future__ import annotations

import dataclasses

import torch

from megatron_lite.comm.calibration import CalibrationError
from megatron_lite.comm.codecs.base import CodecError, CodecSpec, Scheme, saturate
from megatron_lite.comm.codecs.group import WRAPPABLE
from megatron_lite.comm.codecs.hadamard import ROTATED
from megatron_lite.comm.codecs.registry import (GROUP, BuildContext, Entry, entry, get_scheme,
                                                register)

PREFIX = "weighted-"
SCALE_RANGE = (2.0 ** -64, 2.0 ** 64)
NAMES = tuple(PREFIX + n for n in WRAPPABLE + ROTATED)


class WeightedScheme(Scheme):
    """``weighted-<inner>`` at one site: the inner scheme (plain or ``hadamard-``) on
    channels scaled by ``scale`` [H]."""

    def __init__(self, cs: CodecSpec, scale: torch.Tensor):
        if cs.name not in NAMES:
            raise CodecError(f"{cs.name}: weighting applies to plain and hadamard- codecs")
        self.inner: Scheme = get_scheme(CodecSpec(cs.name[len(PREFIX):], cs.group_size))
        self.spec, self.name, self.group_size = str(cs), cs.name, cs.group_size
        self.bits_per_value = self.inner.bits_per_value
        self.traits = dataclasses.replace(self.inner.traits, calibrated=True)
        if scale.dim() != 1 or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise CodecError(f"{cs.name}: channel scales must be a finite positive 1-D tensor")
        self.scale = scale.float().contiguous()
        # The CUDA kernels restore by the reciprocals (csrc/codec_weighted.cuh's Unscale, exact
        # only while s and 1/s are normal fp32 numbers); calibrated scales are near 1.
        if (self.scale < SCALE_RANGE[0]).any() or (self.scale > SCALE_RANGE[1]).any():
            raise CodecError(f"{cs.name}: channel scales must lie within [2^-64, 2^64], got "
                             f"{self.scale.min().item():.3g} .. {self.scale.max().item():.3g}")
        # fl32(1/s), correctly rounded: fp64's division rounded to fp32 is (double rounding
        # is innocuous for a quotient when the wider format has 2p + 2 bits or more: 53 >=
        # 2 * 24 + 2; S. Figueroa, "When is double rounding innocuous?", SIGNUM 1995). A
        # tensor by tensor division: `1.0 / t` is a reciprocal times 1 (docs/codecs.md).
        s64 = self.scale.double()
        self.inv_scale = (torch.ones_like(s64) / s64).float()
        self._dev = {}

    def _scales(self, x: torch.Tensor):
        """(scale, inv_scale) on ``x``'s device, checked against its channels."""
        if x.shape[-1] != self.scale.numel():
            raise CodecError(f"{self.name}: message has {x.shape[-1]} channels, the "
                             f"calibration {self.scale.numel()}")
        if x.device not in self._dev:
            self._dev[x.device] = (self.scale.to(x.device), self.inv_scale.to(x.device))
        return self._dev[x.device]

    def chunk(self, x, world_size):
        s, _ = self._scales(x)
        chunks, restore = self.inner.chunk(x.float() * s, world_size)
        dtype = x.dtype

        def unscale(y: torch.Tensor) -> torch.Tensor:
            return saturate(restore(y) / s, dtype)
        return chunks, unscale

    def rs_encode(self, chunks, src):
        return self.inner.rs_encode(chunks, src)

    def piece_quantum(self):
        return self.inner.piece_quantum()  # ``chunk`` scaled the channels already

    def rs_decode(self, recv, chunk_id, c):
        return self.inner.rs_decode(recv, chunk_id, c)

    def ag_encode(self, acc, chunk_id):
        return self.inner.ag_encode(acc, chunk_id)

    def ag_decode(self, gathered, c, out_dtype):
        # fp32 here; ``chunk``'s restore divides by s and only then rounds to out_dtype.
        return self.inner.ag_decode(gathered, c, torch.float32)

    def finish(self, acc, out_dtype):
        # fp32 here, as ag_decode: ``chunk``'s restore unscales, then rounds
        return self.inner.finish(acc, torch.float32)

    def own_error(self, chunks, acc, rank):
        # chunks and acc are in the scaled domain; ``chunk``'s restore unscales the error
        return self.inner.own_error(chunks, acc, rank)

    def kernel_plan(self, x):
        """The inner scheme's kernels (with its rotation, for ``weighted-hadamard-``)
        between the scaling and its inverse; ``scale`` on ``x``'s device, checked against
        ``x``'s channels, and their reciprocals (``KernelPlan.inv_scale``)."""
        s, inv = self._scales(x)
        return dataclasses.replace(self.inner.kernel_plan(x), scale=s, inv_scale=inv)

    # Bounds in the scaled domain (the inner scheme's); the caller divides by s.
    def rs_error_bound(self, chunks, src):
        return self.inner.rs_error_bound(chunks, src)

    def ag_error_bound(self, acc, chunk_id):
        return self.inner.ag_error_bound(acc, chunk_id)

    def __repr__(self) -> str:
        return f"<codec {self.spec}: {self.bits_per_value:g} bits/value, static channel scales>"


def _build(cs: CodecSpec, ctx: BuildContext) -> WeightedScheme:
    sc = ctx.calibration.site(ctx.site).channel_scale
    if sc is None:
        raise CalibrationError(f"calibration has no channel scales for site {ctx.site!r}: "
                               "rerun tools/calibrate.py (with --scale-seqs > 0)")
    return WeightedScheme(cs, sc)


for _name in NAMES:
    _e = entry(_name[len(PREFIX):])
    register(Entry(_name, "weighted", _build,
                   lambda cs, _b=_e.bits: _b(CodecSpec(cs.name[len(PREFIX):], cs.group_size)),
                   group=GROUP, traits=dataclasses.replace(_e.traits, calibrated=True)))
