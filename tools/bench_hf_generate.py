"""HF transformers' own tensor parallelism on a random-weight serving shape: the baseline a
user would otherwise reach for, timed like tools/bench_generate.py times our engine.

    torchrun --nproc_per_node=4 tools/bench_hf_generate.py --shape llama3-8b \\
        --json docs/benchmarks/hf_llama3-8b_tp4.json

Rank 0 builds the model from the shape's config on its GPU in bf16, with transformers' own
initialisation (normal(0, initializer_range) linears, as our --random-weights scheme), and
saves it to a local directory. Every rank then loads it with ``tp_plan="auto"`` and
measures, through ``model.generate`` (greedy):
  TTFT  = time of generate(max_new_tokens=1) on a prompt of L tokens;
  TPOT  = (time of generate(max_new_tokens=1+n) - TTFT) / n at a 1k context.
Times are CUDA-event medians over --repeats runs after one warm-up (perf_counter on a CPU
smoke run under gloo), the largest of the ranks' medians. Output rows follow the schema of
tools/bench_generate.py with comm="hf-tp". The loaded model is checked to be really split
(rank-local q_proj rows == heads * head_dim / world) before anything is timed.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

from megatron_lite.cli.common import make_parser  # noqa: E402
from megatron_lite.errors import report_error  # noqa: E402
from megatron_lite.lab.shapes import SHAPES  # noqa: E402  (a table: no torch)


def _log(rank: int, *a) -> None:
    if rank == 0:
        print(*a, flush=True)


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--shape", default="llama3-8b", metavar="SHAPE",
                   help=f"serving shape: {', '.join(SHAPES)}, or a CPU test shape of "
                        "megatron_lite/lab/random_init.py (tiny, ...)")
    p.add_argument("--prefill", default="512x1,2048x1,8192x1,1024x8", metavar="CASES",
                   help="comma list of TOKENSxBATCH prefill cases for TTFT")
    p.add_argument("--decode-batches", default="1,16", metavar="BATCHES",
                   help="comma list of batch sizes for TPOT")
    p.add_argument("--context", type=int, default=1024, metavar="N",
                   help="prompt tokens before the timed decode tokens (TPOT)")
    p.add_argument("--decode-tokens", type=int, default=16, metavar="N",
                   help="decode tokens per TPOT measurement")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="timed runs per case (median)")
    p.add_argument("--workdir", default=None, metavar="DIR",
                   help="where rank 0 saves the random checkpoint, reused if there "
                        "(default: $TMPDIR/hf_random_SHAPE)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write the rows in tools/bench_generate.py's schema (default: none)")
    return p


def _parse_list(text: str, option: str, sep: str = None) -> list:
    """Comma list of positive integers, or of TOKENSxBATCH pairs (``sep="x"``)."""
    out = []
    for item in text.split(","):
        try:
            vals = tuple(int(v) for v in item.strip().lower().split(sep)) if sep \
                else (int(item),)
        except ValueError:
            vals = ()
        if len(vals) != (2 if sep else 1) or min(vals) < 1:
            want = "TOKENSxBATCH, e.g. 8192x1" if sep else "a positive integer"
            raise ValueError(f"bad {option} item {item!r}: expected {want}")
        out.append(vals if sep else vals[0])
    return out


def _load_tp(path: str, dtype):
    """``from_pretrained`` with transformers' own TP plan. transformers 5.17 (the GPU image)
    takes ``tp_plan="auto"``; 5.18+ deprecates it for ``distributed_config``."""
    import transformers
    from transformers import AutoModelForCausalLM
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    if (major, minor) >= (5, 18):
        from transformers.distributed import DistributedConfig
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, tp_plan="auto")


def _check_split(model, world: int, device) -> None:
    """Refuse to time a model that TP did not split (or left on the wrong device)."""
    cfg = model.config
    w = model.model.layers[0].self_attn.q_proj.weight
    local = w.to_local() if hasattr(w, "to_local") else w
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    want = cfg.num_attention_heads * head_dim // world
    if local.shape[0] != want or local.device.type != device.type:
        raise RuntimeError(f"transformers did not split the model: q_proj is "
                           f"{tuple(local.shape)} on {local.device}, expected {want} rows "
                           f"on {device.type}")


def _timed(fn, repeats: int, clock, device) -> float:
    import torch.distributed as dist

    from megatron_lite.lab.benchmark import max_over_ranks
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        dist.barrier()
        clock.sync()
        start = clock.stamp()
        fn()
        end = clock.stamp()
        clock.sync()
        times.append(clock.ms(start, end))
    return max_over_ranks(statistics.median(times), device)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cases = _parse_list(args.prefill, "--prefill", sep="x")
        batches = _parse_list(args.decode_batches, "--decode-batches")
        for name in ("context", "decode_tokens", "repeats"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        from megatron_lite.lab.random_init import resolve_shape, shape_names
        if args.shape not in shape_names():
            raise ValueError(f"--shape {args.shape!r}: choose one of {', '.join(shape_names())}")
    except ValueError as e:
        return report_error(e, code=2)

    import torch
    import torch.distributed as dist

    from megatron_lite.lab.benchmark import Clock, write_json

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")   # multicast stays off (device notes)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device, dtype = torch.device("cuda", local_rank), torch.bfloat16
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:   # CPU smoke run (gloo); fp32 because CPU bf16 matmuls are slow
        device, dtype = torch.device("cpu"), torch.float32
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    clock = Clock(device)

    workdir = args.workdir or os.path.join(tempfile.gettempdir(), f"hf_random_{args.shape}")
    if rank == 0 and not os.path.exists(os.path.join(workdir, "config.json")):
        from transformers import AutoConfig, AutoModelForCausalLM
        shape = resolve_shape(args.shape)
        shape.pop("torch_dtype", None)
        cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        _log(rank, f"saving random {args.shape} to {workdir}")
        model.save_pretrained(workdir + ".tmp", safe_serialization=True)
        os.replace(workdir + ".tmp", workdir)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dist.barrier()
    model = _load_tp(workdir, dtype)
    model.eval()
    _check_split(model, world, device)
    vocab = model.config.vocab_size
    gen = torch.Generator(device=device).manual_seed(1234)
    rows = []

    def generate(ids, n):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           attention_mask=torch.ones_like(ids), pad_token_id=0)

    for tokens, batch in cases:
        ids = torch.randint(0, vocab, (batch, tokens), device=device, generator=gen)
        ms = _timed(lambda: generate(ids, 1), args.repeats, clock, device)
        rows.append(dict(phase="prefill", batch=batch, tokens=tokens, comm="hf-tp", ms=ms))
        _log(rank, f"prefill  batch {batch:3d} tokens {tokens:5d}: {ms:9.2f} ms")
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, args.context), device=device, generator=gen)
        t1 = _timed(lambda: generate(ids, 1), args.repeats, clock, device)
        tn = _timed(lambda: generate(ids, 1 + args.decode_tokens), args.repeats, clock, device)
        ms = (tn - t1) / args.decode_tokens
        rows.append(dict(phase="decode", batch=batch, tokens=args.context, comm="hf-tp", ms=ms))
        _log(rank, f"decode   batch {batch:3d} context {args.context:5d}: {ms:9.2f} ms/token")

    if rank == 0 and args.json:
        import datetime
        import transformers
        out = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   tp=world, shape=args.shape, date=datetime.date.today().isoformat(),
                   transformers=transformers.__version__, torch=torch.__version__,
                   context=args.context, decode_tokens=args.decode_tokens,
                   repeats=args.repeats, rows=rows)
        write_json(Path(args.json), out)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
