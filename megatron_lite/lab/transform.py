"""Calibration of the ``kltN`` codecs (comm/codecs/klt.py): per site and rank, the second
moment of the partial sums (pass 1), then the Fisher-weighted Karhunen-Loeve basis and
the coefficient-group error tables in it (pass 2). ``tools/calibrate.py --transform``
runs both passes on simulated ranks and writes them into the calibration file.
"""
from __future__ import annotations

import threading
from typing import Dict, Optional, Sequence, Tuple

import torch

from megatron_lite.comm.codecs import GROUP_SIZES, CodecError
from megatron_lite.comm.codecs.group import asym_codec
from megatron_lite.comm.codecs.klt import MAX_BITS
from megatron_lite.comm.communicator import WrappingCommunicator
from megatron_lite.comm.spec import EMBED_SITE

FLOOR = 1e-6                      # Fisher floor, fraction of the site's median (as weighted-)
SCALE_RANGE = 2.0 ** 20           # d within +-SCALE_RANGE of its geometric mean


def _weight_and_scale(fisher: torch.Tensor) -> Tuple[torch.Tensor, float]:
    f = fisher.double()
    if f.dim() != 1 or not torch.isfinite(f).all() or (f < 0).any():
        raise CodecError("Fisher statistics must be a finite non-negative 1-D tensor")
    med = f.median()
    f = f.clamp_min(float((med if med > 0 else f.max().clamp_min(1e-30)) * FLOOR))
    d = f.sqrt()
    gm = d.log().mean().exp()
    return (d / gm).clamp(1 / SCALE_RANGE, SCALE_RANGE).float(), float(gm) ** 2


def coefficient_weight(fisher: torch.Tensor) -> torch.Tensor:
    """fp32 ``d = sqrt(F)`` per channel, floored and normalised (module docstring)."""
    return _weight_and_scale(fisher)[0]


def loss_scale(fisher: torch.Tensor) -> float:
    """The factor that turns a site's error tables (squared error in the normalised
    ``d``-weighted space) into Fisher-weighted squared error, i.e. loss units comparable
    across sites: ``F = loss_scale * d**2`` (the square of the floored ``sqrt(F)``'s
    geometric mean)."""
    return _weight_and_scale(fisher)[1]


def basis(cov: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """fp32 ``Q`` [H, H]: eigenvectors of ``diag(d) cov diag(d)`` by decreasing
    eigenvalue, each column's largest-magnitude entry made positive (a fixed sign)."""
    c = cov.double() * d.double()[:, None] * d.double()[None, :]
    c = 0.5 * (c + c.T)
    _, q = torch.linalg.eigh(c)
    q = q.flip(1)
    top = q.abs().argmax(0)
    sign = torch.sign(q[top, torch.arange(q.shape[1])])
    return (q * torch.where(sign == 0, torch.ones_like(sign), sign)).float().contiguous()


def group_errors(z: torch.Tensor, group: int) -> torch.Tensor:
    """float64 ``[H / group, MAX_BITS + 1]``: squared error summed over the rows of ``z``
    [N, H] (coefficients) of each coefficient group coded with 0..8 bits."""
    n, h = z.shape
    zf = z.float()
    out = torch.empty(h // group, MAX_BITS + 1, dtype=torch.float64)
    out[:, 0] = zf.double().pow(2).reshape(n, h // group, group).sum((0, 2))
    for b in range(1, MAX_BITS + 1):
        c = asym_codec(b, group)
        e = (c.decode(c.encode(zf), h) - zf).double().pow(2)
        out[:, b] = e.reshape(n, h // group, group).sum((0, 2))
    return out


# ----------------------------------------------------------------------------- calibration
class TransformStats:
    """Accumulates, per site and rank, the second moment of the partial sums (pass 1) or
    the coefficient-group error tables in a given basis (pass 2). One instance serves the
    simulated ranks of one process (tools/calibrate.py runs ``--transform`` simulated
    only: pass 2 needs the TP-1 Fisher in the same process)."""

    def __init__(self, world_size: int, groups: Sequence[int] = GROUP_SIZES):
        self.world_size, self.groups = world_size, tuple(groups)
        self.cov: Dict[str, torch.Tensor] = {}           # [W, H, H] float64 sums
        self.rows: Dict[str, torch.Tensor] = {}          # [W] rows seen
        self.errors: Dict[str, Dict[int, torch.Tensor]] = {}   # G -> [W, H/G, 9]
        self.bases: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None
        self.scales: Dict[str, float] = {}               # site -> loss_scale
        self._lock = threading.Lock()

    def update(self, site: str, rank: int, x: torch.Tensor) -> None:
        h = x.shape[-1]
        xs = x.detach().reshape(-1, h)
        with self._lock:
            if site not in self.rows:
                self.rows[site] = torch.zeros(self.world_size, dtype=torch.long)
                self.cov[site] = torch.zeros(self.world_size, h, h, dtype=torch.float64)
                self.errors[site] = {g: torch.zeros(self.world_size, h // g, MAX_BITS + 1,
                                                    dtype=torch.float64)
                                     for g in self.groups if h % g == 0}
        if self.bases is None:
            xd = xs.double().cpu()
            self.cov[site][rank] += xd.T @ xd
        else:
            d, q = self.bases[site]
            z = (xs.float().cpu() * d) @ q[rank]
            for g, t in self.errors[site].items():
                t[rank] += group_errors(z, g)
        self.rows[site][rank] += xs.shape[0]

    def make_bases(self, fisher: Dict[str, torch.Tensor]) -> None:
        """End pass 1: weights and per-rank bases from the moments and the Fisher."""
        self.bases = {}
        for site, cov in self.cov.items():
            if site not in fisher:
                raise CodecError(f"no Fisher statistics for site {site!r}")
            d, self.scales[site] = _weight_and_scale(fisher[site])
            n = self.rows[site].clamp_min(1).double()[:, None, None]
            self.bases[site] = (d, torch.stack([basis(c, d) for c in cov / n]))
            self.rows[site] = torch.zeros_like(self.rows[site])

    def tables(self, site: str):
        """``(weight, bases, {G: errors}, loss_scale)`` of a site after pass 2 (group
        sizes that divide H only)."""
        d, q = self.bases[site]
        return d, q, {g: t.float() for g, t in self.errors[site].items()}, self.scales[site]


class TransformRecorder(WrappingCommunicator):
    """Wraps ``base``; feeds every row-parallel all-reduce's partial sum to ``stats`` (the
    embedding reduce is not a transform site). The exact sum passes through, as with
    the outlier calibration's recorder (lab/calibration.py)."""

    def __init__(self, base, stats: TransformStats):
        super().__init__(base)
        self.stats = stats

    def all_reduce(self, x, site=None):
        if site is not None and site != EMBED_SITE:
            self.stats.update(site, self.rank, x)
        return self.base.all_reduce(x, site) if self.world_size > 1 else x
