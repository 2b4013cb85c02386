#!/usr/bin/env python
"""Batch-1 linear layers of a decode step: kernels/gemv.py's GEMV kernel against cuBLAS
(``F.linear``) on one GPU, on a serving shape's layers at a TP size.

    python tools/bench_gemv.py --shape llama3-8b --tp 1 --json docs/results/data/gemv/gemv_h100.json

Each layer's weight (this rank's slice, random bf16) is timed as in a decode step: a CUDA
graph of pairs, each a small elementwise kernel that writes the input row and then the
product (so that a launch waits for its producer, as in the model), over enough copies of
the weight that they do not stay in the L2 cache (at least 256 MB per cycle, and at
least ``--graph-calls`` pairs); median of ``--iters`` replays between CUDA events, µs per
pair. The producer alone is timed too. ``TBps`` is the weight's bytes over the pair's
time (the producer's time included, so a lower bound). Before timing, each layer's GEMV
output is checked against an fp32 product (within a bf16 rounding of the largest output)
and against itself on a second call (bitwise). The step row is the layers times the layer
count, plus the LM head, with their producers and less the producers' own time (the
producer timed alone).

Output: a table, ``--json`` (``{"device", "date", "torch", "command", "shape", "tp",
"producer_us", "rows": [{"layer", "n", "k", "bytes", "cublas_us", "gemv_us", "cublas_TBps",
"gemv_TBps", "speedup"}], "step": {"cublas_ms", "gemv_ms", "cublas_less_producers_ms",
"gemv_less_producers_ms"}}``) and a plot next to it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    from megatron_lite.lab.shapes import SHAPES
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES),
                   help="serving shape (default: llama3-8b)")
    p.add_argument("--tp", type=int, default=1, help="TP size: this rank's slices (default: 1)")
    p.add_argument("--iters", type=int, default=15, help="timed graph replays (default: 15)")
    p.add_argument("--graph-calls", type=int, default=20,
                   help="producer + product pairs per graph (default: 20)")
    p.add_argument("--json", help="write the results here (and a plot next to it)")
    p.add_argument("--plot", help="plot path (default: the --json path with .png)")
    return p


def layers(shape: str, tp: int) -> list:
    """``(name, n, k, count)``: this rank's linear layers of one decode step (n output rows
    of k inputs, as the model's TP layers hold them: KV heads replicated where TP exceeds
    them, the vocab padded to a multiple of 128 * tp), ``count`` of them per step."""
    from megatron_lite.lab.shapes import SHAPES
    from megatron_lite.models.config import ModelConfig, TPSizeError
    c = ModelConfig.from_hf(SHAPES[shape])
    try:
        c.validate_tp(tp)
    except TPSizeError as e:
        raise ValueError(f"--tp {tp} for {shape}: {e}") from None
    h, d = c.hidden_size, c.head_dim
    qkv = (c.local_heads(tp) + 2 * c.local_kv_heads(tp)) * d
    return [("qkv", qkv, h, c.num_layers), ("o", h, c.local_heads(tp) * d, c.num_layers),
            ("gate_up", 2 * c.intermediate_size // tp, h, c.num_layers),
            ("down", h, c.intermediate_size // tp, c.num_layers),
            ("lm_head", c.padded_vocab_size(tp) // tp, h, 1)]


def _time(fn, calls: int, iters: int) -> float:
    """Median µs per call of CUDA-graph replays (lab.bench_codec.time_fn on the GPU)."""
    import torch
    from megatron_lite.lab.bench_codec import time_fn
    return time_fn(fn, torch.device("cuda"), iters, calls)


def run(args) -> dict:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from megatron_lite.kernels import codec_cuda, gemv
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    src = torch.randn(1, 1 << 16, device=dev, generator=gen).to(torch.bfloat16)
    one = torch.ones((), device=dev, dtype=torch.bfloat16)
    rows, calls = [], args.graph_calls
    x_all = torch.empty_like(src)

    def producer(k):
        torch.mul(src[:, :k], one, out=x_all[:, :k])

    producer_us = _time(lambda: producer(4096), calls, args.iters)
    for name, n, k, count in tqdm(layers(args.shape, args.tp), desc="layers", leave=False):
        nbytes = n * k * 2
        # a graph touches as many copies as it has pairs: enough of both for 256 MB a cycle
        copies = max(1, math.ceil((256 << 20) / nbytes))
        pairs = max(calls, copies)
        ws = [(torch.randn(n, k, device=dev, generator=gen) * k ** -0.5).to(torch.bfloat16)
              for _ in range(copies)]
        x = x_all[:, :k]
        producer(k)
        if not gemv.takes(x, ws[0]):
            raise RuntimeError(f"{name}: the GEMV kernel does not take [1, {k}] x [{n}, {k}]")
        y = gemv.linear(x, ws[0])
        ref = F.linear(x.float(), ws[0].float())
        tol = 2.0 ** -7 * ref.abs().max().item() + 1e-6
        if not (y.float() - ref).abs().max().item() <= tol:
            raise RuntimeError(f"{name}: the GEMV output is off the fp32 product by more than "
                               f"a bf16 rounding ({tol:.3g})")
        if not torch.equal(y.view(torch.int16), gemv.linear(x, ws[0]).view(torch.int16)):
            raise RuntimeError(f"{name}: two GEMV calls gave different bits")
        i = [0]

        def pair(fn):
            def step():
                producer(k)
                fn(x, ws[i[0] % copies])
                i[0] += 1
            return step
        cub = _time(pair(F.linear), pairs, args.iters)
        gem = _time(pair(gemv.linear), pairs, args.iters)
        rows.append(dict(layer=name, n=n, k=k, count=count, bytes=nbytes, copies=copies,
                         pairs=pairs, cublas_us=round(cub, 3), gemv_us=round(gem, 3),
                         cublas_TBps=round(nbytes / cub / 1e6, 3),
                         gemv_TBps=round(nbytes / gem / 1e6, 3), speedup=round(cub / gem, 3)))
        ws.clear()   # free the copies before the next layer
    # a step's products with their producers, and less the producers' own time
    step = {f"{impl}_ms": round(sum(r[f"{impl}_us"] * r["count"] for r in rows) / 1e3, 4)
            for impl in ("cublas", "gemv")}
    producers_ms = sum(r["count"] for r in rows) * producer_us / 1e3
    step.update({f"{impl}_less_producers_ms": round(step[f"{impl}_ms"] - producers_ms, 4)
                 for impl in ("cublas", "gemv")})
    return dict(device=torch.cuda.get_device_name(dev), date=time.strftime("%Y-%m-%d"),
                torch=torch.__version__, command=" ".join(["tools/bench_gemv.py"] + sys.argv[1:]),
                shape=args.shape, tp=args.tp, iters=args.iters, graph_calls=calls,
                cuda_defines=list(codec_cuda.build_defines()),
                producer_us=round(producer_us, 3), rows=rows, step=step)


def table(p: dict) -> str:
    out = [f"{p['shape']} TP {p['tp']} on {p['device']}: µs per producer + product pair "
           f"(producer alone {p['producer_us']:.2f} µs)",
           f"{'layer':8s} {'n':>7s} {'k':>6s} {'cuBLAS us':>10s} {'TB/s':>6s} "
           f"{'GEMV us':>9s} {'TB/s':>6s} {'speedup':>8s}"]
    for r in p["rows"]:
        out.append(f"{r['layer']:8s} {r['n']:7d} {r['k']:6d} {r['cublas_us']:10.2f} "
                   f"{r['cublas_TBps']:6.2f} {r['gemv_us']:9.2f} {r['gemv_TBps']:6.2f} "
                   f"{r['speedup']:8.3f}")
    s = p["step"]
    out.append(f"a step's linear layers with their producers: cuBLAS {s['cublas_ms']:.3f} ms, "
               f"GEMV {s['gemv_ms']:.3f} ms; less the producers' own time: cuBLAS "
               f"{s['cublas_less_producers_ms']:.3f} ms, GEMV {s['gemv_less_producers_ms']:.3f} ms")
    return "\n".join(out)


def plot(p: dict, path: str) -> None:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_lite.lab.eval.report import atomic_write
    names = [r["layer"] for r in p["rows"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [r["cublas_TBps"] for r in p["rows"]], 0.4, label="cuBLAS")
    ax.bar([x + 0.2 for x in xs], [r["gemv_TBps"] for r in p["rows"]], 0.4, label="GEMV kernel")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("weight TB/s (producer included)")
    ax.set_title(f"{p['shape']} TP {p['tp']}, batch 1, {p['device']}", fontsize=9)
    ax.legend()
    b = io.BytesIO()
    fig.tight_layout()
    fig.savefig(b, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, b.getvalue())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.tp < 1 or args.iters < 1 or args.graph_calls < 1:
        print("error: --tp, --iters and --graph-calls must be at least 1", file=sys.stderr)
        return 2
    try:
        layers(args.shape, args.tp)
        payload = run(args)
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(payload))
    if args.json:
        from megatron_lite.lab.benchmark import write_json
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(args.json, payload)
        path = args.plot or os.path.splitext(args.json)[0] + ".png"
        plot(payload, path)
        print(f"wrote {args.json} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
