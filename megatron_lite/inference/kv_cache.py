"""Static, preallocated KV cache: one K and one V buffer per layer, fixed for a generation.

Shape per layer: [batch, n_kv_heads_local, slots, head_dim]. Buffers never move or grow
while a generation runs, so a decode step has fixed shapes and fixed addresses (what a
CUDA graph capture needs).

Two layouts:

* ``"live"`` (the default): a sliding-window layer (``cfg.layer_types[i] == SLIDING``)
  keeps a ring buffer of ``min(sliding_window, max_seq)`` slots, since no query ever reads
  a key more than ``sliding_window - 1`` positions back; the token at position p sits in
  slot ``p % slots``. Full-attention layers keep ``max_seq`` slots, slot == position. A
  decode step reads only a prefix of the slots: ``read_len(live)``, the smallest bucket
  (powers of two from ``MIN_READ``, then ``max_seq``) that holds the ``live`` positions
  written so far, and at most the ring on sliding layers.
* ``"full"``: ``max_seq`` slots on every layer and every step reads all of them (the
  layout before ring buffers; kept as the reference the tests compare against).

See ``megatron_lite.models.decoder`` for how attention writes and masks the slots.
"""
from __future__ import annotations

import torch

from megatron_lite.models.config import SLIDING, ModelConfig

LAYOUTS = ("live", "full")
# Smallest read length a decode step uses. The cache itself is rounded up to 64 slots
# (Engine.cache_len), so a short generation has exactly one bucket (one graph, one compile);
# below 64 slots the KV reads are noise next to the weights.
MIN_READ = 64


def read_buckets(max_seq: int, smallest: int = MIN_READ) -> tuple[int, ...]:
    """Read lengths a decode step may use with a ``max_seq``-slot cache: powers of two from
    ``smallest`` below ``max_seq``, then ``max_seq`` itself."""
    out, b = [], smallest
    while b < max_seq:
        out.append(b)
        b *= 2
    return tuple(out) + (max_seq,)


class KVCache:
    def __init__(self, cfg: ModelConfig, tp: int, batch_size: int, max_seq: int,
                 dtype: torch.dtype, device, layout: str = "live"):
        if layout not in LAYOUTS:
            raise ValueError(f"unknown KV-cache layout {layout!r}; choose one of "
                             f"{', '.join(LAYOUTS)}")
        self.batch_size, self.max_seq, self.dtype, self.layout = batch_size, max_seq, dtype, layout
        self.device = torch.device(device)
        ring = min(cfg.sliding_window or max_seq, max_seq)
        self.slots = [ring if layout == "live" and t == SLIDING else max_seq
                      for t in cfg.layer_types]
        self._slot_bytes = cfg.local_kv_heads(tp) * cfg.head_dim * dtype.itemsize

        def buf(n):
            return torch.zeros((batch_size, cfg.local_kv_heads(tp), n, cfg.head_dim),
                               dtype=dtype, device=device)
        self.k = [buf(n) for n in self.slots]
        self.v = [buf(n) for n in self.slots]
        self.buckets = read_buckets(max_seq) if layout == "live" else (max_seq,)

    def fits(self, batch_size: int, max_seq: int, layout: str = "live") -> bool:
        """Reusable as is: exactly this batch size, this many slots and this layout."""
        return (self.batch_size, self.max_seq, self.layout) == (batch_size, max_seq, layout)

    def read_len(self, live: int) -> int:
        """Slots a decode step reads when positions ``0 .. live - 1`` are the ones written
        (the step's own included): the smallest bucket >= ``live``. Sliding layers read
        at most their ring (the decoder caps it)."""
        if not 1 <= live <= self.max_seq:
            raise ValueError(f"{live} live positions do not fit a {self.max_seq}-slot cache")
        return next(b for b in self.buckets if b >= live)

    @property
    def nbytes(self) -> int:
        """Bytes of all K and V buffers (this rank)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def read_bytes(self, kv_len: int) -> int:
        """Bytes of K and V one decode step reads at read length ``kv_len`` (this rank)."""
        return 2 * self.batch_size * self._slot_bytes * sum(min(kv_len, n) for n in self.slots)
