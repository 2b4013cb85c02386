"""Helpers of tools/bench_allreduce.py: a synthetic calibration file (a benchmark has no
model to calibrate on), the inputs of a message, the correctness check, the timer, the
threshold derivation and the table.

The synthetic calibration serves one site (``SITE``) of ``channels`` hidden channels at
TP ``world``, with seed 0 (the same file on every rank):

* ``weighted-``: channel scales log-uniform in [1/4, 4] (their speed does not depend on
  the values);
* ``outlier-int4``: ``channels / 64`` outlier channels (rounded up to the TP size) and the
  static steps of a unit Gaussian (3.5 sigma / 7);
* ``kltN``: per rank a random orthogonal basis, unit weights, and the error tables of a
  Gaussian source whose coefficient variances decay as ``exp(-6 i / channels)``, so the
  allocation mixes widths as a real file's does; :meth:`SyntheticCalibration.klt_input`
  draws messages from that source, so the error check means something.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

SITE = "layers.0.mlp.down_proj"


@dataclass
class SyntheticCalibration:
    path: str
    source_scale: torch.Tensor      # [channels]: std of each klt coefficient
    bases: torch.Tensor             # [W, channels, channels]

    def klt_input(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank ``rank``'s message from the klt source: ``x``'s values as coefficients,
        scaled and rotated back to channels."""
        c = self.source_scale.numel()
        z = x.reshape(-1, c).float() * self.source_scale.to(x.device)
        return (z @ self.bases[rank].to(x.device).T).to(x.dtype).reshape(x.shape)


def synthetic_calibration(path: str, channels: int, world: int) -> SyntheticCalibration:
    """Write the synthetic calibration file (module docstring) to ``path``."""
    from megatron_lite.comm.calibration import Calibration, SiteCalibration
    from megatron_lite.comm.codecs import GROUP_SIZES
    from megatron_lite.comm.codecs.klt import MAX_BITS
    from megatron_lite.lab.calibration import balanced_k
    g = torch.Generator().manual_seed(0)
    kw = balanced_k(max(1, channels // 64), channels, world)
    idx = torch.sort(torch.randperm(channels, generator=g)[:kw * world]).values
    scale = torch.exp((torch.rand(channels, generator=g) * 2 - 1) * math.log(4))
    bases = torch.stack([torch.linalg.qr(torch.randn(channels, channels, generator=g))[0]
                         for _ in range(world)])
    lam = torch.exp(-6.0 * torch.arange(channels, dtype=torch.float64) / channels)
    # relative error of a b-bit min/max group code on Gaussian values ~ 2.7 * 4^-b
    rel = torch.tensor([1.0] + [min(1.0, 2.7 * 4.0 ** -b) for b in range(1, MAX_BITS + 1)],
                       dtype=torch.float64)
    errors = {}
    for grp in GROUP_SIZES:
        if channels % grp == 0:
            e = lam.view(-1, grp).sum(1)[:, None] * rel[None, :]
            errors[grp] = e.expand(world, -1, -1).contiguous().float()
    step = torch.full((channels,), 3.5 / 7.0)
    site = SiteCalibration(idx, step.expand(world, -1).clone(), step * math.sqrt(world),
                           channel_scale=scale, klt_weight=torch.ones(channels),
                           klt_basis=bases, klt_errors=errors, klt_loss_scale=1.0)
    meta = dict(model="synthetic", fingerprint="synthetic", tp=world, hidden=channels,
                k=kw * world, k_per_rank=kw)
    Calibration(meta, {SITE: site}).save(path)
    return SyntheticCalibration(path, lam.sqrt().float(), bases)


def check(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    """(relative L2 error against the fp32 sum, every rank bitwise identical)."""
    import torch.distributed as dist
    o = out.float()
    finite = bool(torch.isfinite(o).all())
    rel = float((o - ref).norm() / ref.norm()) if finite else math.inf
    mine = out.contiguous().view(torch.uint8).reshape(-1)   # NCCL moves no int16: bytes
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    same = torch.tensor([int(torch.equal(mine, theirs))], device=out.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return rel, bool(same.item())


def capture_graph(fn: Callable[[], object], calls: int):
    """A CUDA graph of ``calls`` back-to-back calls of ``fn``, after two warm-up calls on a
    side stream (lazy initialisation and allocations stay out of the capture)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def time_call(fn: Callable[[], object], nbytes: int, iters: int, warmup: int,
              graph_max: int, graph_calls: int, device: torch.device) -> tuple:
    """``(median us per call on the slowest rank, timed as a CUDA graph?)``.

    On a GPU, messages up to ``graph_max`` bytes are timed as CUDA-graph replays of
    ``graph_calls`` back-to-back calls (an eager launch costs tens of microseconds, more
    than a small message), larger ones eagerly, between CUDA events. On the CPU: wall
    clock around each call."""
    import torch.distributed as dist
    cuda = device.type == "cuda"
    run, k, graph = fn, 1, None
    if cuda and nbytes <= graph_max:
        # fewer calls per graph for large messages (memory, time)
        k = max(1, min(graph_calls, (4 << 20) // max(nbytes, 1) * graph_calls))
        try:
            graph = capture_graph(fn, k)
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - e.g. a path with a host sync
            if dist.get_rank() == 0:
                print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)")
            run, k, graph = fn, 1, None
    for _ in range(warmup):
        run()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            times.append((a, b))
        else:
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) * 1e-3 for a, b in times]
    med = statistics.median(times) * 1e6 / k
    t = torch.tensor([med], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    graphed = graph is not None
    del graph
    return float(t.item()), graphed


def derive_thresholds(rows: List[dict]) -> dict:
    """The ``auto`` table entry this run supports (kernels/thresholds.py's shape):
    ``oneshot_max``, the largest size up to which the one-shot kernel is at least as fast
    as NCCL and every fused codec at every smaller size; ``fused_min[codec]``, the smallest
    size from which ``CODEC,path=fused`` beats native at every larger measured size."""
    by: Dict[int, Dict[str, float]] = {}
    for r in rows:
        by.setdefault(r["bytes"], {})[r["comm"]] = r["us"]
    sizes = sorted(by)
    oneshot_max = 0
    for s in sizes:
        t = by[s]
        if "oneshot-kernel" not in t or t["oneshot-kernel"] > min(
                v for c, v in t.items() if c == "native" or c.endswith(",path=fused")):
            break
        oneshot_max = s
    fused_min = {}
    for c in {c for t in by.values() for c in t if c.endswith(",path=fused")}:
        ok = None
        for s in reversed(sizes):
            t = by[s]
            if c in t and t[c] < t["native"]:
                ok = s
            else:
                break
        if ok is not None:
            fused_min[c.split(",")[0].split(":")[0]] = ok
    return {"oneshot_max": oneshot_max, "fused_min": fused_min}


def fmt_size(b: int) -> str:
    for unit, m in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if b >= m and b % m == 0:
            return f"{b // m}{unit}"
    return f"{b}B"


def table(rows: List[dict], world: int) -> str:
    """Latency and speed-up over native per size (columns: specs; a spec too long for its
    column is headed by its number, and the legend under the table names it in full)."""
    comms = list(dict.fromkeys(r["comm"] for r in rows))
    sizes = sorted({r["bytes"] for r in rows})
    idx = {(r["bytes"], r["comm"]): r for r in rows}
    width = 22
    lines = [f"all-reduce, world {world}: us (speed-up vs native); * = ranks differ, "
             f"! = error > 5%"]
    labels = [c if len(c) <= width else f"[{i}] {c}"[:width - 1] + "~"
              for i, c in enumerate(comms, 1)]
    legend = [f"  [{i}] {c}" for i, c in enumerate(comms, 1) if len(c) > width]
    head = f"{'size':>7} | " + " | ".join(lab.ljust(width) for lab in labels)
    lines += [head, "-" * len(head)]
    for s in sizes:
        cells = []
        for c in comms:
            r = idx.get((s, c))
            if r is None:
                cells.append(" " * width)
                continue
            flag = ("*" if not r["ranks_identical"] else "") + ("!" if r["rel_err"] > 0.05 else "")
            cells.append(f"{r['us']:9.1f} ({r['speedup_vs_native']:5.2f}x){flag:<2}"
                         [:width].ljust(width))
        lines.append(f"{fmt_size(s):>7} | " + " | ".join(cells))
    return "\n".join(lines + legend)


def plot(rows: List[dict], title: str, path: str) -> None:
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.5))
    for c in dict.fromkeys(r["comm"] for r in rows):
        rs = sorted((r for r in rows if r["comm"] == c), key=lambda r: r["bytes"])
        xs = [r["bytes"] for r in rs]
        base = c in ("native", "oneshot-kernel")
        a1.plot(xs, [r["us"] for r in rs], "-" if base else "--", marker=".",
                lw=2.5 if base else 1.2, label=c)
        a2.plot(xs, [r["speedup_vs_native"] for r in rs], "-" if base else "--", marker=".",
                lw=2.5 if base else 1.2, label=c)
    a1.set(xscale="log", yscale="log", xlabel="message (bytes, bf16)", ylabel="latency (us)",
           title=title)
    a2.set(xscale="log", yscale="log", xlabel="message (bytes, bf16)",
           ylabel="speed-up vs native", title="speed-up over the native all-reduce (same run)")
    a2.axhline(1.0, color="k", lw=0.8)
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


class _GpuHold:
    """Keeps the GPU busy while a batch of calls is timed on the host, so that what is
    timed is the host's work alone. Without it a loop of eager calls whose kernels take
    longer than their launches fills the launch queue, and from then on every launch
    waits for the GPU: the loop then measures device time, not host time. A batch whose
    hold ran out before its last call returned is not counted, and the next holds last
    twice as long."""

    def __init__(self, cycles: int = 20_000_000):
        self.cycles, self.uncovered = cycles, 0

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda._sleep(self.cycles)   # a spin kernel: the calls' kernels queue behind it
        self.done = torch.cuda.Event()
        self.done.record()
        return self

    def running(self) -> bool:
        """After the timed calls: was the spin kernel still running (so no launch could
        have waited for the GPU)?"""
        return not self.done.query()

    def extend(self) -> None:
        """The batch was not covered: drop it, and hold twice as long from now on."""
        self.uncovered += 1
        self.cycles *= 2
        if self.uncovered > 20:
            raise RuntimeError("the GPU hold never outlasted a batch of calls")

    def __exit__(self, *exc):
        torch.cuda.synchronize()


def host_overhead(comm, x: torch.Tensor, site: str, calls: int = 2000,
                  batch: int = 32) -> Dict[str, float]:
    """Host microseconds of an eager quantized all-reduce: ``dispatch`` from the call to
    the entry of the backend's runner (the route's lookup: what runs before the backend's
    own work, a kernel backend's prepared launch), and ``call``, the whole call's host
    time. Medians of ``calls`` calls after warm-up.

    On a GPU the calls are timed in batches of ``batch`` behind a spin kernel
    (:class:`_GpuHold`), so that a launch never waits for the device: ``call`` is the
    host's own cost, what an eager caller pays whatever the kernels take. ``gpu_us`` is
    the device time per call (``time_call``; an eager caller waits for the larger of the
    two); ``uncovered_batches`` counts batches dropped because their hold ran out.

    The output is checked first against the exact sum (``rel_err``, ``ranks_identical``;
    a non-finite or wrong-shaped result raises). At one rank the call is the
    communicator's ``route`` (``all_reduce`` returns its input there): the same plan and
    backend launch as at W > 1, the sum a one-rank round trip.

    The entry is timed by wrapping the chosen backend's runner (``Backend.runner``) for
    the duration of the measurement; the call itself runs the real path."""
    import torch.distributed as dist
    plan = comm.plan(x, site)
    backend = plan.backend
    if backend is None:
        raise ValueError(f"site {site!r} is native for this spec: nothing to measure")
    call = comm.route if comm.world_size == 1 else comm.all_reduce
    ref = x.float()
    dist.all_reduce(ref)
    out = call(x, site)
    rel, same = check(out, ref)
    if out.shape != x.shape or not math.isfinite(rel):
        raise ValueError(f"{backend.name}: output {tuple(out.shape)}, relative error {rel}")
    inner = backend.runner(x, plan.scheme, comm)
    entries: List[float] = []

    def timed(y):
        entries.append(time.perf_counter_ns())
        return inner(y)
    for _ in range(20):
        call(x, site)
    extra = {}
    if x.is_cuda:   # device time per call: CUDA-graph replays where the path captures
        extra["gpu_us"], _ = time_call(lambda: call(x, site), x.numel() * x.element_size(),
                                       iters=20, warmup=5, graph_max=1 << 62, graph_calls=10,
                                       device=x.device)
    hold = _GpuHold() if x.is_cuda else None
    backend.runner = lambda *a: timed
    comm.set_backends(comm.backends)   # planned again: the route now calls ``timed``
    call(x, site)                      # (the planning outside the timed calls)
    dispatch, whole = [], []
    try:
        while len(whole) < calls:
            d, w = [], []
            with hold or contextlib.nullcontext():
                for _ in range(min(batch, calls - len(whole))):
                    t0 = time.perf_counter_ns()
                    call(x, site)
                    t1 = time.perf_counter_ns()
                    d.append((entries[-1] - t0) / 1e3)
                    w.append((t1 - t0) / 1e3)
                running = hold is None or hold.running()
            if hold is not None:
                # every rank keeps or drops the batch alike, or their call counts diverge
                flag = torch.tensor([0 if running else 1], device=x.device)
                if comm.world_size > 1:
                    dist.all_reduce(flag, group=comm.process_group)
                if flag.item():
                    hold.extend()
                    continue
            dispatch += d
            whole += w
    finally:
        del backend.runner            # the instance attribute: the class method again
        comm.set_backends(comm.backends)
    if hold is not None:
        extra["uncovered_batches"] = hold.uncovered
    return {"dispatch_us": statistics.median(dispatch), "call_us": statistics.median(whole),
            **extra, "backend": backend.name, "path": comm.explain(x, site), "calls": calls,
            "rel_err": float(f"{rel:.3e}"), "ranks_identical": same}
