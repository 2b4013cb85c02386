"""Checkpoints: the TP layout table (layout.py), shard directories and converters."""
from megatron_lite.checkpoint.layout import (LAYOUT_VERSION, LayoutError, shard_hf_state_dict,
                                             unshard_to_hf)

__all__ = ["LAYOUT_VERSION", "LayoutError", "shard_hf_state_dict", "unshard_to_hf"]
