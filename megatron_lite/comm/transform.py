"""``kltN``: transform coding of each rank's partial sum in a calibrated per-rank basis
(one-shot all-reduce only).

Why. A group codec spends the same bits on every value of a message. The message of a
row-parallel site is far from white, and each rank's is less so than the sum:

* rank r's partial sum ``x_r = W_r a_r`` lies in the column space of its weight shard,
  whose dimension is at most ``min(H, K / W)`` (``K`` the layer's input width): at TP 4
  Gemma-3-270M's ``o_proj`` partials span 256 of 640 dimensions (one head each), its
  ``down_proj`` partials 512;
* within that space the energy is spread over a few directions (a steep eigenvalue
  spectrum) and the loss is not equally sensitive to every direction.

Classic transform coding (Huang & Schultheiss 1963; Goyal, "Theoretical foundations of
transform coding", IEEE SPM 2001) rotates the vector into the Karhunen-Loeve basis of
its covariance and gives each coefficient bits by reverse water-filling: at high rate
the mean squared error drops by the ratio of the arithmetic to the geometric mean of
the eigenvalues against spending equal bits, and directions with no energy get none.
Here the error that matters is the loss increase, to second order the error weighted by
the diagonal Fisher information ``F`` of the reduced sum (comm/weighting.py), so the
coding runs on ``u = d * x_r`` with ``d = sqrt(F)``, where the loss is the plain squared
error. One-shot is what makes a per-rank basis possible: every rank receives every
other rank's codes and decodes them in that rank's basis before the fp32 sum. (A basis
shared by all ranks, which two-step's reduce-scatter would need, gains nothing here:
docs/accuracy.md.)

Calibration (``tools/calibrate.py --transform``, per site, at the TP size of the run):
the weight ``d`` (``sqrt(F)`` floored at ``FLOOR`` x its median, geometric mean 1), per
rank the eigenvectors ``Q_r`` [H, H] of ``E[u u^T]`` sorted by decreasing eigenvalue
(each column's largest entry positive), and per rank, for every group size ``G``, the
measured squared error ``D[r, g, b]`` of coefficient group ``g`` (coefficients
``[g G, (g+1) G)``) coded with ``b`` = 0..8 bits (b = 0: dropped).

Bit allocation (when a codec is built): per rank, the group widths ``b_g`` minimise
``sum_g D[r, g, b_g]`` subject to ``sum_g cost(b_g) <= (N + 1/4) * H`` bits, with
``cost(b) = G * b + 32 * [b > 0]`` (a coded group carries its bf16 step and offset),
solved exactly (:func:`allocate`). So ``kltN`` uses at most the wire budget of
``intN:128`` (N + 0.25 bits per value) and ``bits_per_value`` is its exact figure.

``budget=model`` (CommConfig): the N + 1/4 bits per value are a budget for the whole
model instead of for each site. The error tables are in the site's normalised units;
times the site's ``loss_scale`` (``F = loss_scale * d**2``) they are Fisher-weighted
squared errors, i.e. (to second order) loss increases, comparable across sites. Each
site's best error as a function of its budget is the sum of its ranks' knapsack optima;
:func:`model_budgets` splits the model's budget between the sites to minimise the sum
(Lagrangian plus a greedy remainder, which matched an exact dynamic programme on
Gemma-3-270M's 36 sites). Why it pays: the sites are far from equally hard. At TP 4 on
Gemma-3-270M an ``o_proj`` partial spans 256 dimensions, so 8 bits on each fit in 3.4
bits per value and the rest of its share went to zero coefficients, while the middle
layers' ``down_proj`` carry most of the loss; the split moves ``o_proj`` to 2.2-2.8 and
``down_proj`` to 4.8-6.7 bits per value, and cut KL 3.5-4.3 times (docs/accuracy.md).

Definition (bit-exact reference), rank r, message rows ``x`` [..., H]::

    encode  z = fl32(fl32(x) * d) @ Q_r[:, coded]        (torch fp32 matmul)
            the coded groups of each width b (ascending b, coefficient order within)
            are one row of ``int<b>`` asymmetric group codes, group G (comm/codecs.py:
            payload planes, then the bf16 step and offset arrays); the row message is
            their concatenation, zero-padded to the longest rank's (all-gather needs
            one size)
    decode  z^ = the codes decoded in fp32 (dropped coefficients 0)
            x^_r = fl32(z^ @ Q_r[:, coded]^T) / d
    sum     acc = x^_0 + x^_1 + ... in rank order (fp32), then saturate to the dtype

The matmuls are the only non-elementwise steps: their bits depend on the BLAS, so
ranks agree because every rank decodes every partial with the same code on the same
kind of device (as the tests check), not across devices. A non-finite value in a row
(or a coefficient beyond the bf16 range) makes the groups it reaches decode as NaN,
and the inverse transform spreads that NaN over the whole row: a poisoned row stays
loud, as in the group codecs.

Cost: the decode basis of every rank, ``W * H * H`` fp32 per site on every rank (plus
the loaded calibration file until it is dropped), and per message row one ``H x k``
encode product and ``W`` decode products (``k`` the coded coefficients; the encode
product could be folded into the row-parallel weight, the decode ones cannot). No Triton kernel: on GPU it runs the
portable one-shot path (torch matmuls around NCCL's all-gather).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_lite.comm.communicator import WrappingCommunicator
from megatron_lite.comm.codecs import (GROUP_SIZES, CodecError, CodecSpec, GroupCodec,
                                       saturate)

PREFIX = "klt"
NAMES = tuple(f"klt{b}" for b in range(2, 9))
MAX_BITS = 8
META_BITS = 32                    # bf16 step + bf16 offset of a coded group
UNIT = 32                         # every cost is a multiple of 32 bits (G >= 32)
FLOOR = 1e-6                      # Fisher floor, fraction of the site's median (as weighting)
SCALE_RANGE = 2.0 ** 20           # d within +-SCALE_RANGE of its geometric mean


def is_transform(name: str) -> bool:
    return str(name) in NAMES


def budget_bits(name: str) -> float:
    """Wire budget of ``kltN``: N + 0.25 bits per value (``intN:128``'s)."""
    return int(str(name)[len(PREFIX):]) + 0.25


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


def _codec(bits: int, group: int) -> GroupCodec:
    return GroupCodec(f"int{bits}", bits, "asym", group)


def group_errors(z: torch.Tensor, group: int) -> torch.Tensor:
    """float64 ``[H / group, MAX_BITS + 1]``: squared error summed over the rows of ``z``
    [N, H] (coefficients) of each coefficient group coded with 0..8 bits."""
    n, h = z.shape
    zf = z.float()
    out = torch.empty(h // group, MAX_BITS + 1, dtype=torch.float64)
    out[:, 0] = zf.double().pow(2).reshape(n, h // group, group).sum((0, 2))
    for b in range(1, MAX_BITS + 1):
        c = _codec(b, group)
        e = (c.decode(c.encode(zf), h) - zf).double().pow(2)
        out[:, b] = e.reshape(n, h // group, group).sum((0, 2))
    return out


def _unit_costs(group: int) -> List[int]:
    """Cost of a group coded with 0..8 bits, in 32-bit units (``G * b + 32 * [b > 0]``)."""
    return [0] + [(group * b + META_BITS) // UNIT for b in range(1, MAX_BITS + 1)]


def _knapsack(errors: torch.Tensor, group: int, cap: int):
    """``(best, choice)``: ``best[c]`` the least summed error of the groups at a cost of at
    most ``c`` units (c = 0..cap), ``choice[g, c]`` group g's bits in that optimum.
    Dynamic programming over the groups, vectorised over the capacity; ties go to the
    fewer bits."""
    ng = errors.shape[0]
    e = errors.double()
    cost = _unit_costs(group)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    best = torch.zeros(cap + 1, dtype=torch.float64)
    choice = torch.zeros(ng, cap + 1, dtype=torch.long)
    for g in range(ng):
        new = torch.full((cap + 1,), float("inf"), dtype=torch.float64)
        pick = torch.zeros(cap + 1, dtype=torch.long)
        for b in range(MAX_BITS + 1):
            k = cost[b]
            if k > cap:
                break
            cand = torch.cat([inf.expand(k), best[:cap + 1 - k]]) + e[g, b]
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.full_like(pick, b), pick)
        best, choice[g] = new, pick
    return best, choice


def _cap_units(budget: float, groups: int, group: int) -> int:
    """32-bit units that ``budget`` bits per value buys for ``groups`` groups of
    ``group`` values. allocate and model_budgets must agree on it exactly (the model
    split hands each site units the per-site knapsack then spends); the 1e-9 keeps a
    budget such as 4.25 from losing a unit to float rounding."""
    return int(math.floor(budget * groups * group / UNIT + 1e-9))


def allocate(errors: torch.Tensor, group: int, budget: float) -> List[int]:
    """Bits per coefficient group (0..8) with the least summed error whose cost fits in
    ``budget`` bits per value (module docstring). ``errors``: ``[groups, MAX_BITS + 1]``.

    Exact: every cost ``G * b + 32 * [b > 0]`` is a multiple of 32 bits (G >= 32), so a
    knapsack over the groups in 32-bit units finds the optimum."""
    ng = errors.shape[0]
    cost = _unit_costs(group)
    cap = _cap_units(budget, ng, group)
    _, choice = _knapsack(errors, group, cap)
    bits, c = [0] * ng, cap
    for g in range(ng - 1, -1, -1):
        bits[g] = int(choice[g, c])
        c -= cost[bits[g]]
    return bits


def model_budgets(tables: Dict[str, Tuple[torch.Tensor, float]], group: int,
                  budget: float) -> Dict[str, float]:
    """``budget=model``: per-site budgets (bits per value) that spend ``budget`` bits per
    value on average over the sites of ``tables`` where the loss gains most.

    ``tables``: per site ``(errors [W, H/G, 9], loss_scale)`` (the calibration's tables
    and :func:`loss_scale`). A site's error at a budget of ``c`` units is the sum over its
    ranks of the per-rank knapsack optimum (:func:`_knapsack`) times its loss scale, so
    errors of different sites are in the same (Fisher-weighted) units; the sites'
    budgets then minimise the summed error subject to the summed cost. That second
    knapsack is solved by its Lagrangian (bisection on the price of a unit; exact on the
    convex hull of every site's error curve), then the units left over go greedily where
    they remove the most error per unit. Every site keeps at least one 2-bit group (the
    dead-rank rule of :class:`TransformScheme`) and at most 8 bits for every group."""
    if not tables:
        return {}
    cost = _unit_costs(group)
    names = sorted(tables)
    curves, caps = [], []
    for s in names:
        errors, scale = tables[s]
        w, ng, _ = errors.shape
        top = ng * cost[MAX_BITS]
        curve = sum(_knapsack(errors[r], group, top)[0] for r in range(w)) * float(scale)
        curve[:cost[2]] = float("inf")           # the floor of one 2-bit group
        curves.append(curve)
        caps.append(_cap_units(budget, ng, group))
    total = sum(caps)
    if total < len(names) * cost[2]:
        raise CodecError(f"budget {budget} bits per value is below one 2-bit group per site")

    ranges = [torch.arange(c.numel(), dtype=torch.float64) for c in curves]

    def pick(mu: float) -> List[int]:
        return [int(torch.argmin(c + mu * r)) for c, r in zip(curves, ranges)]

    finite = torch.cat([c[torch.isfinite(c)] for c in curves])
    lo, hi = 0.0, float(finite.max() - finite.min()) + 1.0   # at hi every site takes its floor
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(pick(mid)) > total:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    units = pick(hi)
    left = total - sum(units)
    while left > 0:                              # greedy fill of the remainder
        gain, where = 0.0, None
        for i, c in enumerate(curves):
            u = units[i]
            ahead = c[u + 1:u + 1 + left]
            if ahead.numel():
                per_unit = (c[u] - ahead) / torch.arange(1, ahead.numel() + 1,
                                                         dtype=torch.float64)
                k = int(torch.argmax(per_unit))
                if float(per_unit[k]) > gain:
                    gain, where = float(per_unit[k]), (i, u + 1 + k)
        if where is None:
            break
        left -= where[1] - units[where[0]]
        units[where[0]] = where[1]
    return {s: u * UNIT / tables[s][0].shape[1] / group for s, u in zip(names, units)}


class TransformScheme:
    """One-shot scheme of ``kltN:G`` at one site (module docstring)."""

    def __init__(self, cs: CodecSpec, weight: torch.Tensor, bases: torch.Tensor,
                 errors: torch.Tensor, budget: Optional[float] = None):
        self.spec, self.name, self.group_size = str(cs), cs.name, cs.group_size
        w, h, _ = bases.shape
        g = cs.group_size
        if h % g:
            raise CodecError(f"{cs.name}: group size {g} does not divide hidden {h}")
        if tuple(weight.shape) != (h,) or tuple(errors.shape) != (w, h // g, MAX_BITS + 1):
            raise CodecError(f"{cs.name}: calibration shapes do not fit (hidden {h}, TP {w})")
        self.world_size, self.hidden = w, h
        # budget=model hands each site its share (model_budgets); else N + 1/4
        self.budget = budget_bits(cs.name) if budget is None else float(budget)
        self.weight = weight.float().contiguous()
        self.bits = [allocate(errors[r], g, self.budget) for r in range(w)]
        for b in self.bits:
            # A rank whose calibration partials were all zero (a dead shard) would code
            # nothing, and a NaN in its message would vanish: it keeps one 2-bit group,
            # which carries the NaN (and costs 2 G + 32 bits, well inside any budget).
            if not any(b):
                b[0] = 2
        # per rank: coded coefficient indices (in wire order) and the codecs of the row
        self._cols, self._parts, nbytes = [], [], []
        for r in range(w):
            cols, parts, nb = [], [], 0
            for b in sorted({b for b in self.bits[r] if b > 0}):
                idx = [k for gi, bb in enumerate(self.bits[r]) if bb == b
                       for k in range(gi * g, (gi + 1) * g)]
                cols += idx
                parts.append((_codec(b, g), len(idx)))
                nb += _codec(b, g).encoded_nbytes(len(idx))
            self._cols.append(torch.tensor(cols, dtype=torch.long))
            self._parts.append(parts)
            nbytes.append(nb)
        self.row_bytes = max(nbytes)
        self.bits_per_value = 8.0 * self.row_bytes / h
        self._q = [bases[r][:, self._cols[r]].float().contiguous() for r in range(w)]
        self._dev: Dict[Tuple[torch.device, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: torch.device, rank: int):
        key = (device, rank)
        if key not in self._dev:
            self._dev[key] = (self.weight.to(device), self._q[rank].to(device))
        return self._dev[key]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden:
            raise CodecError(f"{self.name}: message has {x.shape[-1]} channels, the "
                             f"calibration {self.hidden}")
        return x.reshape(-1, self.hidden)

    def encode_partial(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """uint8 ``[rows, row_bytes]``: rank ``rank``'s message for ``x`` [..., H]."""
        d, q = self._on(x.device, rank)
        z = (self._rows(x).float() * d) @ q
        out, at = [], 0
        for codec, n in self._parts[rank]:
            out.append(codec.encode(z[:, at:at + n].contiguous()))
            at += n
        pad = self.row_bytes - sum(o.shape[-1] for o in out)
        if pad or not out:
            out.append(torch.zeros(z.shape[0], pad, dtype=torch.uint8, device=x.device))
        return torch.cat(out, -1)

    def decode_partial(self, buf: torch.Tensor, rank: int) -> torch.Tensor:
        """fp32 ``[rows, H]``: rank ``rank``'s partial sum from its message."""
        d, q = self._on(buf.device, rank)
        zs, at = [], 0
        for codec, n in self._parts[rank]:
            nb = codec.encoded_nbytes(n)
            zs.append(codec.decode(buf[:, at:at + nb], n, torch.float32))
            at += nb
        if not zs:
            return torch.zeros(buf.shape[0], self.hidden, device=buf.device)
        return (torch.cat(zs, -1) @ q.T) / d

    def own_error(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """fp32, ``x``'s shape: what rank ``rank``'s coding adds to the sum (NaN -> 0,
        as comm/feedback.py's own_error: a poisoned row carries no compensation)."""
        xr = self._rows(x).float()
        err = self.decode_partial(self.encode_partial(x, rank), rank) - xr
        return torch.nan_to_num(err, nan=0.0, posinf=0.0, neginf=0.0).reshape(x.shape)

    def finish(self, acc: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        return saturate(acc, out_dtype)

    def chunk(self, x, world_size):
        raise CodecError(f"{self.spec} codes each rank's partial in its own basis: it needs "
                         "algo=one-shot")

    def __repr__(self) -> str:
        return (f"<codec {self.spec}: {self.bits_per_value:g} bits/value, per-rank "
                f"calibrated basis, TP {self.world_size}>")


def transform_codec(cs: CodecSpec, calibration, site: Optional[str],
                    budget: Optional[float] = None) -> TransformScheme:
    """The scheme of ``kltN:G`` at ``site`` from the calibration's transform tables;
    ``budget`` (bits per value) replaces ``N + 1/4`` (``budget=model``: model_budgets)."""
    from megatron_lite.comm.outlier import CalibrationError, load_calibration
    if calibration is None or site is None:
        raise CodecError(f"{cs.name} needs a calibration file with transform tables "
                         "(--calibration FILE from tools/calibrate.py --transform) and a site")
    calib = load_calibration(calibration) if isinstance(calibration, str) else calibration
    sc = calib.site(site)
    if sc.klt_basis is None:
        raise CalibrationError(f"calibration has no transform tables for site {site!r}: "
                               "rerun tools/calibrate.py with --transform")
    errors = sc.klt_errors.get(cs.group_size)
    if errors is None:
        raise CalibrationError(f"calibration has no transform tables for group size "
                               f"{cs.group_size} (it has {sorted(sc.klt_errors)})")
    return TransformScheme(cs, sc.klt_weight, sc.klt_basis, errors, budget)


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
        import threading
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
    comm/calibrate.py's recorder."""

    def __init__(self, base, stats: TransformStats):
        super().__init__(base)
        self.stats = stats

    def all_reduce(self, x, site=None):
        if site is not None and site != "embed_tokens":
            self.stats.update(site, self.rank, x)
        return self.base.all_reduce(x, site) if self.world_size > 1 else x
