#!/usr/bin/env python3
"""All-reduce benchmark: NCCL bf16 vs the fused kernels vs the portable quantized paths.

    torchrun --nproc_per_node=4 tools/bench_allreduce.py --json docs/benchmarks/allreduce_w4.json

For every message size (bf16, --min .. --max in powers of 2) and every (backend, codec):

1. correctness first: the output's relative L2 error against the exact sum (an fp32 NCCL
   all-reduce of the fp32 upcast of the same random inputs), and whether every rank holds
   bitwise the same output (rank 0's output is broadcast and compared);
2. the median latency over --iters CUDA-event-timed iterations after warm-up; messages up
   to --graph-max are timed as CUDA-graph replays of --graph-calls back-to-back calls
   (launch overhead is tens of microseconds, more than the message), larger ones eagerly.
   Each rank takes its median; the row reports the slowest rank's;
3. algbw = bytes / time, busbw = algbw * 2(W-1)/W (nccl-tests convention), and the
   speed-up over NCCL bf16 measured in the same run.

Backends: ``nccl`` (bf16), ``oneshot`` (bf16, fused one-shot), ``fused`` (one-launch
two-shot, every codec; ``bf16`` there is the uncompressed two-shot), ``two-step`` (the
portable path of comm/allreduce.py over NCCL, torch ops), ``one-shot-q`` (the portable
quantized one-shot algorithm, ``--comm ...,algo=one-shot``: one quantization per value,
an all-gather of every rank's codes), ``one-shot-k`` (the same algorithm with the Triton
quantize and dequantize-and-sum kernels around NCCL's all-gather, what ``algo=one-shot``
runs on an NCCL group), ``ef-one-shot-k`` (``ef+CODEC,algo=one-shot`` as the engine runs it:
error feedback on those kernels, pre-norm rule, every call paying the previous one's
error; not for ``weighted-`` codecs, which need a calibration file; ``klt`` codecs in
--one-shot-codecs run on ``one-shot-q`` only, with a synthetic per-rank basis and inputs
drawn from its source, :func:`synthetic_klt`), ``auto`` (thresholds derived
from this run's nccl/oneshot/fused rows, then measured through the auto dispatch).
Output: a table, a plot (latency and speed-up vs size) and --json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CODECS = "bf16,int8:128,int4:128,int4-int8:128,fp8:128,int4-sym:128,int3:128,int2:128"


class BenchError(Exception):
    pass


def _import_kernels():
    """megatron_lite.kernels, also from a source checkout that was not pip-installed."""
    from megatron_lite.kernels import backends, fused_allreduce
    return backends, fused_allreduce


def parse_size(text: str) -> int:
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    if not num.isdigit():
        raise BenchError(f"bad size {text!r}: expected e.g. 16KB, 256MB")
    return int(num) * mult


def fmt_size(b: int) -> str:
    for unit, m in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if b >= m:
            return f"{b // m}{unit}"
    return f"{b}B"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--min-size", default="16KB", help="smallest message (bf16 bytes)")
    p.add_argument("--max-size", default="256MB", help="largest message (bf16 bytes)")
    p.add_argument("--codecs", default=DEFAULT_CODECS, help="codecs for the fused backend")
    p.add_argument("--two-step-codecs", default="int4:128,int8:128",
                   help="codecs for the portable two-step backend ('' to skip)")
    p.add_argument("--one-shot-codecs", default="int4:128",
                   help="codecs for the quantized one-shot backends ('' to skip; klt "
                        "codecs: one-shot-q only, synthetic basis over --channels)")
    p.add_argument("--auto-codec", default="int4:128", help="codec the auto backend serves")
    p.add_argument("--backends",
                   default="nccl,oneshot,fused,two-step,one-shot-q,one-shot-k,ef-one-shot-k,auto")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--graph-max", default="64MB",
                   help="time messages up to this as CUDA-graph replays (as the engine runs them)")
    p.add_argument("--graph-calls", type=int, default=10, help="calls per captured graph")
    p.add_argument("--oneshot-max", default="2MB", help="one-shot workspace size")
    p.add_argument("--channels", type=int, default=2048,
                   help="weighted- codecs: channels of their random static scales (messages "
                        "are viewed as [-1, CHANNELS]; it must divide every message)")
    p.add_argument("--json", default=None, help="write results here (rank 0)")
    p.add_argument("--plot", default=None, help="plot file (default: --json with .png)")
    p.add_argument("--table-file", default=None, help="also append the table to this file")
    a = p.parse_args(argv)
    a.min_b, a.max_b = parse_size(a.min_size), parse_size(a.max_size)
    a.graph_max_b, a.oneshot_max_b = parse_size(a.graph_max), parse_size(a.oneshot_max)
    if a.min_b < 16 or a.max_b < a.min_b:
        raise BenchError("--min-size must be >= 16 bytes and <= --max-size")
    if a.iters < 1 or a.warmup < 0 or a.graph_calls < 1:
        raise BenchError("--iters and --graph-calls must be >= 1, --warmup >= 0")
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = set(a.backends) - {"nccl", "oneshot", "fused", "two-step", "one-shot-q",
                             "one-shot-k", "ef-one-shot-k", "auto"}
    if bad:
        raise BenchError(f"unknown backend(s) {sorted(bad)}")
    if a.channels < 1 or (a.min_b // 2) % a.channels:
        raise BenchError(f"--channels {a.channels} must divide the smallest message "
                         f"({a.min_b // 2} values)")
    for opt in ("codecs", "two_step_codecs"):
        if any(c.strip().startswith("klt") for c in getattr(a, opt).split(",")):
            raise BenchError(f"--{opt.replace('_', '-')}: klt codecs run one-shot only "
                             "(--one-shot-codecs)")
    if "nccl" not in a.backends:
        raise BenchError("the nccl backend is the baseline and cannot be skipped")
    return a


def bench_codec(spec: str, channels: int, world: int = 1):
    """The codec of ``spec``; ``weighted-`` codecs get random static channel scales (seed 0,
    the same on every rank, log-uniform in [1/4, 4]): their speed does not depend on the
    values of the scales, and a benchmark has no calibration file."""
    from megatron_lite.comm.codecs import get_codec, parse_codec_spec
    cs = parse_codec_spec(spec)
    if cs.name.startswith("klt"):
        return synthetic_klt(cs, channels, world)
    if not cs.name.startswith("weighted-"):
        return get_codec(cs)
    from megatron_lite.comm.weighting import WeightedScheme
    g = torch.Generator().manual_seed(0)
    return WeightedScheme(cs, torch.exp((torch.rand(channels, generator=g) * 2 - 1) * math.log(4)))


def synthetic_klt(cs, channels: int, world: int):
    """A ``kltN`` scheme without a calibration file (seed 0, the same on every rank): per
    rank a random orthogonal basis, unit weights, and error tables of a Gaussian source
    whose coefficient variances decay as exp(-6 i / channels) (so the allocation mixes
    widths, as a real file's does). Its speed depends on the shapes and the allocation,
    not on the basis values; :func:`klt_input` draws messages from that source so the
    error check means something."""
    from megatron_lite.comm.transform import MAX_BITS, TransformScheme
    g = torch.Generator().manual_seed(0)
    q = torch.stack([torch.linalg.qr(torch.randn(channels, channels, generator=g))[0]
                     for _ in range(world)])
    lam = torch.exp(-6.0 * torch.arange(channels, dtype=torch.float64) / channels)
    grp = lam.view(-1, cs.group_size).sum(1)
    # relative error of a b-bit min/max group code on Gaussian values ~ 2.7 * 4^-b
    rel = torch.tensor([1.0] + [min(1.0, 2.7 * 4.0 ** -b) for b in range(1, MAX_BITS + 1)],
                       dtype=torch.float64)
    errors = (grp[:, None] * rel[None, :]).expand(world, -1, -1).contiguous()
    sch = TransformScheme(cs, torch.ones(channels), q, errors)
    sch.source_scale, sch.source_basis = lam.sqrt().float(), q
    return sch


def klt_input(x: torch.Tensor, codec, rank: int) -> torch.Tensor:
    """Rank ``rank``'s message from the synthetic source of :func:`synthetic_klt`: the
    random values as coefficients, scaled and rotated back to channels."""
    z = x.view(-1, codec.hidden).float() * codec.source_scale.to(x.device)
    return (z @ codec.source_basis[rank].to(x.device).T).to(x.dtype).view(-1)


def _shaped(x: torch.Tensor, codec) -> torch.Tensor:
    """weighted- codecs scale the last dim: view the flat message as [-1, channels] (klt
    codecs: [-1, hidden])."""
    if hasattr(codec, "encode_partial"):       # klt: rows of its hidden size
        return x.view(-1, codec.hidden)
    scale = getattr(codec, "scale", None)
    return x.view(-1, scale.numel()) if scale is not None else x


# ----------------------------------------------------------------------------- timing
def time_fn(fn, nbytes: int, args) -> tuple:
    """(median us per call on the slowest rank, graph used?)."""
    use_graph = nbytes <= args.graph_max_b
    # graph replays of k calls; fewer calls per graph for large messages (memory, time)
    k = max(1, min(args.graph_calls, (4 << 20) // max(nbytes, 1) * args.graph_calls)) if use_graph else 1
    graph = None
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(k):
                    fn()
            run = graph.replay
        except Exception as e:  # noqa: BLE001 - e.g. a path with a host sync
            if dist.get_rank() == 0:
                print(f"  (graph capture failed: {type(e).__name__}: {e}; timing eagerly)")
            graph, use_graph, k, run = None, False, 1, fn
    else:
        run = fn
    for _ in range(args.warmup):
        run()
    torch.cuda.synchronize()
    dist.barrier()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(args.iters)]
    for i in range(args.iters):
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    med = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3 / k
    t = torch.tensor([med], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    del graph
    return float(t.item()), use_graph


def check(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    """(relative L2 error vs the fp32 sum, all ranks bitwise identical)."""
    o = out.float()
    finite = torch.isfinite(o).all().item()
    rel = ((o - ref).norm() / ref.norm()).item() if finite else math.inf
    mine = out.contiguous().view(torch.uint8)        # NCCL moves no int16: compare bytes
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    same = torch.tensor([int(torch.equal(mine, theirs))], device="cuda")
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return rel, bool(same.item())


# ----------------------------------------------------------------------------- thresholds
def derive_thresholds(rows, codec_name: str) -> dict:
    """oneshot_max: largest size up to which one-shot is the fastest bf16-or-better choice
    at every size; fused_min[codec]: smallest size from which the fused codec beats NCCL
    at every larger measured size."""
    by = {}
    for r in rows:
        by.setdefault(r["bytes"], {})[(r["backend"], r["codec"])] = r["us"]
    sizes = sorted(by)
    oneshot_max = 0
    for s in sizes:
        t = by[s]
        os_us = t.get(("oneshot", "bf16"))
        rivals = [v for (b, c), v in t.items() if b in ("nccl",) or (b == "fused" and c.split(":")[0] == codec_name)]
        if os_us is None or os_us > min(rivals):
            break
        oneshot_max = s
    fused_min = {}
    names = {c for (b, c) in (k for t in by.values() for k in t) if b == "fused"}
    for spec in names:
        name = spec.split(":")[0]
        ok = None
        for s in reversed(sizes):
            t = by[s]
            if ("fused", spec) in t and t[("fused", spec)] < t[("nccl", "bf16")]:
                ok = s
            else:
                break
        if ok is not None:
            fused_min[name] = ok
    return {"oneshot_max": oneshot_max, "fused_min": fused_min}


# ----------------------------------------------------------------------------- output
def print_table(rows, world, out=None):
    variants = []
    for r in rows:
        v = (r["backend"], r["codec"])
        if v not in variants:
            variants.append(v)
    sizes = sorted({r["bytes"] for r in rows})
    idx = {(r["bytes"], r["backend"], r["codec"]): r for r in rows}
    lines = [f"all-reduce, world {world}: us (speed-up vs NCCL bf16); * = ranks differ, ! = err > 5%"]
    head = f"{'size':>7} | " + " | ".join(f"{b.replace('one-shot-', '1shot-')[:7]}:{c[:10]}".ljust(18) for b, c in variants)
    lines += [head, "-" * len(head)]
    for s in sizes:
        cells = []
        for b, c in variants:
            r = idx.get((s, b, c))
            if r is None:
                cells.append(" " * 18)
                continue
            flag = ("*" if not r["ranks_identical"] else "") + ("!" if r["rel_err"] > 0.05 else "")
            cells.append(f"{r['us']:8.1f} ({r['speedup_vs_nccl']:4.2f}x){flag:<2}"[:18].ljust(18))
        lines.append(f"{fmt_size(s):>7} | " + " | ".join(cells))
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def plot(rows, world, device, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.5))
    variants = []
    for r in rows:
        if (r["backend"], r["codec"]) not in variants:
            variants.append((r["backend"], r["codec"]))
    for b, c in variants:
        rs = sorted((r for r in rows if r["backend"] == b and r["codec"] == c), key=lambda r: r["bytes"])
        xs = [r["bytes"] for r in rs]
        style = "-" if b in ("fused", "nccl", "auto") else "--"
        lw = 2.5 if b in ("nccl", "auto") else 1.2
        a1.plot(xs, [r["us"] for r in rs], style, marker=".", lw=lw, label=f"{b} {c}")
        a2.plot(xs, [r["speedup_vs_nccl"] for r in rs], style, marker=".", lw=lw, label=f"{b} {c}")
    a1.set(xscale="log", yscale="log", xlabel="message (bytes, bf16)", ylabel="latency (us)",
           title=f"all-reduce latency, {world} x {device}")
    a2.set(xscale="log", yscale="log", xlabel="message (bytes, bf16)", ylabel="speed-up vs NCCL bf16",
           title="speed-up over NCCL bf16 (same run)")
    a2.axhline(1.0, color="k", lw=0.8)
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
    a2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_json(path, payload):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or "LOCAL_RANK" not in os.environ:
        print("error: run under torchrun on a machine with CUDA GPUs", file=sys.stderr)
        return 2
    from tqdm import tqdm
    from megatron_lite.comm.allreduce import (one_shot_all_reduce, scheme_for,
                                              two_step_all_reduce)
    from megatron_lite.comm.codecs import CodecError, get_codec
    from megatron_lite.comm.communicator import DistCommunicator
    backends_mod, fa = _import_kernels()

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=dev)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        fused_codecs = [bench_codec(c, args.channels) for c in args.codecs.split(",") if c.strip()]
        two_codecs = [bench_codec(c, args.channels) for c in args.two_step_codecs.split(",")
                      if c.strip()]
        one_codecs = [bench_codec(c, args.channels) for c in args.one_shot_codecs.split(",")
                      if c.strip() and not c.strip().startswith("klt")]
        klt_codecs = [bench_codec(c, args.channels, world)
                      for c in args.one_shot_codecs.split(",") if c.strip().startswith("klt")]
        auto_codec = get_codec(args.auto_codec)
    except CodecError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    device_name = torch.cuda.get_device_name(dev)
    nccl_version = ".".join(map(str, torch.cuda.nccl.version()))
    sizes = []
    s = args.min_b
    while s <= args.max_b:
        sizes.append(s)
        s *= 2
    base = DistCommunicator()
    state = backends_mod.make_state(None, max_bytes=args.max_b, oneshot_max_bytes=args.oneshot_max_b)
    if state.ws is None and rank == 0:
        print(f"fused backends unavailable: {state.why}")
    if rank == 0:
        print(f"device {device_name} x {world}, NCCL {nccl_version}, torch {torch.__version__}")
    t0 = time.time()
    if state.ws is not None:
        # hadamard-/weighted- variants (maps inside the kernel) compile at their first,
        # untimed call in measure(); prewarm knows the plain variants only
        plain = [c for c in fused_codecs if not hasattr(c, "kernel_maps")]
        mine = fa.prewarm(state.ws, plain + ([auto_codec] if "auto" in args.backends else []),
                          [b // 2 for b in sizes])
        if rank == 0:
            print(f"compiled kernels in {time.time() - t0:.1f}s ({mine} on rank 0)")

    class _Comm:  # what Backend.all_reduce needs from a QuantizedCommunicator
        pass
    qcomm = _Comm()
    qcomm.base = base

    def variants_for(nbytes):
        v = [("nccl", "bf16", lambda x: base.all_reduce(x))]
        if state.ws is not None:
            if "oneshot" in args.backends and nbytes <= args.oneshot_max_b:
                v.append(("oneshot", "bf16", lambda x: fa.one_shot_all_reduce(state.ws, x)))
            if "fused" in args.backends:
                fused_be = backends_mod.FusedTwoShotBackend(state)
                for c in fused_codecs:
                    v.append(("fused", c.spec, lambda x, c=c: fused_be.all_reduce(
                        _shaped(x, c), c, qcomm).view(-1)))
        if "two-step" in args.backends:
            for c in two_codecs:
                v.append(("two-step", c.spec, lambda x, c=c: two_step_all_reduce(
                    base, _shaped(x, c), scheme_for(c)).view(-1)))
        if "one-shot-q" in args.backends:
            for c in one_codecs:
                v.append(("one-shot-q", c.spec, lambda x, c=c: one_shot_all_reduce(
                    base, _shaped(x, c), scheme_for(c)).view(-1)))
            for c in klt_codecs:
                v.append(("one-shot-q", c.spec, lambda x, c=c: one_shot_all_reduce(
                    base, _shaped(x, c), c).view(-1), lambda x, c=c: klt_input(x, c, rank)))
        if "one-shot-k" in args.backends:
            for c in one_codecs:
                v.append(("one-shot-k", c.spec, lambda x, c=c:
                          backends_mod.one_shot_kernels_all_reduce(base, _shaped(x, c), c).view(-1)))
        if "ef-one-shot-k" in args.backends:
            for c in one_codecs:
                if c.spec not in ef_comms:
                    continue
                v.append(("ef-one-shot-k", c.spec, lambda x, c=c: ef_comms[c.spec].all_reduce(
                    x, "layers.0.mlp.down_proj").view(-1)))
        return v

    ef_comms = {}
    if "ef-one-shot-k" in args.backends:
        from megatron_lite.comm.allreduce import build_communicator
        for c in one_codecs:
            if not c.spec.startswith("weighted-"):
                ef_comms[c.spec] = build_communicator(base, f"ef+{c.spec},algo=one-shot")

    rows, inputs = [], {}
    nccl_us = {}

    def measure(nbytes, backend, spec, fn, prep=None):
        x, ref = inputs[nbytes]
        if prep is not None:             # a variant with its own source (klt codecs)
            x = prep(x)
            ref = x.float()
            dist.all_reduce(ref)
        out = fn(x)
        torch.cuda.synchronize()
        rel, same = check(out, ref)
        del out
        us, graphed = time_fn(lambda: fn(x), nbytes, args)
        if backend == "nccl":
            nccl_us[nbytes] = us
        algbw = nbytes / us / 1e3
        rows.append({"bytes": nbytes, "backend": backend, "codec": spec, "us": round(us, 2),
                     "algbw_GBps": round(algbw, 2),
                     "busbw_GBps": round(algbw * 2 * (world - 1) / world, 2),
                     "speedup_vs_nccl": round(nccl_us[nbytes] / us, 3),
                     "rel_err": float(f"{rel:.3e}"), "ranks_identical": same,
                     "graph": graphed})

    def make_inputs(nbytes):
        n = nbytes // 2
        g = torch.Generator(device=dev).manual_seed(1000 * int(math.log2(nbytes)) + rank)
        x = torch.randn(n, generator=g, device=dev).to(torch.bfloat16)
        ref = x.float()
        dist.all_reduce(ref)
        inputs[nbytes] = (x, ref)

    bar = tqdm(sizes, desc="sizes", disable=rank != 0)
    for nbytes in bar:
        make_inputs(nbytes)
        for backend, spec, fn, *prep in variants_for(nbytes):
            bar.set_postfix_str(f"{backend} {spec}")
            measure(nbytes, backend, spec, fn, *prep)
        if state.ws is not None:
            state.ws.check()
        if "auto" not in args.backends:
            del inputs[nbytes]
    table = None
    if "auto" in args.backends and state.ws is not None:
        table = derive_thresholds(rows, auto_codec.name)
        auto = backends_mod.AutoBackend(state, table)
        for nbytes in tqdm(sizes, desc="auto", disable=rank != 0):
            measure(nbytes, "auto", auto_codec.spec,
                    lambda x: auto.all_reduce(x, auto_codec, qcomm))
            rows[-1]["auto_choice"] = auto.choose(inputs[nbytes][0], auto_codec)
            del inputs[nbytes]
        state.ws.check()
    if rank == 0:
        print_table(rows, world, args.table_file)
        if table is not None:
            print(f"auto thresholds measured here ({device_name}, world {world}): "
                  f"{json.dumps(table)}")
        payload = {"device": device_name, "world": world, "nccl_version": nccl_version,
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                   "command": " ".join(["tools/bench_allreduce.py"] + (argv or sys.argv[1:])),
                   "iters": args.iters, "graph_max_bytes": args.graph_max_b,
                   "graph_calls": args.graph_calls, "auto_thresholds": table, "rows": rows}
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            write_json(args.json, payload)
            path = args.plot or os.path.splitext(args.json)[0] + ".png"
            plot(rows, world, device_name, path)
            print(f"wrote {args.json} and {path}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
