"""Next-token sampling: greedy, temperature, top-k, top-p; rank-identical by construction.

Every TP rank holds bitwise-identical full-vocab logits (the LM head all-gathers them) and
a ``torch.Generator`` seeded identically, and runs the same ops, so every rank draws the
same token without a broadcast. The draw uses the exponential-race form of the Gumbel-max
trick, argmax(p / E) with E ~ Exp(1), which samples exactly from p, needs no host sync and
never raises on degenerate (NaN) rows the way ``torch.multinomial`` does.
"""
from __future__ import annotations

from typing import Optional

import torch


def validate_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf; [B, V] -> [B, V].

    top-p keeps the smallest prefix of tokens (by descending probability) whose mass
    reaches p: a token stays if the mass strictly before it is <= p, so the most likely
    token always stays. Applied after top-k, as in HF's warper order.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before > top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Token ids [B] (int64) from logits [B, V]. temperature 0 means greedy (argmax)."""
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
