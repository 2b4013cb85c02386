"""HF directory <-> TP shard directory (the library half of ``convert_hf_checkpoint``).

The command line (``--hf-dir``/``--gguf``/``--bundled``/``--to-hf``) is
``megatron_lite/cli/convert.py``; it imports this module and checkpoint/gguf.py, and
this module imports neither, so the two stay free of an import cycle (gguf.py builds
cached shard directories with ``convert_hf_to_shards``).

Every input is verified before any tensor is read: config.json present, model_type
supported, ``tp`` dividing the heads, output directory absent (or ``--force``), weights
present. The output is written to a temporary sibling and renamed when complete, so a
failed run leaves nothing behind. HF -> shards -> HF gives bitwise-equal tensors.
"""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from megatron_lite.checkpoint import layout
from megatron_lite.checkpoint.layout import LAYOUT_VERSION
from megatron_lite.checkpoint.shards import (CONFIG_NAME, META_KEY, HFWeights,
                                             atomic_output_dir, check_output_dir,
                                             copy_tokenizer_files, dtype_name,
                                             is_shard_dir, load_rank_shard, parse_dtype,
                                             read_json, save_hf_state_dict, save_rank_shard,
                                             verify_shard_dir, write_json, write_manifest)
from megatron_lite.errors import CheckpointError
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
