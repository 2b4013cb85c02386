"""The codec kernels the communicator calls (comm/fused.py): quantize, dequantize(-and-sum)
and error feedback's error part. The CUDA C++ kernels (codec_cuda.py) serve the codecs and
tensors they take (``codec_cuda.takes``), the Triton kernels (quant.py) everything else;
both give the reference codec's bits, so the choice never changes a result."""
from __future__ import annotations

from typing import Optional

import torch

from . import codec_cuda, quant
from .config import KernelCodec


def quantize(kc: KernelCodec, x: torch.Tensor, rot: Optional[int] = None) -> torch.Tensor:
    x = x.contiguous()
    if codec_cuda.takes(kc, x):
        return codec_cuda.quantize(kc, x, rot=rot)
    return quant.quantize(kc, x, rot=rot)


def dequantize(kc: KernelCodec, buf: torch.Tensor, n: int, out_dtype=torch.float32,
               sum_rows: bool = False, rot: Optional[int] = None) -> torch.Tensor:
    buf = buf.contiguous()
    if codec_cuda.takes(kc, buf):
        return codec_cuda.dequantize(kc, buf, n, out_dtype, sum_rows=sum_rows, rot=rot)
    return quant.dequantize(kc, buf, n, out_dtype, sum_rows=sum_rows, rot=rot)


def sum_ranks(kc: KernelCodec, gathered: torch.Tensor, n: int,
              rot: Optional[int] = None) -> torch.Tensor:
    """fp32 ``[J, n]``: ``out[j]`` = in-order sum over ``r`` of ``decode(gathered[r, j])``
    (rotated back with ``rot``), for a gathered ``[ranks, chunks, nbytes]`` buffer: one
    launch on the CUDA kernels, one dequantize-and-sum per chunk on the Triton ones."""
    gathered = gathered.contiguous()
    if codec_cuda.takes(kc, gathered):
        return codec_cuda.sum_ranks(kc, gathered, n, rot=rot)
    return torch.stack([quant.dequantize(kc, gathered[:, j], n, torch.float32, sum_rows=True,
                                         rot=rot) for j in range(gathered.shape[1])])


def error_part(kc: KernelCodec, x: torch.Tensor, buf: torch.Tensor,
               rot: Optional[int] = None) -> torch.Tensor:
    x, buf = x.contiguous(), buf.contiguous()
    if codec_cuda.takes(kc, x, buf):
        return codec_cuda.error_part(kc, x, buf, rot=rot)
    return quant.error_part(kc, x, buf, rot=rot)
