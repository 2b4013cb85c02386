"""One rank's weights from a shard directory or an HF directory (``Engine.from_pretrained``).

Everything that can reject the checkpoint (missing files, unknown architecture, a TP size
that does not fit, a wrong world size, a sha256 mismatch) runs here, before the caller
builds a model or joins a collective. Every rank runs the same checks on the same files,
so ranks fail together with the same message instead of one rank hanging in an
all-reduce that the others never reach.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from megatron_lite.checkpoint import layout
from megatron_lite.checkpoint.shards import (CONFIG_NAME, META_KEY, is_shard_dir,
                                             HFWeights, load_rank_shard, parse_dtype,
                                             read_json, verify_shard_dir)
from megatron_lite.errors import CheckpointError
from megatron_lite.models.config import ModelConfig


def hf_config_of(config: dict) -> dict:
    """The plain HF config: a shard directory's config.json minus our block."""
    return {k: v for k, v in config.items() if k != META_KEY}


def inspect_checkpoint(path: Union[str, Path], world_size: int) -> Tuple[dict, bool]:
    """Validate ``path`` for ``world_size`` ranks without loading weights.

    Returns ``(hf_config, is_shard_dir)``. Raises CheckpointError / ConfigError.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if is_shard_dir(path):
        config = verify_shard_dir(path, world_size=world_size)
        ModelConfig.from_hf(hf_config_of(config))  # the same model checks as the converter
        return hf_config_of(config), True
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} has no config.json (neither an HF nor a shard directory)")
    config = read_json(path / CONFIG_NAME)
    ModelConfig.from_hf(config).validate_tp(world_size)
    return config, False


def load_rank_state(path: Union[str, Path], rank: int, world_size: int,
                    dtype: Optional[Union[str, torch.dtype]] = None,
                    ) -> Tuple[dict, Dict[str, torch.Tensor], Path]:
    """Load rank ``rank``'s tensors (our parameter names, layout_version 1).

    ``path`` is a shard directory, whose TP size must equal ``world_size`` and whose
    manifest must verify, or an HF directory, which is sharded in memory with the same
    name-map table the converter uses. ``dtype`` casts floating-point tensors (``None``
    keeps the stored dtype).

    Returns ``(hf_config_dict, rank_state_dict, tokenizer_dir)``.
    """
    path = Path(path)
    dtype = parse_dtype(dtype)
    hf_config, sharded = inspect_checkpoint(path, world_size)
    if sharded:
        state = load_rank_shard(path, rank, world_size, dtype=dtype)
        return hf_config, state, path
    model_config = ModelConfig.from_hf(hf_config)
    # Lazy: each rank reads only the bytes of its own slices from the memory-mapped files.
    state = layout.shard_hf_state_dict(HFWeights(path, dtype), model_config, world_size, rank)
    return hf_config, state, path
