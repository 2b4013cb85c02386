"""HF transformers' own tensor parallelism on a random-weight serving shape: the baseline a
user would otherwise reach for (issue 5).

    torchrun --nproc_per_node=4 tools/bench_hf_generate.py --shape llama3-8b \
        --json docs/benchmarks/hf_llama3-8b_tp4.json

Rank 0 builds the model from the shape's config on its GPU in bf16, with transformers' own
initialisation (normal(0, initializer_range) linears, as our --random-weights scheme), and
saves it to a local directory. Every rank then loads it with ``tp_plan="auto"`` and
measures, through ``model.generate`` (greedy):
  TTFT  = time of generate(max_new_tokens=1) on a prompt of L tokens;
  TPOT  = (time of generate(max_new_tokens=1+n) - TTFT) / n at a 1k context.
Times are CUDA-event medians over --repeats runs after one warm-up. Output rows follow the
same schema as tools/bench_generate.py with comm="hf-tp".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_lite.models.shapes import SHAPES, get_shape  # noqa: E402


def _log(rank: int, *a) -> None:
    if rank == 0:
        print(*a, flush=True)


def _load_tp(path: str):
    from transformers import AutoModelForCausalLM
    try:  # transformers >= 5.18 spells it DistributedConfig; 5.17 takes tp_plan directly
        from transformers.distributed import DistributedConfig
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16, distributed_config=DistributedConfig(tp_plan="auto"))
    except (ImportError, TypeError):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, tp_plan="auto")


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--prefill", default="512x1,2048x1,8192x1,1024x8",
                   help="comma list of TOKENSxBATCH prefill cases")
    p.add_argument("--decode-batches", default="1,16")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where rank 0 saves the random checkpoint")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()

    workdir = args.workdir or os.path.join(tempfile.gettempdir(), f"hf_random_{args.shape}")
    if rank == 0 and not os.path.exists(os.path.join(workdir, "config.json")):
        from transformers import AutoConfig, AutoModelForCausalLM
        shape = get_shape(args.shape)
        cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        _log(rank, f"saving random {args.shape} to {workdir}")
        model.save_pretrained(workdir + ".tmp", safe_serialization=True)
        os.replace(workdir + ".tmp", workdir)
        del model
        torch.cuda.empty_cache()
    dist.barrier()
    model = _load_tp(workdir)
    model.eval()
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cuda").manual_seed(1234)
    rows = []

    def generate(ids, n):
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           attention_mask=torch.ones_like(ids), pad_token_id=0)

    for case in args.prefill.split(","):
        tokens, batch = (int(v) for v in case.split("x"))
        ids = torch.randint(0, vocab, (batch, tokens), device="cuda", generator=gen)
        ms = _timed(lambda: generate(ids, 1), args.repeats)
        rows.append(dict(phase="prefill", batch=batch, tokens=tokens, comm="hf-tp", ms=ms))
        _log(rank, f"prefill  batch {batch:3d} tokens {tokens:5d}: {ms:9.2f} ms")
    for batch in (int(b) for b in args.decode_batches.split(",")):
        ids = torch.randint(0, vocab, (batch, args.context), device="cuda", generator=gen)
        t1 = _timed(lambda: generate(ids, 1), args.repeats)
        tn = _timed(lambda: generate(ids, 1 + args.decode_tokens), args.repeats)
        ms = (tn - t1) / args.decode_tokens
        rows.append(dict(phase="decode", batch=batch, tokens=args.context, comm="hf-tp", ms=ms))
        _log(rank, f"decode   batch {batch:3d} context {args.context:5d}: {ms:9.2f} ms/token")

    if rank == 0 and args.json:
        import transformers
        out = dict(device=torch.cuda.get_device_name(), tp=world, shape=args.shape,
                   transformers=transformers.__version__, torch=torch.__version__, rows=rows)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
