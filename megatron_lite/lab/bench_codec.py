"""Helpers of tools/bench_codec_kernels.py: the kernel plans of the codecs, the operations
of each implementation, the bit-for-bit check between implementations, the timer, the
table and the plot."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch

from megatron_lite.lab.bench_comm import SITE, capture_graph, synthetic_calibration


class Mismatch(Exception):
    """Two implementations disagree on some bit: the run stops before timing."""


def plans(codecs, calib_path: str, channels: int) -> Dict[str, object]:
    """``{codec: KernelPlan}`` (scales on the CPU), built as the communicator builds the
    scheme; the ``weighted-`` codecs on a synthetic calibration of ``channels`` channels."""
    from megatron_lite.comm.codecs import NoKernelError
    from megatron_lite.comm.codecs.registry import entry, get_scheme, parse_codec_spec
    calib = None
    out = {}
    probe = torch.zeros(1, channels)
    for c in codecs:
        cs = parse_codec_spec(c)
        if entry(cs.name).traits.calibrated and calib is None:
            calib = synthetic_calibration(calib_path, channels, 1).path
        scheme = get_scheme(c, calibration=calib, site=SITE)
        try:
            plan = scheme.kernel_plan(probe)
        except NoKernelError as e:
            raise ValueError(f"--codec {c}: no kernel ({e})") from None
        if plan.rs != plan.ag:
            raise ValueError(f"--codec {c}: two stages ({plan.rs} / {plan.ag}); benchmark "
                             "each stage's codec on its own")
        out[c] = plan
    return out


def _ops(impl: str, plan, dev):
    """``{op: fn(inputs) -> output}`` of one implementation."""
    from megatron_lite.kernels import codec_cuda, quant
    kc, rot = plan.rs, plan.rot
    s = plan.scale.to(dev) if plan.scale is not None else None

    if impl == "cuda":
        def q(x):
            return codec_cuda.quantize(kc, x, rot=rot, scale=s)
        dq, err = codec_cuda.dequantize, codec_cuda.error_part
    else:
        def q(x):
            if s is not None:      # the one-shot path's torch multiply, then the kernel
                x = (x.float().reshape(-1, s.numel()) * s).reshape(x.shape)
            return quant.quantize(kc, x, rot=rot)
        dq, err = quant.dequantize, quant.error_part
    out_dtype = torch.float32 if rot else torch.bfloat16
    return {
        "quantize": lambda d: q(d["x"]),
        "dequantize": lambda d: dq(kc, d["buf"], d["c"], out_dtype, rot=rot),
        "dequantize_sum": lambda d: dq(kc, d["full"], d["n"], torch.float32, sum_rows=True,
                                       rot=rot),
        "error": lambda d: err(kc, d["xs"], d["buf"], rot=rot),
    }


def _traffic(op: str, plan, d) -> int:
    """Bytes read plus bytes written by one call."""
    kc = plan.rs
    rows, c, n = d["x"].shape[0], d["c"], d["n"]
    code = rows * kc.nbytes(c)
    if op == "quantize":
        return 2 * rows * c + code
    if op == "dequantize":
        return code + rows * c * (4 if plan.rot else 2)
    if op == "dequantize_sum":
        return d["full"].numel() + 4 * n
    # the error part reads the quantize's input as the scheme hands it over: bf16, or fp32
    # for weighted- (its chunks are scaled in fp32 before the kernel)
    return d["xs"].element_size() * rows * c + code + 4 * rows * c


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality; any NaN equals any NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        na, nb = torch.isnan(a), torch.isnan(b)
        if not torch.equal(na, nb):
            return False
        iv = {2: torch.int16, 4: torch.int32}[a.element_size()]
        return torch.equal(a.masked_fill(na, 0).view(iv), b.masked_fill(nb, 0).view(iv))
    return torch.equal(a, b)


def time_fn(fn: Callable[[], object], dev, iters: int, calls: int) -> float:
    """Median microseconds per call: on a GPU, replays of a CUDA graph of ``calls`` calls
    between CUDA events; on the CPU, wall clock."""
    if dev.type != "cuda":
        ts = []
        for _ in range(max(1, iters)):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e6)
        return statistics.median(ts)
    graph = capture_graph(fn, calls)
    graph.replay()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / calls)
    del graph
    return statistics.median(ts)


def _sig(v: float, digits: int = 4) -> float:
    """``v`` to ``digits`` significant digits (the timer's resolution is far coarser)."""
    return float(f"{v:.{digits}g}")


def eager_us(fn: Callable[[], object], dev, calls: int = 200) -> float:
    """Wall microseconds per call of back-to-back eager calls (no graph): the host cost
    of a launch wherever it exceeds the kernel's time, as in eager prefill."""
    for _ in range(10):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return (time.perf_counter() - t) * 1e6 / calls


def sweep(args, plans: Dict[str, object], impls, dev, on_size=None
          ) -> Tuple[List[dict], List[dict]]:
    """(copy rows, kernel rows) over the sizes; at the smallest size each kernel row also
    has ``eager_us``, the wall time per call of eager launches (see ``eager_us``).
    ``on_size(copy, rows)`` runs after each size (the tool saves what it has)."""
    from tqdm import tqdm
    sizes, s = [], args.min_b
    while s <= args.max_b:
        sizes.append(s)
        s *= 2
    copy, rows = [], []
    iters = args.iters if dev.type == "cuda" else 1
    bar = tqdm(sizes, desc="sizes")
    for nbytes in bar:
        n = nbytes // 2
        c = n // args.rows
        g = torch.Generator(device=dev).manual_seed(int(math.log2(nbytes)))
        x = torch.randn(args.rows, c, generator=g, device=dev).to(torch.bfloat16)
        y = torch.empty_like(x)
        us = time_fn(lambda: y.copy_(x), dev, iters, args.graph_calls)
        copy.append({"bytes": nbytes, "us": _sig(us), "TBps": _sig(2 * nbytes / us / 1e6)})
        full_x = torch.randn(args.rows, n, generator=g, device=dev).to(torch.bfloat16)
        for codec, plan in plans.items():
            bar.set_postfix_str(codec)
            base = _ops(impls[0], plan, dev)
            d = {"x": x, "c": c, "n": n}
            d["buf"] = base["quantize"](d)
            d["full"] = base["quantize"]({"x": full_x})
            d["xs"] = (x.float().reshape(-1, plan.scale.numel()) * plan.scale.to(dev)
                       ).reshape(x.shape) if plan.scale is not None else x
            fns = {impl: _ops(impl, plan, dev) for impl in impls}
            for op in args.ops:
                outs = {impl: fns[impl][op](d) for impl in impls}
                first = impls[0]
                for impl in impls[1:]:
                    if not same_bits(outs[first], outs[impl]):
                        raise Mismatch(f"{codec} {op} at {nbytes} B: {impl} differs from "
                                       f"{first}")
                del outs
                moved = _traffic(op, plan, d)
                for impl in impls:
                    f = fns[impl][op]
                    t = time_fn(lambda: f(d), dev, iters, args.graph_calls)
                    row = {"codec": codec, "op": op, "impl": impl, "bytes": nbytes,
                           "us": _sig(t), "TBps": _sig(moved / t / 1e6),
                           "vs_copy": _sig(moved / t / 1e6 / copy[-1]["TBps"], 3)}
                    if nbytes == sizes[0]:
                        row["eager_us"] = _sig(eager_us(lambda: f(d), dev,
                                                        200 if dev.type == "cuda" else 2))
                    rows.append(row)
            d = None   # free the buffers before the next codec
        if on_size is not None:
            on_size(copy, rows)
    return copy, rows


def _mb(b: int) -> str:
    return f"{b / (1 << 20):g} MB" if b >= 1 << 20 else f"{b / 1024:g} KB"


def table(payload: dict) -> str:
    """One block per size: codec x op, TB/s of each implementation and its share of the
    copy's."""
    rows = payload["rows"]
    impls = sorted({r["impl"] for r in rows})
    out = []
    eager = [r for r in rows if "eager_us" in r]
    if eager:
        out.append(f"\neager calls at {_mb(eager[0]['bytes'])}, wall us per call (host cost): "
                   + ", ".join(f"{r['codec']} {r['op']} {r['impl']} {r['eager_us']:.1f}"
                               for r in eager))
    for cp in payload["copy"]:
        b = cp["bytes"]
        out.append(f"\n{_mb(b)}: bf16 copy {cp['us']:.1f} us, {cp['TBps']:.3g} TB/s")
        head = f"{'codec':28s} {'op':15s}" + "".join(f" {i + ' us':>11s} {i + ' TB/s':>12s}"
                                                   for i in impls)
        out.append(head)
        cells: Dict[Tuple[str, str], Dict[str, dict]] = {}
        for r in rows:
            if r["bytes"] == b:
                cells.setdefault((r["codec"], r["op"]), {})[r["impl"]] = r
        for (codec, op), by in cells.items():
            line = f"{codec:28s} {op:15s}"
            for i in impls:
                r = by.get(i)
                line += (f" {r['us']:11.1f} {r['TBps']:7.2f} ({r['vs_copy']:.2f})"
                         if r else f" {'-':>11s} {'-':>12s}")
            out.append(line)
    return "\n".join(out)


def plot(payload: dict, path: str) -> None:
    """TB/s against message size, one panel per operation, one line per codec and
    implementation, the copy dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = payload["rows"]
    ops = [o for o in ("quantize", "dequantize", "dequantize_sum", "error")
           if any(r["op"] == o for r in rows)]
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4.2), squeeze=False)
    cx = [c["bytes"] / (1 << 20) for c in payload["copy"]]
    cy = [c["TBps"] for c in payload["copy"]]
    for ax, op in zip(axes[0], ops):
        ax.plot(cx, cy, "k--", label="bf16 copy")
        keys = sorted({(r["codec"], r["impl"]) for r in rows if r["op"] == op})
        for codec, impl in keys:
            pts = [(r["bytes"] / (1 << 20), r["TBps"]) for r in rows
                   if r["op"] == op and r["codec"] == codec and r["impl"] == impl]
            ax.plot(*zip(*pts), "-o" if impl == "cuda" else ":x", ms=3,
                    label=f"{codec} ({impl})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message (MB of bf16)")
        ax.set_ylabel("TB/s (read + written)")
        ax.set_title(op)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"codec kernels, {payload['device']} ({payload['date']})")
    fig.tight_layout()
    from megatron_lite.lab.eval.report import atomic_write
    import io
    b = io.BytesIO()
    fig.savefig(b, dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, b.getvalue())
