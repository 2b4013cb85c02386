"""Triton kernels for the fixed linear maps around a plain codec: ``hadamard-`` (block
Walsh-Hadamard rotation, comm/rotation.py) and ``weighted-`` (static channel scales,
comm/weighting.py). The fused two-shot kernel of the plain codec runs between them
(kernels/backends.py), so the composition must give the two-step reference's bits:

* ``map_in``:  ``x`` (any float dtype) -> fp32 ``fwht(pad(x.float() * s))``: the scaling
  first (one fp32 multiply), the zero padding to whole groups, then the butterflies in
  the reference's order (stage h = 1, 2, 4, ...: ``(a + b, a - b)``) and one multiply by
  ``fl32(1/sqrt(G))``;
* ``map_out``: fp32 ``y`` -> ``x.dtype``: ``fwht`` again, then the reference's saturations
  (clamp to the finite range, NaN passes) around the division by ``s`` (``div_rn``: the
  plain ``/`` is approximate on the GPU), then the RNE cast of ``quant.cast_out``.

The butterflies are exact IEEE adds and subtracts in a fixed order and launch with
``enable_fp_fusion=False``, so GPU, interpreter and torch agree bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import quant

ROWS = 16                 # groups per program
_PLAIN_TILE = 128         # tile width without a rotation (scales only); 1024 spilled: 2x slower


@triton.jit
def _stage(v, R: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    """One butterfly stage: pairs (v[i], v[i + H]) within blocks of 2H -> (a + b, a - b)."""
    w = tl.permute(tl.reshape(v, (R * G // (2 * H), 2, H)), (0, 2, 1))
    a, b = tl.split(w)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (R, G))


@triton.jit
def _fwht(v, R: tl.constexpr, G: tl.constexpr, LOG2G: tl.constexpr, SCALE):
    """Normalised Walsh-Hadamard transform of each row of the fp32 tile ``v [R, G]``
    (groups of 2 to 256 values, stages in the reference's order)."""
    v = _stage(v, R, G, 1)
    if LOG2G > 1:
        v = _stage(v, R, G, 2)
    if LOG2G > 2:
        v = _stage(v, R, G, 4)
    if LOG2G > 3:
        v = _stage(v, R, G, 8)
    if LOG2G > 4:
        v = _stage(v, R, G, 16)
    if LOG2G > 5:
        v = _stage(v, R, G, 32)
    if LOG2G > 6:
        v = _stage(v, R, G, 64)
    if LOG2G > 7:
        v = _stage(v, R, G, 128)
    return v * SCALE


@triton.jit
def _clamp(v, LIM: tl.constexpr):
    # torch.clamp semantics: NaN passes, +-Inf become +-LIM
    return tl.where(v > LIM, LIM, tl.where(v < -LIM, -LIM, v))


@triton.jit
def _map_in_kernel(x_ptr, s_ptr, out_ptr, n, n_out, H,
                   R: tl.constexpr, G: tl.constexpr, LOG2G: tl.constexpr, SCALE,
                   ROT: tl.constexpr, HAS_S: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * (R * G)
    offs = base + tl.arange(0, R)[:, None] * G + tl.arange(0, G)[None, :]
    inside = offs < n
    v = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_S:
        v = v * tl.load(s_ptr + offs % H, mask=inside, other=1.0)
    v = tl.where(inside, v, 0.0)
    if ROT:
        v = _fwht(v, R, G, LOG2G, SCALE)
    tl.store(out_ptr + offs, v, mask=offs < n_out)


@triton.jit
def _map_out_kernel(y_ptr, s_ptr, out_ptr, n, n_y, H,
                    R: tl.constexpr, G: tl.constexpr, LOG2G: tl.constexpr, SCALE,
                    ROT: tl.constexpr, HAS_S: tl.constexpr, LIM: tl.constexpr,
                    LIM_ROT: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * (R * G)
    offs = base + tl.arange(0, R)[:, None] * G + tl.arange(0, G)[None, :]
    inside = offs < n
    # the padded tail of the last group is decoded data too (not zeros): rotate it back
    v = tl.load(y_ptr + offs, mask=offs < n_y, other=0.0)
    if ROT:
        v = _fwht(v, R, G, LOG2G, SCALE)
        # the rotation's own saturation: to fp32 (bf16 range) under scales, else x.dtype's
        v = _clamp(v, LIM_ROT)
    if HAS_S:
        s = tl.load(s_ptr + offs % H, mask=inside, other=1.0)
        v = _clamp(tl.math.div_rn(v, s), LIM)
    elif not ROT:
        v = _clamp(v, LIM)
    tl.store(out_ptr + offs, quant.cast_out(v, out_ptr.dtype.element_ty), mask=inside)


def _geometry(group: Optional[int]):
    if group is None:
        return _PLAIN_TILE, 0, 1.0
    if group & (group - 1) or not 2 <= group <= 256:
        raise ValueError(f"Hadamard rotation needs a power-of-two group of 2 to 256, got {group}")
    # fl32(1/sqrt(G)), the reference's constant (comm/rotation.fwht)
    return group, int(math.log2(group)), float(torch.tensor(1.0 / math.sqrt(group),
                                                             dtype=torch.float32))


def _opts():
    return {} if quant.INTERPRET else {"enable_fp_fusion": False}


def map_in(x: torch.Tensor, group: Optional[int], scale: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 flat ``fwht(pad(x * scale))`` (rotation iff ``group``; ``scale`` on the last dim)."""
    x = x.contiguous()
    n = x.numel()
    G, log2g, sc = _geometry(group)
    n_out = n + (-n % group) if group else n
    out = torch.empty(n_out, dtype=torch.float32, device=x.device)
    if n_out == 0:
        return out
    s = scale if scale is not None else out
    h = scale.numel() if scale is not None else 1
    grid = (triton.cdiv(n_out, ROWS * G),)
    _map_in_kernel[grid](x, s, out, n, n_out, h, R=ROWS, G=G, LOG2G=log2g, SCALE=sc,
                         ROT=group is not None, HAS_S=scale is not None, **_opts())
    return out


def map_out(y: torch.Tensor, shape, dtype: torch.dtype, group: Optional[int],
            scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``x.dtype`` result of shape ``shape`` from the fp32 reduced ``y`` (length >= numel)."""
    n = math.prod(shape)
    out = torch.empty(shape, dtype=dtype, device=y.device)
    if n == 0:
        return out
    G, log2g, sc = _geometry(group)
    s = scale if scale is not None else y
    h = scale.numel() if scale is not None else 1
    lim = quant.FP16_MAX if dtype == torch.float16 else quant.BF16_MAX
    grid = (triton.cdiv(n, ROWS * G),)
    _map_out_kernel[grid](y, s, out, n, y.numel(), h, R=ROWS, G=G, LOG2G=log2g, SCALE=sc,
                          ROT=group is not None, HAS_S=scale is not None, LIM=lim,
                          LIM_ROT=quant.BF16_MAX if scale is not None else lim, **_opts())
    return out
