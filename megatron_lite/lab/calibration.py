"""Calibration statistics: what ``tools/calibrate.py`` measures to write a calibration file
(the file format is megatron_lite/comm/calibration.py).

* ``outlier-int4`` (Dong et al., arXiv 2411.07942): :class:`RecordingCommunicator` wraps a
  rank's communicator; every ``all_reduce(x, site)`` the model issues passes through it,
  so it sees exactly what that rank would put on the wire: its partial sum ``x``
  ``[..., H]`` (before the reduce) and the reduced sum (after). No layer is touched. Per
  site it keeps, for each channel c (the last dim):

  - ``rs_min[r, c]``, ``rs_max[r, c]``: EMA over sequences of rank r's per-sequence min /
    max of its partial sums (what the reduce-scatter step quantizes);
  - ``ag_min[c]``, ``ag_max[c]``: the same for the reduced sums (what the all-gather step
    requantizes).

  EMA: the first sequence sets the value, then ``v <- decay * v + (1 - decay) * v_seq``
  for each later sequence, in order. The update is per *sequence* (dim 0 of a
  ``[B, T, H]`` message), so the result does not depend on how sequences are batched.
  Messages of another rank (in a real multi-process run) are merged with
  :meth:`ChannelStats.merge_ranks`. :func:`build_calibration` turns them into outlier
  channels and static steps. The recorder passes the uncompressed sum through:
  statistics describe the model with exact communication.

* ``weighted-`` codecs (comm/codecs/weighted.py derives the optimum):
  :func:`channel_statistics` measures each site's channel RMS and diagonal Fisher on a
  TP-1 model, :func:`channel_scales` turns them into ``s_c = F_c^(1/4) / sigma_c^(1/2)``.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

from megatron_lite.comm.calibration import Calibration, CalibrationError, SiteCalibration
from megatron_lite.comm.codecs import CodecError
from megatron_lite.comm.communicator import Communicator, WrappingCommunicator

# Exponents (Fisher, RMS) of the weighted- codecs' channel scales: the optimum derived in
# comm/codecs/weighted.py.
EXPONENTS = (0.25, 0.5)
# Channels that never carry signal (sigma = 0) or never matter (F = 0) would get an
# infinite or zero scale; clamp both statistics to this fraction of their median first,
# then keep the scales within +-SCALE_RANGE of their geometric mean (2^20 keeps x * s and
# its inverse far from fp32 overflow and denormals for any bf16-range input).
FLOOR = 1e-6
SCALE_RANGE = 2.0 ** 20




# ----------------------------------------------------------------------------- outlier-int4
class ChannelStats:
    """EMA min/max per channel of one rank's partial sums and of the reduced sums, per site.

    One instance can be shared by the simulated ranks of one process (each rank updates
    only its own row; the reduced sums are recorded by rank 0).
    """

    def __init__(self, world_size: int, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.world_size, self.decay = world_size, decay
        self.rs_min: Dict[str, torch.Tensor] = {}
        self.rs_max: Dict[str, torch.Tensor] = {}
        self.rs_seen: Dict[str, torch.Tensor] = {}     # sequences seen per rank
        self.ag_min: Dict[str, torch.Tensor] = {}
        self.ag_max: Dict[str, torch.Tensor] = {}
        self.ag_seen: Dict[str, int] = {}
        self._lock = threading.Lock()

    def _ema(self, old: Optional[torch.Tensor], seq_vals: torch.Tensor, seen: int) -> torch.Tensor:
        """Fold per-sequence values [S, H] into the running value, in sequence order."""
        v = old
        for i in range(seq_vals.shape[0]):
            x = seq_vals[i]
            v = x.clone() if (v is None or seen + i == 0) else self.decay * v + (1 - self.decay) * x
        return v

    @staticmethod
    def _per_sequence(x: torch.Tensor):
        h = x.shape[-1]
        xs = x.detach().float().reshape(x.shape[0] if x.dim() >= 3 else 1, -1, h)
        return xs.amin(1), xs.amax(1)

    def update_partial(self, site: str, rank: int, x: torch.Tensor) -> None:
        lo, hi = self._per_sequence(x)
        h = x.shape[-1]
        with self._lock:
            if site not in self.rs_min:
                w = self.world_size
                self.rs_min[site] = torch.zeros(w, h)
                self.rs_max[site] = torch.zeros(w, h)
                self.rs_seen[site] = torch.zeros(w, dtype=torch.long)
        seen = int(self.rs_seen[site][rank])
        self.rs_min[site][rank] = self._ema(self.rs_min[site][rank], lo, seen)
        self.rs_max[site][rank] = self._ema(self.rs_max[site][rank], hi, seen)
        self.rs_seen[site][rank] += lo.shape[0]

    def update_reduced(self, site: str, y: torch.Tensor) -> None:
        lo, hi = self._per_sequence(y)
        seen = self.ag_seen.get(site, 0)
        self.ag_min[site] = self._ema(self.ag_min.get(site), lo, seen)
        self.ag_max[site] = self._ema(self.ag_max.get(site), hi, seen)
        self.ag_seen[site] = seen + lo.shape[0]

    def merge_ranks(self, comm: Communicator) -> None:
        """Real multi-process run: every rank filled only its own row; gather them all
        (a collective: every rank must call it, with the same sites in the same order)."""
        if comm.world_size == 1:
            return
        for site in sorted(self.rs_min):
            for d in (self.rs_min, self.rs_max):
                d[site] = comm.all_gather(d[site][comm.rank:comm.rank + 1].contiguous(), dim=0)

    def as_dict(self) -> Dict[str, dict]:
        """``{site: {rs_min, rs_max, ag_min, ag_max}}``: the input of
        :func:`build_calibration`."""
        missing = [s for s in self.rs_min if s not in self.ag_min]
        if missing:
            raise RuntimeError(f"no reduced-sum statistics for {missing[:3]}")
        return {s: {"rs_min": self.rs_min[s], "rs_max": self.rs_max[s],
                    "ag_min": self.ag_min[s], "ag_max": self.ag_max[s]}
                for s in sorted(self.rs_min)}

    @property
    def sequences(self) -> int:
        return max(self.ag_seen.values(), default=0)


class RecordingCommunicator(WrappingCommunicator):
    """Wraps ``base`` and records each ``all_reduce``'s partial and reduced sums into
    ``stats`` (sites named by the model; calls without a site are not recorded)."""

    def __init__(self, base: Communicator, stats: ChannelStats, record_ag: Optional[bool] = None):
        super().__init__(base)
        self.stats = stats
        # Every rank holds the same reduced sum; one of them records it.
        self.record_ag = (base.rank == 0) if record_ag is None else record_ag
        self.enabled = True

    def all_reduce(self, x, site=None):
        if self.world_size == 1 and site is None:
            return x
        if self.enabled and site is not None:
            self.stats.update_partial(site, self.rank, x)
        y = self.base.all_reduce(x, site) if self.world_size > 1 else x
        if self.enabled and site is not None and self.record_ag:
            self.stats.update_reduced(site, y)
        return y


def balanced_k(k: int, hidden: int, tp: int) -> int:
    """Outliers per rank: ceil(k / tp), so every chunk has the same size."""
    if hidden % tp:
        raise CalibrationError(f"hidden size {hidden} is not divisible by TP {tp}")
    kw = -(-max(int(k), 0) // tp)
    if kw >= hidden // tp:
        raise CalibrationError(f"k={k} leaves no int4 channels at hidden {hidden}, TP {tp}")
    return kw


def build_calibration(stats: Dict[str, dict], k: int, tp: int, model: str,
                      fingerprint: str, extra: Optional[dict] = None) -> Calibration:
    """Outlier choice and static steps from per-channel statistics.

    ``stats[site]`` holds EMA ranges: ``rs_min``/``rs_max`` (fp32 [W, H], rank r's partial
    sums) and ``ag_min``/``ag_max`` (fp32 [H], reduced sums). The ``W*ceil(k/W)`` channels
    with the widest partial-sum range (max over ranks) become outliers; every other
    channel gets the symmetric int4 step ``max(|min|, |max|) / 7``.
    """
    sites, hidden, kw = {}, None, None
    for name, st in stats.items():
        rs_min, rs_max = st["rs_min"].float(), st["rs_max"].float()
        ag_min, ag_max = st["ag_min"].float(), st["ag_max"].float()
        w, h = rs_min.shape
        if w != tp:
            raise CalibrationError(f"site {name}: statistics for {w} ranks, expected TP {tp}")
        hidden = h
        kw = balanced_k(k, h, tp)
        width = (rs_max - rs_min).amax(0)
        # Ties broken by channel index (stable) so the choice is reproducible.
        order = torch.sort(width, descending=True, stable=True).indices
        idx = torch.sort(order[: tp * kw]).values
        rs_scale = torch.maximum(rs_min.abs(), rs_max.abs()) / 7.0
        ag_scale = torch.maximum(ag_min.abs(), ag_max.abs()) / 7.0
        sites[name] = SiteCalibration(idx, rs_scale, ag_scale)
    meta = dict(extra or {}, model=model, fingerprint=fingerprint, tp=tp, hidden=hidden, k=k,
                k_per_rank=kw)
    return Calibration(meta, sites)


# ----------------------------------------------------------------------------- weighted-
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
            cache = KVCache(model.cfg, 1, B, T, torch.float32, ids.device, layout="full")
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
