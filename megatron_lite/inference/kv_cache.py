"""Static, preallocated KV cache: one K and one V buffer per layer, fixed for a generation.

Shape per layer: [batch, n_kv_heads_local, max_seq, head_dim]. Buffers never move or grow
while a generation runs, so a decode step has fixed shapes and fixed addresses (what a
CUDA graph capture needs). Slot j of sequence b holds the token at position j of b; see
``megatron_lite.models.decoder`` for how attention masks it.
"""
from __future__ import annotations

import torch

from megatron_lite.models.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, tp: int, batch_size: int, max_seq: int,
                 dtype: torch.dtype, device):
        shape = (batch_size, cfg.local_kv_heads(tp), max_seq, cfg.head_dim)
        self.batch_size, self.max_seq, self.dtype = batch_size, max_seq, dtype
        self.device = torch.device(device)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]

    def fits(self, batch_size: int, max_seq: int) -> bool:
        """Reusable as is: exactly this batch size and this many slots."""
        return self.batch_size == batch_size and self.max_seq == max_seq

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
