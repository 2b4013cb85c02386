#!/usr/bin/env python
"""Accuracy of low-bit communication: every ``--comm`` codec against bf16 communication.

    python tools/evaluate.py --ckpt DIR --tp 4 --comm int8 --comm int4:128 \\
        --text wiki.txt --max-tokens 16384 --task lambada.jsonl --task arc_easy.jsonl \\
        --json out.json --markdown out.md --plot out.png
    torchrun --nproc_per_node=2 tools/evaluate.py --ckpt DIR --tp 2 ...   # real TP

Without torchrun the N ranks are simulated in one process (threads; bit-exact with the
real multi-process run). Measures, each vs the bf16 row (always included, first):
perplexity over non-overlapping ``--window`` windows of ``--text``, KL(bf16 || codec) and
top-1 agreement of next-token distributions over the same tokens, and accuracy on each
``--task`` file (cloze ``{"context","target"}``: greedy exact match of all target tokens;
multiple choice ``{"contexts","continuations","label"}``: arg-max of the per-character
normalised log-likelihood, acc_norm, reported as primary). Definitions:
``megatron_lite/lab/eval/metrics.py``.

Outputs: a markdown table on stdout (and ``--markdown FILE``) with paired standard errors,
``--json FILE`` in the issue's exact schema, ``--details FILE`` with uncertainties and
sample sizes, ``--plot FILE`` (quality vs bits per value). Bad input: one line
``error: ...`` on stderr, exit 1, nothing written.
"""
from __future__ import annotations

import argparse
import os
import sys

from megatron_lite.errors import report_error  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Accuracy of comm codecs vs bf16 communication.")
    p.add_argument("--ckpt", required=True, help="HF directory or shard directory (TP == --tp)")
    p.add_argument("--tp", type=int, help="TP size (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--comm", action="append", default=[], metavar="SPEC",
                   help="codec config in --comm syntax, e.g. int4:128 or "
                        "'int4,layers.0.*=int8' (repeatable; bf16 is always added)")
    p.add_argument("--calibration", help="calibration file (outlier-int4)")
    p.add_argument("--text", help="text file for perplexity / KL / top-1 agreement")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="scored text tokens (rounded down to whole windows; default 16384)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--task", action="append", default=[], metavar="FILE",
                   help="cloze or multiple-choice jsonl (repeatable)")
    p.add_argument("--task-limit", type=int, metavar="N", help="first N items of each task")
    p.add_argument("--batch-tokens", type=int, default=1024,
                   help="tokens per forward batch, padding included (default 1024)")
    p.add_argument("--batch-rows", type=int, default=512,
                   help="logit rows per task batch (memory bound at large vocab; default 512)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="model compute dtype (default fp32: the codec is the only rounding)")
    p.add_argument("--json", help="write the issue's JSON")
    p.add_argument("--details", help="write JSON with uncertainties and sample sizes")
    p.add_argument("--markdown", help="write the markdown table")
    p.add_argument("--plot", help="write a PNG of quality vs bits per value")
    p.add_argument("--no-progress", action="store_true")
    return p


def _fail(message) -> int:
    return report_error(message)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron_lite.errors import MegatronLiteError
    from megatron_lite.lab.eval import report
    from megatron_lite.lab.eval.runner import torchrun_world_size
    from megatron_lite.lab.eval.study import StudyArgs, details_doc, execute, prepare

    world = torchrun_world_size()
    simulated = world is None
    tp = args.tp if args.tp is not None else (world or 1)
    if not simulated and tp != world:
        return _fail(f"--tp {tp} but torchrun started {world} ranks")
    rank = int(os.environ.get("RANK", "0"))
    sa = StudyArgs(ckpt=args.ckpt, tp=tp, comms=args.comm, calibration=args.calibration,
                   text=args.text, max_tokens=args.max_tokens, window=args.window,
                   tasks=args.task, task_limit=args.task_limit, batch_tokens=args.batch_tokens,
                   batch_rows=args.batch_rows,
                   dtype=torch.float32 if args.dtype == "fp32" else torch.bfloat16,
                   simulated=simulated, progress=not args.no_progress and rank == 0)
    try:
        if args.batch_tokens < 1 or args.batch_rows < 1:
            raise ValueError("--batch-tokens and --batch-rows must be >= 1")
        prep = prepare(sa)   # every rank validates the same inputs before any collective
    except (MegatronLiteError, ValueError, OSError) as e:
        return _fail(e)
    if rank == 0:
        n_text = f"{prep.text.num_tokens} tokens in {len(prep.text.windows)} windows" \
            if prep.text else "no text"
        tasks = ", ".join(f"{t.name} ({t.kind}, {len(t.items)} items)" for t in prep.tasks)
        print(f"{prep.model_name} at {'simulated' if simulated else 'real'} TP {tp}: "
              f"{len(prep.codec_names)} codecs; {n_text}; {tasks or 'no tasks'}",
              file=sys.stderr, flush=True)
    rows = execute(prep)
    if rows is None:
        return 0
    meta = {t.name: {"kind": t.kind, "n": len(t.items)} for t in prep.tasks}
    md = report.markdown_table(rows, meta)
    print(md, end="")
    if args.markdown:
        report.atomic_write(args.markdown, md.encode())
    if args.json:
        report.write_json(args.json, report.json_doc(prep.model_name, tp, simulated, rows))
    if args.details:
        import json
        report.atomic_write(args.details,
                             (json.dumps(details_doc(prep, rows), indent=2) + "\n").encode())
    if args.plot:
        report.plot(rows, args.plot, f"{prep.model_name}, {'simulated ' if simulated else ''}"
                                     f"TP {tp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
