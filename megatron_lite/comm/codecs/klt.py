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
the diagonal Fisher information ``F`` of the reduced sum (comm/codecs/weighted.py), so the
coding runs on ``u = d * x_r`` with ``d = sqrt(F)``, where the loss is the plain squared
error. One-shot is what makes a per-rank basis possible: every rank receives every
other rank's codes and decodes them in that rank's basis before the fp32 sum. (A basis
shared by all ranks, which two-step's reduce-scatter would need, gains nothing here:
docs/accuracy.md.)

Calibration (``tools/calibrate.py --transform``, per site, at the TP size of the run;
``megatron_lite.lab.transform`` measures it):
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

``budget=model`` (comm/spec.py): the N + 1/4 bits per value are a budget for the whole
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

    encode  z = fl32(fl32(x) * d) (x) Q_r[:, coded]       ((x): the exact product below)
            the coded groups of each width b (ascending b, coefficient order within)
            are one row of ``int<b>`` asymmetric group codes, group G (group.py:
            payload planes, then the bf16 step and offset arrays); the row message is
            their concatenation, zero-padded to the longest rank's (all-gather needs
            one size)
    decode  z^ = the codes decoded in fp32 (dropped coefficients 0)
            x^_r = fl32(z^ (x) Q_r[:, coded]^T) / d
    sum     acc = x^_0 + x^_1 + ... in rank order (fp32), then saturate to the dtype

    A (x) B, for fp32 A [M, K] and B [K, N], is computed so that no BLAS, thread count
    or device can change its bits (:func:`exact_matmul`, the slicing of Ozaki et al.,
    "Error-free transformations of matrix multiplication", Numer. Algorithms 2012):
    with beta = (53 - ceil(log2 K)) // 2, each row of A (column of B) is cut into two
    slices of beta bits below its largest magnitude's binade, ``a = a1 + a2 + tail``
    (tail < 2^-2beta of the row's max: dropped), every slice product ``a_s @ b_t`` is
    computed in fp64, where it is exact whatever the summation order (K products of
    2 beta bits on one grid fit 53 bits), and
    ``fl32(fl64(fl64(a1 @ b1 + a1 @ b2) + a2 @ b1))`` is the result.

A plain fp32 matmul's bits depend on the BLAS's blocking, and so on the thread count:
ranks with different thread counts would decode the same bytes to different sums. The
exact product makes every rank, thread count and device (CPU or GPU) agree bit for bit,
for three fp64 matmuls instead of one fp32 one. A non-finite value in a row (or a
coefficient beyond the bf16 range) makes the groups it reaches decode as NaN, and the
inverse transform spreads that NaN over the whole row: a poisoned row stays loud, as in
the group codecs.

Cost: the decode basis of every rank, ``W * H * H`` fp32 per site on every rank (plus
the loaded calibration file until it is dropped), and per message row one ``H x k``
encode product and ``W`` decode products (``k`` the coded coefficients; the encode
product could be folded into the row-parallel weight, the decode ones cannot). No Triton kernel: on GPU it runs the
portable one-shot path (torch matmuls around NCCL's all-gather). A research codec: no
fused kernel, and memory that grows with W H^2 per site.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from megatron_lite.comm.calibration import CalibrationError
from megatron_lite.comm.codecs.base import (CodecError, CodecSpec, Scheme, Traits, finite_only,
                                            saturate)
from megatron_lite.comm.codecs.group import asym_codec
from megatron_lite.comm.codecs.registry import GROUP, BuildContext, Entry, register

PREFIX = "klt"
NAMES = tuple(f"klt{b}" for b in range(2, 9))
MAX_BITS = 8
META_BITS = 32                    # bf16 step + bf16 offset of a coded group
UNIT = 32                         # every cost is a multiple of 32 bits (G >= 32)


def budget_bits(name: str) -> float:
    """Wire budget of ``kltN``: N + 0.25 bits per value (``intN:128``'s)."""
    return int(str(name)[len(PREFIX):]) + 0.25


# ----------------------------------------------------------------------------- exact product
def _pow2(k: torch.Tensor) -> torch.Tensor:
    """fp64 ``2^k`` for int64 ``k`` in [-1022, 1023], built from its bits (exact on every
    device: no pow or ldexp, whose accuracy is not specified everywhere)."""
    return ((k + 1023) << 52).view(torch.float64)


def _slices(t: torch.Tensor, dim: int, beta: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``(t1, t2)``: the two beta-bit slices of fp32 ``t`` along ``dim`` (per row for
    dim 1, per column for dim 0), each an integer times a power of two shared by the row.
    Every step is exact: division and multiplication by powers of two, trunc, and a
    difference of a value and its truncation. NaN/Inf rows give NaN slices."""
    t64 = t.double()
    top = t64.abs().amax(dim=dim, keepdim=True)
    # |t| < 2^e along dim: the binade of the largest magnitude, read from its bits (a zero
    # row gets a small e; NaN/Inf rows e = 1025, which keeps their slices NaN)
    e = ((top.view(torch.int64) >> 52) & 0x7FF) - 1022
    e = e.clamp_min(-200)
    u1, u2 = _pow2(e - beta), _pow2(e - 2 * beta)
    hi = torch.trunc(t64 / u1) * u1
    lo = torch.trunc((t64 - hi) / u2) * u2
    return hi, lo


def exact_matmul(a: torch.Tensor, b: torch.Tensor,
                 b_slices: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """fp32 ``a (x) b`` (module docstring): the same bits on every BLAS, thread count
    and device. ``b_slices``: ``_slices(b, 0, beta)`` precomputed for ``a.shape[-1]``."""
    k = a.shape[-1]
    beta = exact_beta(k)
    a1, a2 = _slices(a, 1, beta)
    b1, b2 = b_slices if b_slices is not None else _slices(b, 0, beta)
    c = a1 @ b1
    c = c + a1 @ b2
    c = c + a2 @ b1
    return c.float()


def exact_beta(k: int) -> int:
    """Slice width for a reduction over ``k`` terms: 2 beta + ceil(log2 k) <= 53."""
    return (53 - max(1, math.ceil(math.log2(max(k, 2))))) // 2


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


class TransformScheme(Scheme):
    """One-shot scheme of ``kltN:G`` at one site (module docstring). The message is one
    chunk (its rows, whole); rank r codes it in its own basis ``Q_r``."""

    def __init__(self, cs: CodecSpec, weight: torch.Tensor, bases: torch.Tensor,
                 errors: torch.Tensor, budget: Optional[float] = None):
        self.spec, self.name, self.group_size = str(cs), cs.name, cs.group_size
        self.traits = Traits(one_shot_only=True, calibrated=True)
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
                parts.append((asym_codec(b, g), len(idx)))
                nb += asym_codec(b, g).encoded_nbytes(len(idx))
            self._cols.append(torch.tensor(cols, dtype=torch.long))
            self._parts.append(parts)
            nbytes.append(nb)
        self.row_bytes = max(nbytes)
        self.bits_per_value = 8.0 * self.row_bytes / h
        self._q = [bases[r][:, self._cols[r]].float().contiguous() for r in range(w)]
        self._dev: Dict[Tuple[torch.device, int], tuple] = {}

    def _on(self, device: torch.device, rank: int):
        """``(d, Q, slices of Q, slices of Q^T)`` of rank ``rank`` on ``device``."""
        key = (device, rank)
        if key not in self._dev:
            q = self._q[rank].to(device)
            qt = q.T.contiguous()
            self._dev[key] = (self.weight.to(device), q,
                              _slices(q, 0, exact_beta(q.shape[0])),
                              _slices(qt, 0, exact_beta(qt.shape[0])))
        return self._dev[key]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden:
            raise CodecError(f"{self.name}: message has {x.shape[-1]} channels, the "
                             f"calibration {self.hidden}")
        return x.reshape(-1, self.hidden)

    def encode_partial(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """uint8 ``[rows, row_bytes]``: rank ``rank``'s message for ``x`` [..., H]."""
        d, q, qs, _ = self._on(x.device, rank)
        z = exact_matmul(self._rows(x).float() * d, q, qs)
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
        d, q, _, qts = self._on(buf.device, rank)
        zs, at = [], 0
        for codec, n in self._parts[rank]:
            nb = codec.encoded_nbytes(n)
            zs.append(codec.decode(buf[:, at:at + nb], n, torch.float32))
            at += nb
        if not zs:
            return torch.zeros(buf.shape[0], self.hidden, device=buf.device)
        return exact_matmul(torch.cat(zs, -1), q.T, qts) / d

    # -- the one-shot stages: one chunk, the whole message ---------------------------
    def chunk(self, x, world_size):
        if world_size != self.world_size:
            raise CodecError(f"{self.spec}: calibrated for TP {self.world_size}, the group "
                             f"has {world_size} ranks")
        self._rows(x)
        shape = x.shape
        return x.reshape(1, -1), lambda y: y.reshape(shape)

    def rs_encode(self, chunks, src):
        return self.encode_partial(chunks.view(-1, self.hidden), src).reshape(1, -1)

    def rs_decode(self, recv, chunk_id, c):
        rows = c // self.hidden
        if rows == 0:    # an empty message (its byte views would sit at odd offsets)
            return torch.zeros(recv.shape[0], 0, device=recv.device)
        return torch.stack([self.decode_partial(recv[r].view(rows, self.row_bytes), r)
                            .reshape(-1) for r in range(recv.shape[0])])

    def finish(self, acc, out_dtype):
        return saturate(acc, out_dtype)

    def own_error(self, chunks, acc, rank):
        """What rank ``rank``'s coding adds to the sum (one-shot: no second stage)."""
        xr = chunks.view(-1, self.hidden)
        err = self.decode_partial(self.encode_partial(xr, rank), rank) - xr.float()
        return finite_only(err).reshape(1, -1)

    def __repr__(self) -> str:
        return (f"<codec {self.spec}: {self.bits_per_value:g} bits/value, per-rank "
                f"calibrated basis, TP {self.world_size}>")


def site_budgets(calibration, sites, cs: CodecSpec) -> Dict[str, float]:
    """``budget=model`` for the ``sites`` that use ``cs``: :func:`model_budgets` over the
    calibration's error tables and loss scales."""
    tables = {}
    for site in sites:
        sc = calibration.site(site)
        if sc.klt_loss_scale is None or cs.group_size not in sc.klt_errors:
            raise CalibrationError(
                f"budget=model needs the klt tables for group size {cs.group_size} and "
                f"loss scales at site {site!r}: rerun tools/calibrate.py --transform")
        tables[site] = (sc.klt_errors[cs.group_size], sc.klt_loss_scale)
    return model_budgets(tables, cs.group_size, budget_bits(cs.name))


def _build(cs: CodecSpec, ctx: BuildContext) -> TransformScheme:
    """The scheme of ``kltN:G`` at ``ctx.site`` from the calibration's transform tables;
    ``ctx.budget`` (bits per value) replaces ``N + 1/4`` (``budget=model``)."""
    sc = ctx.calibration.site(ctx.site)
    if sc.klt_basis is None:
        raise CalibrationError(f"calibration has no transform tables for site {ctx.site!r}: "
                               "rerun tools/calibrate.py with --transform")
    errors = sc.klt_errors.get(cs.group_size)
    if errors is None:
        raise CalibrationError(f"calibration has no transform tables for group size "
                               f"{cs.group_size} (it has {sorted(sc.klt_errors)})")
    return TransformScheme(cs, sc.klt_weight, sc.klt_basis, errors, ctx.budget)


for _name in NAMES:
    register(Entry(_name, "klt", _build, lambda cs: budget_bits(cs.name), group=GROUP,
                   traits=Traits(one_shot_only=True, calibrated=True),
                   model_budgets=site_budgets))
