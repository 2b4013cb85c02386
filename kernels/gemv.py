"""``linear(x, weight, bias)``: ``F.linear``, except for one row of bf16 activations on a
CUDA GPU, where csrc/gemv.cu's kernel streams the weight (a batch-1 decode step's linear
layers and LM head). Measured on H100s on the llama3-8b shapes (tools/bench_gemv.py): a
step's 129 products 5.77 ms with cuBLAS, 5.14 ms here (less the time of the kernels that
write their inputs, one run); a compiled, graphed decode step 6.259 -> 5.937 ms against
cuBLAS (one H100), and 6.053 -> 5.923 ms when the kernel's loads were pipelined (another
H100; docs/results/generate.md, docs/notebook/2026-12-06.md). At 2 and 4 rows cuBLAS was
as fast or faster, so more rows keep ``F.linear``.

The kernel sums each output in a fixed order (fp32, csrc/gemv.cu), so every rank and every
call gives the same bits; they differ from cuBLAS's in the last bf16 bit now and then.
Under ``torch.compile`` it is a custom op (``megatron_lite::gemv``), so one compiled graph
holds the whole decode step; eagerly (and in CUDA-graph capture) it is called directly. The
kernel is an extension of its own (``codec_cuda.gemv_ext``: one translation unit, built on
the first call on a machine); where it cannot be built, ``F.linear`` runs, after a warning.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import codec_cuda
from .config import INTERPRET


def takes(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether the GEMV kernel computes ``F.linear(x, weight, bias)``: one row of bf16 ``x``
    on a CUDA GPU (not the Triton interpreter), a contiguous 2-D bf16 weight on the same
    device whose rows are whole 16-byte words, no bias (F.linear adds it before its one
    rounding) and no autograd. Shapes, dtypes, devices and flags only, so that compiled
    code can guard on it."""
    return (not INTERPRET and bias is None and x.is_cuda and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and weight.device == x.device
            and weight.dim() == 2 and weight.is_contiguous()
            and weight.shape[0] > 0 and weight.shape[1] > 0
            and x.shape[-1] == weight.shape[1] and x.numel() == weight.shape[1]
            and weight.shape[1] % 8 == 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


_UNAVAILABLE: list = []   # why the kernel could not be built, once known


def _kernel():
    """The GEMV extension, or None (warned once) where it cannot be built: no CUDA
    compiler on the machine, say. Then ``F.linear`` computes the product."""
    if _UNAVAILABLE:
        return None
    try:
        return codec_cuda.gemv_ext()
    except Exception as e:  # noqa: BLE001 - any build failure leaves cuBLAS in place
        import warnings
        _UNAVAILABLE.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"the batch-1 GEMV kernel could not be built ({_UNAVAILABLE[0][:300]}); "
                      "linear layers use F.linear")
        return None


def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    ext = _kernel()
    if ext is None or x.data_ptr() % 16 or weight.data_ptr() % 16:   # or a view at an odd offset
        return F.linear(x, weight)
    n, k = weight.shape
    y = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    codec_cuda._check(ext.ml_gemv(x.data_ptr(), weight.data_ptr(), y.data_ptr(), n, k,
                                  codec_cuda._stream(x)), "gemv")
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
    if not takes(x, weight, bias):
        return F.linear(x, weight, bias)
    return _gemv_op(x, weight) if torch.compiler.is_compiling() else _gemv(x, weight)
