"""Per-layer bit allocation from measured sensitivity (megatron_lite/lab/eval/sensitivity.py).

    python tools/sensitivity.py --ckpt DIR --tp 4 --text calib.txt --skip-seqs 64 \\
        --comm hadamard-int3:128 --comm hadamard-int4:128 --comm hadamard-int8:128 \\
        --budget 4.3 --out alloc.json
    python tools/sensitivity.py --ckpt DIR --tp 2 --text python-docs --comm int4:128 \\
        --comm int8:128 --budget 6

Measures KL(bf16 || codec at one site) for every row-parallel site and candidate codec
on --num-seqs windows of --seq-len tokens (simulated TP unless under torchrun), then
prints the --comm string that minimises the summed KL within --budget mean bits per
value, and writes the sensitivities and the allocation to --out (JSON). Each --comm
candidate is a spec of the grammar of every tool that names only a codec (no per-site
overrides, no options, no error feedback); calibrated codecs are not candidates here.
"""
from __future__ import annotations

import json
import sys

from megatron_lite.cli.common import (TEXT_HELP, UsageError, check_input_file, check_output,
                                      check_text_source, fail, make_parser, parse_comm_flag,
                                      rank_and_world, text_meta)
from megatron_lite.errors import MegatronLiteError


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("--ckpt", required=True, metavar="DIR",
                   help="HF directory or shard directory (its TP == --tp)")
    p.add_argument("--tp", type=int, required=True, help="TP size of the measurement (>= 2)")
    p.add_argument("--text", metavar="FILE",
                   help=TEXT_HELP + "; required unless --from-json (default: none)")
    p.add_argument("--comm", action="append", required=True, metavar="SPEC",
                   help="a candidate codec, as a --comm spec with only a codec, e.g. "
                        "hadamard-int4:128 (repeatable)")
    p.add_argument("--budget", type=float, default=4.3, metavar="BITS",
                   help="mean bits per value over the row-parallel sites")
    p.add_argument("--num-seqs", type=int, default=2, metavar="N", help="windows of text")
    p.add_argument("--seq-len", type=int, default=256, metavar="N", help="tokens per window")
    p.add_argument("--skip-seqs", type=int, default=0, metavar="N",
                   help="leading windows of the text to skip")
    p.add_argument("--out", metavar="FILE",
                   help="write JSON with the sensitivities and the allocation (default: none)")
    p.add_argument("--from-json", metavar="FILE",
                   help="reuse the sensitivities of an earlier --out instead of measuring "
                        "(default: measure)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_NO_FILE = "<no calibration>"


def candidate(text: str) -> str:
    """One --comm candidate -> its canonical codec name; refuses anything but a codec."""
    from megatron_lite.comm.codecs import traits
    from megatron_lite.comm.spec import format_comm
    # A placeholder file lets a calibrated codec parse, so that it is refused by what it
    # is rather than for a missing --calibration this tool does not take.
    spec = parse_comm_flag(text, _NO_FILE)
    if spec.is_native:
        raise UsageError(f"--comm {text!r}: native is not a codec (every site's reference "
                         "is bf16 communication)")
    if spec.codec is None or spec.calibration != _NO_FILE \
            or format_comm(spec, with_calibration=False) != str(spec.codec):
        raise UsageError(f"--comm {text!r}: a candidate names only a codec, e.g. "
                         "hadamard-int4:128 (per-site overrides, options and ef+ are not "
                         "candidates)")
    if traits(str(spec.codec)).calibrated:
        raise UsageError(f"--comm {text!r}: calibrated codecs (outlier-, weighted-, klt) "
                         "need per-site calibration and are not candidates here")
    return str(spec.codec)


def check_flags(args) -> list:
    from megatron_lite.lab.eval.runner import torchrun_world_size
    if args.tp < 2:
        raise UsageError(f"--tp {args.tp}: TP 1 has no all-reduce to measure")
    world = torchrun_world_size()
    if world is not None and args.tp != world:
        raise UsageError(f"--tp {args.tp} but torchrun started {world} ranks")
    for name in ("num_seqs", "seq_len"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got "
                             f"{getattr(args, name)}")
    if args.skip_seqs < 0:
        raise UsageError(f"--skip-seqs must be >= 0, got {args.skip_seqs}")
    if args.budget <= 0:
        raise UsageError(f"--budget must be > 0 bits per value, got {args.budget}")
    codecs = list(dict.fromkeys(candidate(c) for c in args.comm))
    if args.from_json:
        check_input_file(args.from_json, "--from-json")
    elif args.text is None:
        raise UsageError("--text is required (or --from-json FILE to reuse a measurement)")
    else:
        check_text_source(args.text)
    check_output(args.out, "--out")
    return codecs


def load_sensitivities(path: str, codecs) -> dict:
    """The KL table of an earlier --out, restricted to ``codecs`` (all must be there)."""
    try:
        with open(path) as f:
            kl = json.load(f)["kl"]
        return {s: {c: float(v[c]) for c in codecs} for s, v in kl.items()}
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise UsageError(f"--from-json {path}: not a tools/sensitivity.py --out file "
                         f"({type(e).__name__}: {e})") from None
    except KeyError as e:
        raise UsageError(f"--from-json {path} has no KL for {e.args[0]!r}: measure it, or "
                         "leave that --comm out") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank, _ = rank_and_world()
    try:
        codecs = check_flags(args)
    except MegatronLiteError as e:
        return fail(e)

    from megatron_lite.checkpoint.loader import inspect_checkpoint
    from megatron_lite.comm.codecs import codec_bits
    from megatron_lite.comm.router import SiteCodecs
    from megatron_lite.comm.spec import parse_comm
    from megatron_lite.lab.eval.report import atomic_write
    from megatron_lite.lab.eval.runner import row_parallel_sites, torchrun_world_size
    from megatron_lite.lab.eval.sensitivity import allocate, comm_string, measure
    from megatron_lite.models.config import ModelConfig

    windows = sens = None
    try:
        bits = {c: codec_bits(c) for c in codecs}
        hf_config, _ = inspect_checkpoint(args.ckpt, args.tp)
        num_layers = ModelConfig.from_hf(hf_config).num_layers
        if args.from_json:
            sens = load_sensitivities(args.from_json, codecs)
        else:
            windows = _windows(args)
    except (MegatronLiteError, ValueError, OSError) as e:
        return fail(e)
    if sens is None:
        sens = measure(args.ckpt, args.tp, num_layers, codecs, windows,
                       simulated=torchrun_world_size() is None,
                       progress=not args.no_progress)
    if sens is None or rank != 0:        # a non-zero real rank
        return 0
    try:
        choice, mean_bits, pred = allocate(sens, bits, args.budget)
    except ValueError as e:
        return fail(f"--budget {args.budget}: {e}")
    comm = comm_string(choice, row_parallel_sites(num_layers))
    SiteCodecs(parse_comm(comm), num_layers=num_layers)   # it must parse and resolve
    print(comm)
    print(f"mean bits/value {mean_bits:.4f}, predicted KL (sum of single-site KLs) "
          f"{pred:.4f}", file=sys.stderr)
    if args.out:
        doc = {"ckpt": args.ckpt, "tp": args.tp, "codecs": codecs, "bits": bits,
               "budget": args.budget, "windows": None if args.from_json else len(windows),
               "seq_len": args.seq_len, **(text_meta(args.text) if args.text else {}),
               "kl": sens, "choice": choice, "comm": comm, "mean_bits": mean_bits,
               "predicted_kl": pred}
        atomic_write(args.out, (json.dumps(doc, indent=1) + "\n").encode())
    return 0


def _windows(args):
    from transformers import AutoTokenizer

    from megatron_lite.lab.eval.data import load_text_windows
    tok = AutoTokenizer.from_pretrained(args.ckpt)
    want = args.skip_seqs + args.num_seqs
    tw = load_text_windows(tok, args.text, args.seq_len, want * (args.seq_len - 1))
    if len(tw.windows) < want:
        raise UsageError(f"--text {args.text} has {len(tw.windows)} windows of "
                         f"{args.seq_len} tokens; --skip-seqs + --num-seqs needs {want}")
    return tw.windows[args.skip_seqs:want]
