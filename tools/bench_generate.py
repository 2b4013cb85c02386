#!/usr/bin/env python
"""End-to-end speed of the TP engine: TTFT and TPOT per ``--comm`` spec.

    torchrun --nproc_per_node=4 tools/bench_generate.py --random-weights llama3-8b \\
        --json docs/benchmarks/generate_llama3-8b_tp4.json
    torchrun --nproc_per_node=2 tools/bench_generate.py --ckpt SHARD_DIR ...
    python tools/bench_generate.py --plot out.png --from-json a.json [hf.json ...]
    torchrun ... tools/bench_generate.py ... --json new.json --compare-to old.json

TP is the torchrun world size. Weights are a checkpoint (``--ckpt``) or random bf16 weights
of a serving shape made on the device (``--random-weights``, lab/random_init.py).

* **TTFT** (phase "prefill"): prompt -> first token (prefill + greedy pick), CUDA-event
  median of ``--repeats`` runs after a warm-up, ranks aligned by a barrier before each run;
  the reported value is the largest of the ranks' medians.
* **TPOT** (phase "decode"): one decode step at a ``--context``-token context, replayed
  from a CUDA graph (inference/cuda_graphs.py) with the greedy pick fed back as the next
  input; median over ``--decode-steps`` steps, each between two CUDA events. The position
  stays at ``--context`` (every step reads the same number of cache slots; the cache holds
  random values, so nothing is timed on zeros). Without CUDA it runs eagerly (CPU smoke).
  Attention reads what ``generate`` would read at that context (``--kv-layout live``:
  sliding-window layers a ring of the window's size, the others the power-of-two bucket of
  the live slots; ``full``: every slot of a cache with one slot per position on every
  layer). Each decode row records the KV cache's bytes per GPU, the bytes a step reads
  from it, and the floor (streamed weights + KV reads at the measured HBM bandwidth).
* **Comm**: every ``--comm SPEC`` (repeatable; the grammar of every tool, comm/spec.py),
  as the engine runs it: the fused kernels where the size chooser takes a message on an
  NCCL group, the portable path elsewhere. ``native`` (the backend's own all-reduce) is
  always measured first, as the baseline. ``--lower-bound`` adds ``skip-reduce``: every
  TP sum returns its input unsummed (wrong output; the lower bound on time). The LM
  head's logits all-gather runs in every row. Rows are labelled by the spec as given.

Before timing, each spec generates a few greedy tokens and checks that every rank holds
the same tokens and logits (hash all-gather), that the logits are finite, and compares
with native (tokens and logits; the uncompressed ``auto`` should agree token for token).
Failed checks are printed and recorded in the JSON; the timing still runs, so one bad
spec does not lose the others' numbers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

from megatron_lite.cli.common import make_parser  # noqa: E402
from megatron_lite.errors import report_error  # noqa: E402

NATIVE = "native"
LOWER_BOUND = "skip-reduce"
DEFAULT_COMMS = ("auto", "int8:128", "int4:128")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", type=Path, metavar="DIR",
                     help="shard directory (its TP == world size) or HF directory "
                          "(default: --random-weights)")
    src.add_argument("--random-weights", metavar="SHAPE",
                     help="random bf16 weights of a serving shape (llama3-8b, llama3-70b, "
                          "llama2-13b, gemma2-27b; tiny for CPU runs) or a config.json "
                          "(default: --ckpt)")
    p.add_argument("--comm", action="append", metavar="SPEC",
                   help="an all-reduce setting in the --comm grammar of every tool "
                        "(repeatable; native is always measured first; default: "
                        f"{' '.join(DEFAULT_COMMS)})")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration file for calibrated codecs (default: none)")
    p.add_argument("--lower-bound", action=argparse.BooleanOptionalAction, default=True,
                   help="also time skip-reduce: TP sums not summed, the lower bound on "
                        "time (default: on)")
    p.add_argument("--prefill", default="512x1,2048x1,8192x1,1024x8", metavar="CASES",
                   help="comma list of TOKENSxBATCH prompts for TTFT")
    p.add_argument("--decode-batches", default="1,16,64", metavar="BATCHES",
                   help="comma list of batch sizes for TPOT")
    p.add_argument("--context", type=int, default=1024, metavar="N",
                   help="context length (tokens in the cache) for TPOT")
    p.add_argument("--decode-steps", type=int, default=100, metavar="N",
                   help="timed decode steps per case")
    p.add_argument("--repeats", type=int, default=5, metavar="N",
                   help="timed prefill runs per case")
    p.add_argument("--check-tokens", type=int, default=8, metavar="N",
                   help="greedy tokens generated per mode for the checks (0: skip checks)")
    p.add_argument("--check-long-mib", type=float, default=16.0, metavar="MIB",
                   help="the checks also prefill one prompt whose TP sums are this many MiB "
                        "(0: skip)")
    p.add_argument("--eager-decode", action="store_true",
                   help="also time eager (no CUDA graph) decode at batch 1, native")
    p.add_argument("--eager-prefill", action="store_true",
                   help="also time eager prefill, native, of the cases graphed prefill "
                        "takes (power-of-two prompts up to 2048 tokens)")
    p.add_argument("--profile", action="store_true",
                   help="profile the kernels of a batch-1 decode step and of the largest "
                        "prefill case (native and auto)")
    p.add_argument("--hbm-gib", type=float, default=2.0, metavar="GIB",
                   help="size of the device-to-device copy that measures HBM bandwidth")
    p.add_argument("--kv-layout", choices=("live", "full"), default="live",
                   help="KV cache: live (ring buffers on sliding-window layers, decode reads "
                        "the live slots) or full (one slot per position on every layer, "
                        "every step reads all; the reference) (default: live)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (Engine(compile=True)); recorded in "
                        "the JSON")
    p.add_argument("--compile-prefill", action="store_true",
                   help="torch.compile the prefill too, with dynamic prompt lengths "
                        "(Engine(compile_prefill=True)); recorded in the JSON")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights and the random prompts")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write the results here, rewritten after each mode so that a "
                        "cut-off run keeps its rows (default: none)")
    p.add_argument("--plot", type=Path, metavar="FILE",
                   help="write a bar chart (PNG) of the results (default: none)")
    p.add_argument("--transport", choices=("nvlink", "host-memory", "socket"),
                   help="emulate a transport (NCCL only; as tools/bench_allreduce.py), "
                        "recorded as the JSON's transport (default: from the environment)")
    p.add_argument("--compare-to", type=Path, metavar="FILE",
                   help="an earlier run's --json: print each row's time against it, and "
                        "the decode-step profiles side by side (default: none)")
    p.add_argument("--from-json", type=Path, nargs="+", metavar="FILE",
                   help="only plot these result files, ours and tools/bench_hf_generate.py's "
                        "(needs --plot; default: measure)")
    return p


def _fail(message: str) -> None:
    sys.exit(report_error(message, code=2))


def _parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        try:
            tokens, batch = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            _fail(f"bad prefill case {item!r}: expected TOKENSxBATCH, e.g. 8192x1")
        if tokens < 1 or batch < 1:
            _fail(f"bad prefill case {item!r}: sizes must be positive")
        cases.append((tokens, batch))
    return cases


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        _fail(f"bad {what} {text!r}: expected a comma list of integers")
    if any(v < 1 for v in vals):
        _fail(f"bad {what} {text!r}: values must be positive")
    return vals


# ----------------------------------------------------------------------------- comm modes
def _skip_reduce_communicator(base):
    from megatron_lite.comm.communicator import WrappingCommunicator

    class SkipReduceCommunicator(WrappingCommunicator):
        """``none`` mode: ``all_reduce`` returns its input, unsummed. The model's output is
        wrong; its time is the lower bound of any all-reduce. Gathers go to ``base``."""

        def all_reduce(self, x, site=None):
            return x

    return SkipReduceCommunicator(base)


def make_communicator(label: str, spec, base, num_layers: int, max_bytes: int = 64 << 20):
    """The communicator of one row: the base for native, the skip-reduce lower bound, or
    what ``build_communicator`` makes of the spec (the fused kernels' workspace sized for
    the largest message of the run: a 70B layer's 8k-token reduce exceeds the default)."""
    from megatron_lite.comm.build import build_communicator
    if label == LOWER_BOUND:
        return _skip_reduce_communicator(base)
    return build_communicator(base, spec, num_layers=num_layers,
                              max_bytes=max(max_bytes, 64 << 20))


def explain(comm, examples, hidden: int, dtype, device) -> dict:
    """Which backend serves a row-parallel all-reduce of [rows, hidden] (for the record)."""
    import torch
    out = {}
    for label, rows in examples:
        x = torch.empty((rows, hidden), dtype=dtype, device=device)
        out[label] = comm.explain(x, "layers.0.mlp.down_proj")
    return out


# ----------------------------------------------------------------------------- report
def _prefill_how(result: dict, row: dict) -> str:
    """How a prefill row ran, as the summary names it: '' for graphed, else ' compiled'
    (``--compile-prefill``) or ' eager'."""
    if row.get("graph", True):
        return ""
    return " compiled" if result.get("compiled_prefill") else " eager"


def _case_label(tokens: int, batch: int) -> str:
    t = f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)
    return t if batch == 1 else f"{batch}x{t}"


def summarize(result: dict) -> str:
    from megatron_lite.lab.benchmark import compute_ms
    rows = [r for r in result["rows"] if not r.get("extra")]
    comms = list(dict.fromkeys(r["comm"] for r in rows))
    lines = [f"{result['shape']} TP{result['tp']} on {result['device']}  (ms; prefill = TTFT,"
             f" decode = TPOT at {result.get('context', '?')} context)"]
    head = f"{'phase':8s} {'case':>7s} " + " ".join(f"{c:>10s}" for c in comms)
    lines.append(head)
    keys = list(dict.fromkeys((r["phase"], r["batch"], r["tokens"]) for r in rows))
    table = {(r["phase"], r["batch"], r["tokens"], r["comm"]): r["ms"] for r in rows}
    for ph, b, t in keys:
        label = _case_label(t, b) if ph == "prefill" else f"b{b}"
        cells = [table.get((ph, b, t, c)) for c in comms]
        lines.append(f"{ph:8s} {label:>7s} " + " ".join(
            f"{v:10.3f}" if v is not None else f"{'-':>10s}" for v in cells))
    for r in result.get("ttft_comm_removed", []):
        lines.append(f"TTFT {_case_label(r['tokens'], r['batch'])}: comm time removed by "
                     f"{r['comm']}: {100 * r['ratio']:.0f}%  ((T_native - T_spec) / "
                     f"(T_native - T_skip-reduce))")
    if result.get("tpot_floor_ms"):
        lines.append(f"weight-streaming floor (batch 1): {result['tpot_floor_ms']:.3f} ms = "
                     f"{result['streamed_weight_bytes_per_gpu'] / 1e9:.2f} GB / "
                     f"{result['hbm_GBps']:.0f} GB/s")
        for c in comms:
            v = table.get(("decode", 1, result.get("context"), c))
            if v is not None:
                lines.append(f"  TPOT b1 {c}: {v / result['tpot_floor_ms']:.2f}x floor")
    if result.get("matmul_TFLOPs"):
        lines.append(f"compute floor of prefill: its FLOPs at {result['matmul_TFLOPs']:.3g} "
                     "TFLOP/s (a dense matmul)")
        sustained = result.get("matmul_sustained_TFLOPs")
        for r in result["rows"]:
            if r["phase"] == "prefill" and r.get("floor_ms") and r["comm"] == NATIVE:
                lines.append(f"  TTFT {_case_label(r['tokens'], r['batch'])} {r['comm']}"
                             f"{_prefill_how(result, r)}: {r['ms']:.3f} ms = "
                             f"{r['ms'] / r['floor_ms']:.2f}x floor ({r['floor_ms']:.3f} ms, "
                             f"{r['flops'] / 1e12:.3g} TFLOP)"
                             + (f"; {r['ms'] / compute_ms(r['flops'], sustained):.2f}x at "
                                f"the sustained {sustained:.3g} TFLOP/s" if sustained else ""))
    kv = {r["batch"]: r for r in rows if r["phase"] == "decode" and "kv_cache_bytes" in r}
    for b, r in kv.items():
        lines.append(f"KV cache b{b} ({result.get('kv_layout', 'full')}): "
                     f"{r['kv_cache_bytes'] / 2**20:.1f} MiB per GPU, a step reads "
                     f"{r['kv_read_bytes'] / 2**20:.1f} MiB; floor with KV reads "
                     f"{r['floor_ms']:.3f} ms")
    return "\n".join(lines)


def compute_floor(model, tokens: int, batch: int, result: dict) -> dict:
    """A prefill row's compute floor (this GPU): the FLOPs it must do
    (``lab.benchmark.prefill_flops``) at the dense matmul rate measured in the same run."""
    from megatron_lite.lab.benchmark import compute_ms, prefill_flops
    flops = prefill_flops(model, tokens, batch)
    return dict(flops=flops, floor_ms=compute_ms(flops, result["matmul_TFLOPs"]))


def kv_figures(cache, context: int, result: dict) -> dict:
    """A decode row's KV-cache figures (this GPU): the cache's bytes, the bytes a step at
    ``context`` reads, and the step's floor: streamed weights plus those reads at the
    measured HBM bandwidth."""
    read = cache.read_bytes(cache.read_len(context + 1))
    floor = (result["streamed_weight_bytes_per_gpu"] + read) / (result["hbm_GBps"] * 1e9)
    return dict(kv_cache_bytes=cache.nbytes, kv_read_bytes=read, floor_ms=floor * 1e3)


def comm_removed(rows: list[dict]) -> list[dict]:
    """(T_native - T_x) / (T_native - T_skip) for every prefill case and spec."""
    t = {(r["batch"], r["tokens"], r["comm"]): r["ms"] for r in rows
         if r["phase"] == "prefill"}
    out = []
    for (b, L, c), v in t.items():
        if c in (NATIVE, LOWER_BOUND):
            continue
        nccl, none = t.get((b, L, NATIVE)), t.get((b, L, LOWER_BOUND))
        if nccl is None or none is None or nccl - none <= 0:
            continue
        out.append(dict(batch=b, tokens=L, comm=c, ratio=(nccl - v) / (nccl - none),
                        comm_ms_nccl=nccl - none))
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for res in results for r in res["rows"] if not r.get("extra")]
    if not rows:
        raise ValueError("nothing to plot: no rows")
    title = ", ".join(sorted({f"{res['shape']} TP{res['tp']}" for res in results}))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, phase in zip(axes, ("prefill", "decode")):
        sel = [r for r in rows if r["phase"] == phase]
        cases = list(dict.fromkeys((r["batch"], r["tokens"]) for r in sel))
        comms = list(dict.fromkeys(r["comm"] for r in sel))
        val = {(r["batch"], r["tokens"], r["comm"]): r["ms"] for r in sel}
        width = 0.8 / max(1, len(comms))
        for i, c in enumerate(comms):
            xs = [k + i * width for k, case in enumerate(cases) if (*case, c) in val]
            ys = [val[(*case, c)] for case in cases if (*case, c) in val]
            ax.bar(xs, ys, width, label=c)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
        ax.set_xticklabels([_case_label(t, b) if phase == "prefill" else f"batch {b}"
                            for b, t in cases])
        ax.set_yscale("log")
        ax.set_ylabel("TTFT (ms)" if phase == "prefill" else "TPOT (ms/token)")
        ax.set_title(f"{phase}: {title}")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + f".tmp-{os.getpid()}" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main
def _build_engine(args, group, device, dtype):
    from megatron_lite import Engine
    from megatron_lite.lab.random_init import random_model, resolve_shape
    if args.ckpt is not None:
        engine = Engine.from_pretrained(args.ckpt, group=group, dtype=dtype, device=device,
                                        compile=args.compile,
                                        compile_prefill=args.compile_prefill,
                                        kv_layout=args.kv_layout)
        engine.eos_token_ids = ()   # timing runs never stop early
        return engine, args.ckpt.name, engine.model
    model = random_model(resolve_shape(args.random_weights), group, device=device, dtype=dtype,
                         seed=args.seed)
    return (Engine(model, None, max_batch_size=64, compile=args.compile,
                   compile_prefill=args.compile_prefill, kv_layout=args.kv_layout),
            args.random_weights, model)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json:
        if not args.plot:
            _fail("--from-json needs --plot FILE")
        try:
            results = [json.loads(p.read_text()) for p in args.from_json]
            plot(results, args.plot)
        except (OSError, ValueError, KeyError) as e:
            _fail(f"cannot plot: {e}")
        for res in results:
            print(summarize(res))
        return 0
    if args.ckpt is None and args.random_weights is None:
        _fail("give --ckpt DIR or --random-weights SHAPE (or --from-json to plot)")
    before = None
    if args.compare_to is not None:
        try:
            before = json.loads(args.compare_to.read_text())
        except (OSError, ValueError) as e:
            _fail(f"--compare-to {args.compare_to}: cannot read it ({e})")
        if not isinstance(before, dict) or not isinstance(before.get("rows"), list):
            _fail(f"--compare-to {args.compare_to}: not a tools/bench_generate.py --json file")
    from megatron_lite.comm.spec import parse_comm
    from megatron_lite.errors import MegatronLiteError
    modes = {NATIVE: parse_comm(NATIVE)}
    for text in args.comm or DEFAULT_COMMS:
        try:
            spec = parse_comm(text, args.calibration)
        except MegatronLiteError as e:
            _fail(f"--comm {text!r}: {e}")
        if not spec.is_native:
            modes[text.strip()] = spec
    if args.lower_bound:
        modes[LOWER_BOUND] = None
    cases = _parse_cases(args.prefill)
    batches = _parse_ints(args.decode_batches, "--decode-batches")
    if args.random_weights is not None:
        from megatron_lite.lab.random_init import resolve_shape, shape_names
        try:
            resolve_shape(args.random_weights)
        except ValueError:
            _fail(f"unknown shape {args.random_weights!r}; choose one of "
                  f"{', '.join(shape_names())} or give a config.json")
    if args.ckpt is not None and not args.ckpt.is_dir():
        _fail(f"checkpoint directory {args.ckpt} does not exist")

    import torch
    if args.transport and not torch.cuda.is_available():
        _fail("--transport needs NCCL on CUDA GPUs (gloo runs over sockets)")
    # NVLink multicast can take the host's GPUs out of service (device notes): keep it off.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    from megatron_lite.inference.engine import _resolve_device_dtype
    from megatron_lite.lab.benchmark import (Clock, apply_transport, measure_hbm_GBps,
                                             measure_matmul_TFLOPs, nccl_version,
                                             transport_label, write_json)
    from megatron_lite.lab.gpu_clocks import ClockSampler, clocks_label
    apply_transport(args.transport)
    from megatron_lite.lab.random_init import streamed_weight_bytes, total_weight_bytes
    from megatron_lite.parallel_state import initialize_model_parallel

    group = initialize_model_parallel()
    rank, tp = group.rank, group.world_size
    device, dtype = _resolve_device_dtype(None, args.dtype)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    try:
        engine, shape_name, model = _build_engine(args, group, device, dtype)
    except (MegatronLiteError, ValueError) as e:
        _fail(str(e))
    cfg = engine.cfg
    longest = max([t for t, _ in cases] + [args.context + 1])
    if longest > cfg.max_position_embeddings:
        _fail(f"{longest} tokens exceed max_position_embeddings {cfg.max_position_embeddings}")
    clock = Clock(device)
    graphs = device.type == "cuda"

    hbm = measure_hbm_GBps(device, args.hbm_gib, clock)
    tflops = measure_matmul_TFLOPs(device, dtype, clock)
    with ClockSampler(device) as sampled:   # the rate under the power limit, for reference
        sustained = measure_matmul_TFLOPs(device, dtype, clock, repeats=200) if graphs else None
    streamed = streamed_weight_bytes(model)
    result = dict(
        device=torch.cuda.get_device_name(device) if graphs else "cpu", tp=tp, shape=shape_name,
        date=datetime.date.today().isoformat(), torch=torch.__version__,
        nccl=nccl_version() if graphs else None,
        transport=transport_label(torch.distributed.get_backend()
                                  if torch.distributed.is_initialized() else "none"),
        dtype=str(dtype).replace("torch.", ""), context=args.context,
        decode_steps=args.decode_steps, prefill_repeats=args.repeats, cuda_graphs=graphs,
        compiled_decode=args.compile, compiled_prefill=args.compile_prefill,
        kv_layout=args.kv_layout,
        hbm_GBps=hbm, weight_bytes_per_gpu=total_weight_bytes(model),
        streamed_weight_bytes_per_gpu=streamed, tpot_floor_ms=streamed / (hbm * 1e9) * 1e3,
        matmul_TFLOPs=tflops, matmul_sustained_TFLOPs=sustained,
        matmul_sustained_clocks=sampled.summary(), checks={}, backends={}, skipped={}, rows=[])
    say(f"{shape_name} TP{tp} on {result['device']}: {streamed / 1e9:.2f} GB streamed weights "
        f"per GPU, HBM copy {hbm:.0f} GB/s -> TPOT floor {result['tpot_floor_ms']:.3f} ms; "
        f"{str(dtype).replace('torch.', '')} matmul {tflops:.3g} TFLOP/s"
        + (f" ({sustained:.3g} sustained over 200 products: "
           f"{clocks_label(result['matmul_sustained_clocks'])})" if sustained else ""))

    def save():
        if rank == 0 and args.json:
            result["ttft_comm_removed"] = comm_removed(result["rows"])
            write_json(args.json, result)

    with torch.inference_mode():
        _run_modes(args, engine, group, modes, cases, batches, result, clock, say, save)
    if before is not None:
        from megatron_lite.lab.benchmark import compare_runs, format_comparison
        result["compared_to"] = dict(compare_runs(result, before), file=str(args.compare_to))
    save()
    say(summarize(dict(result, ttft_comm_removed=comm_removed(result["rows"]))))
    if before is not None:
        say(format_comparison(result["compared_to"]))
    if rank == 0 and args.plot:
        plot([result], args.plot)
    group.barrier()
    return 0


def _clocks_note(clocks) -> str:
    from megatron_lite.lab.gpu_clocks import clocks_label
    return f"  [{clocks_label(clocks)}]" if clocks else ""


def _run_modes(args, engine, group, modes, cases, batches, result, clock, say, save):
    import torch

    from megatron_lite.lab.benchmark import (check_mode, graph_matches_eager, profile_prefill,
                                             time_decode, time_prefill)
    from megatron_lite.lab.gpu_clocks import ClockSampler
    from tqdm import tqdm
    cfg, device, dtype, rank = engine.cfg, engine.device, engine.dtype, group.rank
    graphs, base = result["cuda_graphs"], group.communicator
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    check_prompts = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen).to(device)
    # a prompt whose TP sums are >= --check-long-mib, so the checks also cover the paths
    # that serve prefill-sized messages (fused quantized kernels), not only decode's
    long_len = min(cfg.max_position_embeddings,
                   max(1, int(args.check_long_mib * 2 ** 20) // (2 * cfg.hidden_size)))
    long_prompt = (torch.randint(0, cfg.vocab_size, (1, long_len), generator=gen).to(device)
                   if args.check_long_mib > 0 else None)
    reference = None
    if graphs and args.check_tokens:
        result["checks"]["graph_vs_eager"] = graph_matches_eager(engine)
        say(f"check graph vs eager: {result['checks']['graph_vs_eager']}")
    sizes = [("decode_b1", 1), ("decode_b64", 64), ("prefill_8k", 8192)]
    # largest TP-sum message (bf16 hidden states of the longest prefill), for the workspace
    max_message = max(t * b for t, b in cases) * cfg.hidden_size * 2
    for mode, spec in tqdm(modes.items(), desc="comm", disable=rank != 0):
        try:
            comm = make_communicator(mode, spec, base, cfg.num_layers, max_message)
        except (ValueError, OSError) as e:   # e.g. a calibration made for another model
            result["skipped"][mode] = str(e)
            say(f"[{mode}] skipped: {e}")
            continue
        group.communicator = comm
        engine._graphs = None   # graphs captured with another communicator must not replay
        result["backends"][mode] = explain(comm, sizes, cfg.hidden_size, dtype, device)
        say(f"[{mode}] backends: {result['backends'][mode]}")
        if args.check_tokens and mode != LOWER_BOUND:
            report, out = check_mode(engine, check_prompts, args.check_tokens, reference,
                                     long_prompt)
            if mode == NATIVE:
                reference = out
            result["checks"][mode] = report
            ok = report["ranks_identical"] and report["logits_finite"]
            uncompressed = spec is not None and all(c.name == "bf16" for c in spec.codecs())
            if uncompressed and "tokens_equal_to_nccl" in report:
                ok = ok and report["tokens_equal_to_nccl"]
            say(f"[{mode}] check {'ok' if ok else 'FAILED'}: {report}")
        longest = max(cases, key=lambda c: c[0] * c[1]) if cases else None
        for tokens, batch in cases:
            ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=gen).to(device)
            sampled = ClockSampler(device)
            ms = time_prefill(engine, ids, args.repeats, clock, sampled)
            clocks = sampled.summary()
            if args.profile and device.type == "cuda" and (tokens, batch) == longest \
                    and mode in (NATIVE, "auto"):
                save()   # keep the rows so far if the profiler brings the process down
                prof = dict(tokens=tokens, batch=batch, **profile_prefill(engine, ids))
                result.setdefault("prefill_profile", {})[mode] = prof
                say(f"[{mode}] prefill {_case_label(tokens, batch)} kernels: {prof}")
            graphed = bool(graphs and engine.graph_prefill and engine._prefill_fits(tokens))
            floor = compute_floor(engine.model, tokens, batch, result)
            result["rows"].append(dict(phase="prefill", batch=batch, tokens=tokens, comm=mode,
                                       ms=ms, graph=graphed, clocks=clocks, **floor))
            say(f"[{mode}] prefill {_case_label(tokens, batch):>6s}: {ms:9.3f} ms"
                + (" (graphed)" if graphed else "") + _clocks_note(clocks))
            if args.eager_prefill and graphed and mode == NATIVE:
                engine.graph_prefill = False
                sampled = ClockSampler(device)
                ms = time_prefill(engine, ids, args.repeats, clock, sampled)
                engine.graph_prefill = True
                clocks = sampled.summary()
                result["rows"].append(dict(phase="prefill", batch=batch, tokens=tokens,
                                           comm=mode, ms=ms, graph=False, extra=True,
                                           clocks=clocks, **floor))
                say(f"[{mode}] prefill {_case_label(tokens, batch):>6s} eager: {ms:9.3f} ms"
                    + _clocks_note(clocks))
        engine.cache = None
        for batch in batches:
            prof_this = (args.profile and graphs and batch == 1
                         and mode in (NATIVE, "auto"))
            if prof_this:
                save()   # keep the rows so far if the profiler brings the process down
            sampled = ClockSampler(device)
            ms, prof = time_decode(engine, batch, args.context, args.decode_steps, clock,
                                   graphs, profile=prof_this, sampler=sampled)
            clocks = sampled.summary()
            result["rows"].append(dict(phase="decode", batch=batch, tokens=args.context,
                                       comm=mode, ms=ms, graph=graphs, clocks=clocks,
                                       **kv_figures(engine.cache, args.context, result)))
            say(f"[{mode}] decode  b{batch:<4d}: {ms:9.3f} ms/token" + _clocks_note(clocks))
            if prof is not None:
                result.setdefault("decode_profile_b1", {})[mode] = prof
                say(f"[{mode}] decode b1 kernels: {prof}")
            if args.eager_decode and graphs and batch == 1 and mode == NATIVE:
                ms, _ = time_decode(engine, 1, args.context, 20, clock, graph=False)
                result["rows"].append(dict(phase="decode", batch=1, tokens=args.context,
                                           comm=mode, ms=ms, graph=False, extra=True))
                say(f"[{mode}] decode  b1 eager: {ms:9.3f} ms/token")
            engine.cache = None
            if graphs:
                torch.cuda.empty_cache()
        group.communicator = base
        save()


if __name__ == "__main__":
    sys.exit(main())
