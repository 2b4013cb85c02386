"""The codec kernels' calls as their callers see them, shared by the Triton kernels
(kernels/quant.py, kernels/fused_allreduce.py) and the CUDA C++ ones (kernels/codec_cuda.py):
the saturation limits, the rotation's constants, and the argument checks and output
buffers of quantize, dequantize(-and-sum) and the error part, so that both
implementations take and refuse the same calls. Imports torch only (no triton)."""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch

from .config import KernelCodec

BF16_MAX = 3.3895313892515355e38
FP16_MAX = 65504.0


def out_limit(dtype: torch.dtype) -> float:
    """The finite range an output of ``dtype`` saturates to (the reference's ``saturate``)."""
    return FP16_MAX if dtype == torch.float16 else BF16_MAX


@functools.lru_cache(maxsize=None)
def geometry(group: Optional[int]) -> Tuple[int, float]:
    """(log2 G, fl32(1/sqrt(G))) of a rotation of G = ``group`` values; (0, 1.0) if none.
    Cached: launches ask for it on every call."""
    if group is None:
        return 0, 1.0
    if group & (group - 1) or not 2 <= group <= 256:
        raise ValueError(f"Hadamard rotation needs a power-of-two group of 2 to 256, got {group}")
    return int(math.log2(group)), float(torch.tensor(1.0 / math.sqrt(group),
                                                     dtype=torch.float32))


def check_rotation(kc: KernelCodec, rot: Optional[int]) -> None:
    """A rotation (``hadamard-`` codecs) runs on the codec's own groups."""
    if rot is not None and (not kc.kind or rot != kc.group):
        raise ValueError(f"rotation of {rot} values needs a group codec of group {rot}")


def quantize_buffers(kc: KernelCodec, x: torch.Tensor):
    """``(x contiguous, out [..., nbytes] uint8, rows, n, nbytes)`` of a quantize of ``x``
    ``[..., n]``."""
    n = x.shape[-1]
    if kc.kind and n % kc.group:
        raise ValueError(f"chunk length {n} is not a multiple of the group size {kc.group}")
    x = x.contiguous()
    nb = kc.nbytes(n)
    out = torch.empty(*x.shape[:-1], nb, dtype=torch.uint8, device=x.device)
    return x, out, x.numel() // max(n, 1), n, nb


def dequantize_buffers(kc: KernelCodec, buf: torch.Tensor, n: int, out_dtype,
                       sum_rows: bool, rot: Optional[int]):
    """``(buf contiguous, out, outs, per)`` of a dequantize of ``buf`` ``[..., nbytes]``:
    ``outs`` output rows, each the sum of ``per`` consecutive input rows (``sum_rows``:
    one output row summing a ``[rows, nbytes]`` buffer; else one per input row)."""
    if rot is not None and out_dtype != torch.float32:
        raise ValueError("a rotated dequantize returns fp32 (saturate afterwards)")
    nb = kc.nbytes(n)
    if buf.dtype != torch.uint8 or buf.shape[-1] != nb:
        raise ValueError(f"expected {nb} uint8 bytes per row for {n} values, got "
                         f"{tuple(buf.shape)} {buf.dtype}")
    buf = buf.contiguous()
    if sum_rows:
        if buf.dim() != 2 or buf.shape[0] < 1:
            raise ValueError("sum_rows takes a [rows, nbytes] buffer with rows >= 1")
        return buf, torch.empty(n, dtype=out_dtype, device=buf.device), 1, buf.shape[0]
    out = torch.empty(*buf.shape[:-1], n, dtype=out_dtype, device=buf.device)
    return buf, out, buf.numel() // nb, 1


def error_buffers(kc: KernelCodec, x: torch.Tensor, buf: torch.Tensor):
    """``(x, buf contiguous, out fp32 like x, rows, n, nbytes)`` of an error part of ``x``
    ``[rows, n]`` and its codes ``buf``."""
    n = x.shape[-1]
    nb = kc.nbytes(n)
    x, buf = x.contiguous(), buf.contiguous()
    rows = x.numel() // max(n, 1)
    if buf.dtype != torch.uint8 or buf.numel() != rows * nb:
        raise ValueError(f"expected {rows} x {nb} uint8 bytes, got {tuple(buf.shape)} {buf.dtype}")
    return x, buf, torch.empty(x.shape, dtype=torch.float32, device=x.device), rows, n, nb
