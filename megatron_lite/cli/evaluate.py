"""Accuracy of low-bit communication: every --comm spec against bf16 communication.

    python tools/evaluate.py --ckpt DIR --tp 4 --comm int8 --comm int4:128 \\
        --text wiki.txt --max-tokens 16384 --task lambada.jsonl --task arc_easy.jsonl \\
        --json out.json --markdown out.md --plot out.png
    python tools/evaluate.py --ckpt DIR --tp 2 --comm int4:128 --text python-docs
    torchrun --nproc_per_node=2 tools/evaluate.py --ckpt DIR --tp 2 ...   # real TP

Without torchrun the N ranks are simulated in one process (threads; bit-exact with the
real multi-process run). Measures, each against the bf16 row (always included, first):
perplexity over non-overlapping --window windows of --text, KL(bf16 || codec) and top-1
agreement of the next-token distributions over the same tokens, and accuracy on each
--task file (cloze {"context","target"}: greedy exact match of all target tokens;
multiple choice {"contexts","continuations","label"}: arg-max of the per-character
normalised log-likelihood, acc_norm, reported as primary). Definitions:
megatron_lite/lab/eval/metrics.py.

Outputs: a markdown table on stdout (and --markdown FILE) with paired standard errors,
--json FILE in the fixed schema of megatron_lite/lab/eval/report.py, --details FILE with
uncertainties and sample sizes, --plot FILE (quality against bits per value). Every
input is checked before the model loads; bad input: one line "error: ..." on stderr,
exit status 1, nothing written.
"""
from __future__ import annotations

import sys

from megatron_lite.cli.common import (TEXT_HELP, UsageError, check_calibration, check_output,
                                      check_text_source, fail, make_parser, parse_comm_flags,
                                      rank_and_world)
from megatron_lite.errors import MegatronLiteError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", required=True, metavar="DIR",
                   help="HF directory or shard directory (its TP == --tp)")
    p.add_argument("--tp", type=int,
                   help="TP size (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--comm", action="append", default=[], metavar="SPEC",
                   help="a comm setting in the --comm grammar of every tool, e.g. int4:128 "
                        "or 'int4,layers.0.*=int8' (repeatable; the bf16 reference is always "
                        "added first; default: only the reference)")
    p.add_argument("--calibration", metavar="FILE",
                   help="calibration file (tools/calibrate.py) for the calibrated codecs; "
                        "fills calibration=FILE of every --comm spec (default: none)")
    p.add_argument("--text", metavar="FILE", help=TEXT_HELP + "; scored for perplexity, KL "
                                                  "and top-1 agreement (default: none)")
    p.add_argument("--max-tokens", type=int, default=16384, metavar="N",
                   help="scored text tokens (rounded down to whole windows)")
    p.add_argument("--window", type=int, default=512, metavar="N", help="tokens per window")
    p.add_argument("--task", action="append", default=[], metavar="FILE",
                   help="cloze or multiple-choice jsonl (repeatable; default: none)")
    p.add_argument("--task-limit", type=int, metavar="N",
                   help="use the first N items of each task (default: all)")
    p.add_argument("--batch-tokens", type=int, default=1024, metavar="N",
                   help="tokens per forward batch, padding included")
    p.add_argument("--batch-rows", type=int, default=512, metavar="N",
                   help="logit rows per task batch (bounds memory at a large vocabulary)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="model compute dtype (fp32: the codec is the only rounding)")
    p.add_argument("--json", metavar="FILE", help="write the results JSON (default: none)")
    p.add_argument("--details", metavar="FILE",
                   help="write JSON with uncertainties, sample sizes and settings "
                        "(default: none)")
    p.add_argument("--markdown", metavar="FILE", help="write the markdown table "
                                                      "(default: stdout only)")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of quality against bits per "
                                                  "value (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_flags(args) -> None:
    for name in ("batch_tokens", "batch_rows", "max_tokens", "task_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.window < 2:
        raise UsageError(f"--window must be >= 2, got {args.window}")
    if args.tp is not None and args.tp < 1:
        raise UsageError(f"--tp must be >= 1, got {args.tp}")
    check_text_source(args.text)
    for option in ("json", "details", "markdown", "plot"):
        check_output(getattr(args, option), "--" + option)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_lite.lab.eval.runner import torchrun_world_size
    world = torchrun_world_size()
    simulated = world is None
    tp = args.tp if args.tp is not None else (world or 1)
    rank, _ = rank_and_world()
    try:
        check_flags(args)
        if not simulated and tp != world:
            raise UsageError(f"--tp {tp} but torchrun started {world} ranks")
        specs = parse_comm_flags(args.comm, args.calibration)
        check_calibration(args.calibration, specs)
    except MegatronLiteError as e:
        return fail(e)

    import torch

    from megatron_lite.lab.eval import report
    from megatron_lite.lab.eval.study import StudyArgs, details_doc, execute, prepare

    sa = StudyArgs(ckpt=args.ckpt, tp=tp, comms=args.comm, calibration=args.calibration,
                   text=args.text, max_tokens=args.max_tokens, window=args.window,
                   tasks=args.task, task_limit=args.task_limit, batch_tokens=args.batch_tokens,
                   batch_rows=args.batch_rows, dtype=getattr(torch, DTYPES[args.dtype]),
                   simulated=simulated, progress=not args.no_progress and rank == 0)
    try:
        prep = prepare(sa)   # every rank validates the same inputs before any collective
    except (MegatronLiteError, ValueError, OSError) as e:
        return fail(e)
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
