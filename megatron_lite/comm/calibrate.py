"""Channel statistics of the partial sums that TP ranks all-reduce (Dong et al., arXiv
2411.07942): the input of ``outlier-int4``'s calibration file (format: comm/outlier.py).

:class:`RecordingCommunicator` wraps a rank's communicator. Every ``all_reduce(x, site)``
the model issues passes through it, so it sees exactly what that rank would put on the
wire: its partial sum ``x`` ``[..., H]`` (before the reduce) and the reduced sum (after).
No layer is touched. Per site it keeps, for each channel c (the last dim):

* ``rs_min[r, c]``, ``rs_max[r, c]``: EMA over sequences of rank r's per-sequence min / max
  of its partial sums (what the reduce-scatter step quantizes);
* ``ag_min[c]``, ``ag_max[c]``: the same for the reduced sums (what the all-gather step
  requantizes).

EMA: the first sequence sets the value, then ``v <- decay * v + (1 - decay) * v_seq`` for
each later sequence, in order. The update is per *sequence* (dim 0 of a ``[B, T, H]``
message), so the result does not depend on how sequences are batched. Messages of another
rank (in a real multi-process run) are merged with :meth:`ChannelStats.merge_ranks`.

The recorder passes the uncompressed sum through (the base communicator's own
all-reduce): statistics describe the model with exact communication.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional

import torch

from megatron_lite.comm.communicator import Communicator, WrappingCommunicator


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
        :func:`megatron_lite.comm.outlier.build_calibration`."""
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

