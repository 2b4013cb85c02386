"""The fixed linear maps around a plain codec, as Triton helpers of the fused two-shot
kernel (kernels/fused_allreduce.py): ``hadamard-`` (block Walsh-Hadamard rotation,
comm/codecs/hadamard.py) and ``weighted-`` (static channel scales, comm/codecs/weighted.py).

The two-step sum is linear, so it runs in the mapped basis: stage 1 of the kernel maps
each loaded tile, ``fwht(fl32(x) * s)`` (zeros past the message stay zeros, as the
reference's padding), and step 3 maps each decoded tile back, with the reference's
saturations (clamp to the finite range, NaN passes) around the division by ``s``
(``div_rn``: the plain ``/`` is approximate on the GPU). A tile holds whole groups, so
the rotation never crosses a tile.

The butterflies are exact IEEE adds and subtracts in the reference's order (stage
h = 1, 2, 4, ...: ``(a + b, a - b)``), then one multiply by ``fl32(1/sqrt(G))``; the
kernel launches with ``enable_fp_fusion=False``. So GPU, interpreter and torch agree bit
for bit (tests/test_kernels_interpret.py, tests/gpu/test_fused_allreduce.py).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _stage(v, R: tl.constexpr, G: tl.constexpr, H: tl.constexpr):
    """One butterfly stage: pairs (v[i], v[i + H]) within blocks of 2H -> (a + b, a - b)."""
    w = tl.permute(tl.reshape(v, (R * G // (2 * H), 2, H)), (0, 2, 1))
    a, b = tl.split(w)
    return tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (R, G))


@triton.jit
def fwht_tile(v, R: tl.constexpr, G: tl.constexpr, LOG2G: tl.constexpr, SCALE):
    """Normalised Walsh-Hadamard transform of each row of the fp32 tile ``v [R, G]``
    (groups of 2 to 256 values). Stages are unrolled under constexpr ``if``s: Triton 3.6
    does not compile a loop whose tile shape changes per iteration."""
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
def clamp(v, LIM: tl.constexpr):
    """torch.clamp(v, -LIM, LIM): NaN passes, +-Inf become +-LIM (codecs.saturate)."""
    return tl.where(v > LIM, LIM, tl.where(v < -LIM, -LIM, v))
