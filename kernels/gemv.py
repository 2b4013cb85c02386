"""``linear(x, weight, bias)``: ``F.linear``, except for one row of bf16 activations on a
CUDA GPU, where csrc/gemv.cu's kernel streams the weight (a batch-1 decode step's linear
layers and LM head). Measured on an H100 on the llama3-8b shapes (tools/bench_gemv.py):
a step's linear layers 6.020 ms with cuBLAS, 5.543 ms here; a compiled, graphed decode
step 6.259 -> 5.937 ms (docs/results/generate.md). At 2 and 4 rows cuBLAS was as fast or
faster, so more rows keep ``F.linear``.

The kernel sums each output in a fixed order (fp32, csrc/gemv.cu), so every rank and every
call gives the same bits; they differ from cuBLAS's in the last bf16 bit now and then.
Under ``torch.compile`` it is a custom op (``megatron_lite::gemv``), so one compiled graph
holds the whole decode step; eagerly (and in CUDA-graph capture) it is called directly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import codec_cuda
from .config import INTERPRET


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the GEMV kernel computes ``F.linear(x, weight)``: one row of bf16 ``x`` on a
    CUDA GPU (not the Triton interpreter), a 2-D bf16 weight whose rows are whole 16-byte
    words. Shapes, dtypes and devices only, so that compiled code can guard on it."""
    return (not INTERPRET and x.is_cuda and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1] and x.numel() == weight.shape[1]
            and weight.shape[1] % 8 == 0)


def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    weight = weight.contiguous()
    if x.data_ptr() % 16 or weight.data_ptr() % 16:   # a view at an odd offset
        return F.linear(x, weight)
    n, k = weight.shape
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    err = codec_cuda._ext().ml_gemv(x.data_ptr(), weight.data_ptr(), y.data_ptr(), n, k,
                                    codec_cuda._stream(x))
    if err:
        raise codec_cuda.CudaCodecError(f"CUDA GEMV kernel failed: cudaError {err}")
    return y


@torch.library.custom_op("megatron_lite::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _gemv(x, weight)


@_gemv_op.register_fake
def _(x, weight):
    return x.new_empty(x.shape[:-1] + (weight.shape[0],))


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through the GEMV kernel where it ``takes`` them."""
    if not takes(x, weight):
        return F.linear(x, weight, bias)
    y = _gemv_op(x, weight) if torch.compiler.is_compiling() else _gemv(x, weight)
    return y if bias is None else y + bias
