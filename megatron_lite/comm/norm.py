"""The residual add and RMSNorm that follow a row-parallel reduce: their one definition.

A decoder layer's TP sum is followed by the same few elementwise steps every time, so
the all-reduce can carry them (``Communicator.all_reduce_add_rmsnorm``; TensorRT-LLM,
FlashInfer and vLLM call this "allreduce fusion"). Two layouts, a ModelConfig field
(``sandwich_norms``)::

    pre-norm (Llama, Qwen, Mistral, Gemma 1):
        residual' = residual + y
        normed    = rmsnorm(residual', w)              # the next block's input
    sandwich (Gemma 2/3):
        residual' = residual + rmsnorm(y, w_post)      # post-attention / post-FF norm
        normed    = rmsnorm(residual', w)              # pre-FF / next input norm

with ``y = allreduce(partial) (+ bias)`` in the model's dtype. ``w`` None: no norm
follows (the last layer; the final norm runs on the selected rows), ``normed`` is None.

This module is the arithmetic definition the fused kernel
(kernels/allreduce_norm.py) is tested against, and the fallback wherever that kernel does
not run (CPU, gloo, no P2P workspace, messages it does not take): ``rms_norm`` is exactly
what ``models.decoder.RMSNorm`` computes, so the decoder gives the same bits through
either call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_lite.comm.layout import Layout


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             scale_in_fp32: bool = False) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * (offset + w)`` over the last dim, statistics in fp32.

    Llama (offset 0): normalise in fp32, cast back to the input dtype, *then* multiply by
    w (LlamaRMSNorm). Gemma (offset 1, ``scale_in_fp32``): the checkpoint stores w - 1 and
    the multiply by (1 + w) also happens in fp32 before the single cast (GemmaRMSNorm)."""
    y = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if scale_in_fp32:
        return (y * (offset + weight.float())).to(x.dtype)
    w = weight if offset == 0 else weight + offset
    return w * y.to(x.dtype)


def add_rmsnorm(y: torch.Tensor, residual: torch.Tensor, norm_weight: Optional[torch.Tensor],
                eps: float, *, layout: Layout = Layout.PRE_NORM,
                post_norm_weight: Optional[torch.Tensor] = None, offset: float = 0.0,
                scale_in_fp32: bool = False, bias: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(residual', normed)`` from the reduced sum ``y`` (module docstring), in torch ops
    in the decoder's order: ``y + bias``, the post-norm (sandwich), ``residual + ...``,
    the norm."""
    check_layout(layout, post_norm_weight)
    if bias is not None:
        y = y + bias
    if layout == Layout.SANDWICH:
        y = rms_norm(y, post_norm_weight, eps, offset, scale_in_fp32)
    new_residual = residual + y
    if norm_weight is None:
        return new_residual, None
    return new_residual, rms_norm(new_residual, norm_weight, eps, offset, scale_in_fp32)


def check_layout(layout: Layout, post_norm_weight: Optional[torch.Tensor]) -> None:
    if (Layout(layout) == Layout.SANDWICH) != (post_norm_weight is not None):
        raise ValueError(f"layout {Layout(layout).value} takes "
                         f"{'a' if layout == Layout.SANDWICH else 'no'} post_norm_weight")
