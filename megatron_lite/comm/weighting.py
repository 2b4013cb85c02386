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
:func:`channel_statistics`) and stored in the calibration file; the bytes on the wire
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
unscaling (:meth:`WeightedScheme.kernel_maps`, kernels/maps.py), equal to this reference
bit for bit.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from megatron_lite.comm.codecs import CodecError, CodecSpec, get_codec, saturate

PREFIX = "weighted-"
EXPONENTS = (0.25, 0.5)          # (Fisher, RMS): the optimum derived in the module docstring
# Channels that never carry signal (sigma = 0) or never matter (F = 0) would get an
# infinite or zero scale; clamp both statistics to this fraction of their median first,
# then keep the scales within +-SCALE_RANGE of their geometric mean (2^20 keeps x * s and
# its inverse far from fp32 overflow and denormals for any bf16-range input).
FLOOR = 1e-6
SCALE_RANGE = 2.0 ** 20


def is_weighted(name: str) -> bool:
    return str(name).startswith(PREFIX)


def inner_name(name: str) -> str:
    return str(name)[len(PREFIX):]


def channel_scales(rms: torch.Tensor, fisher: torch.Tensor,
                   exponents: Tuple[float, float] = EXPONENTS) -> torch.Tensor:
    """fp32 ``[H]`` scales ``s_c = F_c^a / sigma_c^b`` (module docstring), normalised to a
    geometric mean of 1. Inputs are non-negative ``[H]`` statistics of one site."""
    a, b = (float(e) for e in exponents)
    r, f = rms.double(), fisher.double()
    if r.dim() != 1 or r.shape != f.shape:
        raise CodecError(f"rms and fisher must be equal 1-D tensors, got {tuple(r.shape)} "
                         f"and {tuple(f.shape)}")
    if not (torch.isfinite(r).all() and torch.isfinite(f).all()) or (r < 0).any() or (f < 0).any():
        raise CodecError("channel statistics must be finite and non-negative")

    def floored(v):
        med = v.median()
        floor = (med if med > 0 else v.max().clamp_min(1e-30)) * FLOOR
        return v.clamp_min(float(floor))
    log_s = a * floored(f).log() - b * floored(r).log()
    log_s = log_s - log_s.mean()
    lim = math.log(SCALE_RANGE)
    return log_s.clamp(-lim, lim).exp().float()


class WeightedScheme:
    """Two-step scheme (comm/allreduce.py interface) of ``weighted-<inner>`` at one site."""

    def __init__(self, cs: CodecSpec, scale: torch.Tensor):
        from megatron_lite.comm.allreduce import scheme_for
        inner_cs = CodecSpec(inner_name(cs.name), cs.group_size)
        if is_weighted(inner_cs.name) or inner_cs.name.startswith("outlier-"):
            raise CodecError(f"{cs.name}: weighting applies to plain and hadamard- codecs")
        self.inner = scheme_for(get_codec(inner_cs))
        self.spec, self.name, self.group_size = str(cs), cs.name, cs.group_size
        self.bits_per_value = self.inner.bits_per_value
        # the plain codec fused kernels run (kernel_maps): hadamard-'s, or the GroupScheme's
        self.plain = getattr(self.inner, "plain", None) or self.inner.codec
        if scale.dim() != 1 or not torch.isfinite(scale).all() or (scale <= 0).any():
            raise CodecError(f"{cs.name}: channel scales must be a finite positive 1-D tensor")
        self.scale = scale.float().contiguous()
        self._dev = {}

    def _s(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.scale.numel():
            raise CodecError(f"{self.name}: message has {x.shape[-1]} channels, the "
                             f"calibration {self.scale.numel()}")
        if x.device not in self._dev:
            self._dev[x.device] = self.scale.to(x.device)
        return self._dev[x.device]

    def chunk(self, x, world_size):
        s = self._s(x)
        chunks, restore = self.inner.chunk(x.float() * s, world_size)
        dtype = x.dtype

        def unscale(y: torch.Tensor) -> torch.Tensor:
            return saturate(restore(y) / s, dtype)
        return chunks, unscale

    def kernel_maps(self, x: torch.Tensor):
        """``(group, scale, codec)`` for fused kernels: the plain ``codec`` between the
        scaling (and, for ``weighted-hadamard-``, a rotation of ``group`` values) and its
        inverse; ``scale`` on ``x``'s device (checked against ``x``'s channels)."""
        maps = getattr(self.inner, "kernel_maps", None)
        group = maps(x)[0] if maps is not None else None   # hadamard-: rotation inside
        return group, self._s(x), self.plain

    def rs_encode(self, chunks, src):
        return self.inner.rs_encode(chunks, src)

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

    # Bounds in the scaled domain (the inner scheme's); two_step's caller divides by s.
    def rs_error_bound(self, chunks, src):
        return self.inner.rs_error_bound(chunks, src)

    def ag_error_bound(self, acc, chunk_id):
        return self.inner.ag_error_bound(acc, chunk_id)

    def __repr__(self) -> str:
        return f"<codec {self.spec}: {self.bits_per_value:g} bits/value, static channel scales>"


def weighted_codec(cs: CodecSpec, calibration, site: Optional[str]) -> WeightedScheme:
    """The scheme of ``weighted-<inner>`` at ``site``, with the calibration's scales."""
    from megatron_lite.comm.outlier import CalibrationError, load_calibration
    if calibration is None or site is None:
        raise CodecError(f"{cs.name} needs a calibration file with channel scales "
                         "(--calibration FILE from tools/calibrate.py) and a site")
    calib = load_calibration(calibration) if isinstance(calibration, str) else calibration
    sc = calib.site(site).channel_scale
    if sc is None:
        raise CalibrationError(f"calibration has no channel scales for site {site!r}: rerun "
                               "tools/calibrate.py (with --scale-seqs > 0)")
    return WeightedScheme(cs, sc)


# ----------------------------------------------------------------------------- statistics
def channel_statistics(model, batches: Iterable[torch.Tensor], progress=None
                       ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor], int]:
    """Per-site RMS and diagonal Fisher of every row-parallel output of a TP-1 model.

    ``model``: a :class:`~megatron_lite.models.decoder.Transformer` built at TP 1 (its
    row-parallel outputs are the reduced sums). ``batches``: ``[B, T]`` token tensors.
    Returns ``(rms, fisher, tokens)``: for each site an fp32 ``[H]`` vector,
    ``rms_c = sqrt(mean y_c^2)`` and ``F_c = mean (dNLL/dy_c)^2`` over every position that
    predicts a next token, NLL being the summed NLL of the position's sequence: noise at
    position t changes the prediction at t and, through attention, every later one, and
    the gradient of the summed NLL at t is exactly that total effect.
    """
    from megatron_lite.inference.kv_cache import KVCache
    from megatron_lite.tensor_parallel.layers import RowParallelLinear
    if model.group.world_size != 1:
        raise ValueError("channel_statistics needs the model at TP 1")
    outs: Dict[str, torch.Tensor] = {}
    hooks = []
    for m in model.modules():
        if isinstance(m, RowParallelLinear) and m.site:
            def keep(_mod, _inp, out, site=m.site):
                # The weights are frozen, so nothing upstream carries a graph: add a zero
                # leaf per site and read dNLL/dy as its gradient (every later path counted).
                probe = torch.zeros_like(out, requires_grad=True)
                outs[site] = (out.detach(), probe)
                return out + probe
            hooks.append(m.register_forward_hook(keep))
    device = next(model.parameters()).device
    sq: Dict[str, torch.Tensor] = {}
    fi: Dict[str, torch.Tensor] = {}
    n = 0
    try:
        for ids in batches:
            ids = torch.as_tensor(ids, dtype=torch.long, device=device)
            B, T = ids.shape
            cache = KVCache(model.cfg, 1, B, T, torch.float32, ids.device)
            pos = torch.arange(T, device=ids.device).expand(B, T)
            with torch.enable_grad():
                logits = model(ids, pos, cache.k, cache.v, kv_len=T).float()
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                    reduction="sum")
                nll.backward()
            for site, (y, probe) in outs.items():
                # rows t < T-1 only: the last position predicts nothing here, so its
                # gradient is zero and its value would dilute the RMS with an unscored row.
                yv = y[:, :-1].double().reshape(-1, y.shape[-1])
                gv = probe.grad[:, :-1].double().reshape(-1, y.shape[-1])
                sq[site] = sq.get(site, 0) + yv.pow(2).sum(0)
                fi[site] = fi.get(site, 0) + gv.pow(2).sum(0)
            outs.clear()
            n += B * (T - 1)
            if progress is not None:
                progress(B)
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise ValueError("no tokens to measure channel statistics on")
    rms = {s: (v / n).sqrt().float().cpu() for s, v in sq.items()}
    fisher = {s: (v / n).float().cpu() for s, v in fi.items()}
    return rms, fisher, n


def scales_from_statistics(rms: Dict[str, torch.Tensor], fisher: Dict[str, torch.Tensor],
                           sites: Optional[Sequence[str]] = None,
                           exponents: Tuple[float, float] = EXPONENTS) -> Dict[str, torch.Tensor]:
    """:func:`channel_scales` of every site (or of ``sites``)."""
    return {s: channel_scales(rms[s], fisher[s], exponents) for s in (sites or sorted(rms))}
