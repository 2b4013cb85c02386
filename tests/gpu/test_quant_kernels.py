"""GPU: the Triton quantize / dequantize(+sum) kernels against the reference codecs.

Integer payloads bit for bit, bf16 metadata bit for bit (any NaN pattern counts as NaN:
torch's own NaN bits differ between CPU builds), decoded values bit for bit, for every
codec, group size, input dtype, odd row lengths and hostile values (NaN, +-Inf, fp32
beyond bf16, denormals, constant and all-zero groups, huge and tiny magnitudes).
"""
import math

import pytest
import torch

from tests.gpu._harness import import_kernels, needs_cuda, same_bits

pytestmark = [pytest.mark.gpu, needs_cuda]

# Each (codec, dtype) pair is a separate Triton compile: the matrix is kept small on purpose.
SPECS = ["bf16", "int8:128", "int5:128", "int4:128", "int4:32", "int4-sym:64", "int3:128",
         "int2:256", "fp8:128", "int6-sym:64"]
FULL = ("int4:128", "fp8:128")     # every input and output dtype; the rest bf16 -> fp32


def hostile(rows, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.logspace(-30, 30, rows)[:, None]
    x[0, : min(n, 64)] = 0.0
    x[0, 64:192] = 2.5
    if rows > 1:
        x[1, min(3, n - 1)] = math.nan   # indices fit rows as short as 3 values (bf16)
        x[1, n // 2] = math.inf
        x[1, n - 1] = -math.inf
    if rows > 2:
        k = min(128, n)
        x[2, :k] = torch.randn(k, generator=g) * 1e-41              # fp32 denormals
        x[2, min(130, n - 1)] = 3.2e38
    if rows > 3 and dtype == torch.float32:
        x[3, min(7, n - 1)] = 3.4e38                                             # beyond bf16: non-finite
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype)


def _split(buf, codec, n):
    if codec.name == "bf16":
        return [buf.view(torch.bfloat16)]
    npay = n * codec.bits // 8
    return [buf[..., :npay], buf[..., npay:].contiguous().view(torch.bfloat16)]


CASES = [(s, d) for s in SPECS for d in (torch.bfloat16, torch.float16, torch.float32)
         if s in FULL or d == torch.bfloat16]


@pytest.mark.parametrize("spec,dtype", CASES)
def test_quantize_dequantize_bitwise(spec, dtype):
    k = import_kernels()
    from megatron_lite.comm.codecs import get_codec
    codec = get_codec(spec)
    g = getattr(codec, "group_size", 1)
    for n in (g * 3, g * 37, 8192 + 5 * g):
        x = hostile(5, n, dtype, seed=n)
        kc = codec.kernel_codec()
        ref = codec.encode(x)
        got = k.quant.quantize(kc, x.cuda()).cpu()
        for a, b in zip(_split(ref, codec, n), _split(got, codec, n)):
            assert same_bits(a, b) if a.dtype == torch.bfloat16 else torch.equal(a, b), (spec, n)
        for od in ((torch.float32, torch.bfloat16, torch.float16) if spec in FULL
                   else (torch.float32,)):
            want = codec.decode(ref, n, od)
            have = k.quant.dequantize(kc, ref.cuda(), n, od).cpu()
            assert same_bits(want, have), (spec, n, od)
        parts = codec.decode(ref, n, torch.float32)
        acc = parts[0].clone()
        for r in range(1, parts.shape[0]):
            acc += parts[r]
        have = k.quant.dequantize(kc, ref.cuda(), n, torch.float32, sum_rows=True).cpu()
        assert same_bits(acc, have), (spec, n)


def test_quantize_rejects_bad_shapes():
    k = import_kernels()
    from megatron_lite.comm.codecs import get_codec
    kc = get_codec("int4:128").kernel_codec()
    with pytest.raises(ValueError):
        k.quant.quantize(kc, torch.zeros(100, device="cuda"))
    with pytest.raises(ValueError):
        k.quant.dequantize(kc, torch.zeros(10, dtype=torch.uint8, device="cuda"), 128)


@pytest.mark.parametrize("impl", ["quant", "codec"])
def test_rows_past_the_second_grid_axis(impl):
    """A 256 MB row is 65536 tiles of 2048 values, one more than a CUDA grid's second axis
    takes: the kernels use one flat axis, so the row decodes to the same values as its
    pieces do (the groups are the same; only the byte layout of the rows differs)."""
    k = import_kernels()
    from megatron_lite.comm.codecs import get_codec
    from megatron_lite.kernels import codec as codec_ops
    ops = k.quant if impl == "quant" else codec_ops
    kc = get_codec("int4:128").kernel_codec()
    n = 1 << 27
    x = torch.randn(1, n, device="cuda", generator=torch.Generator("cuda").manual_seed(1),
                    dtype=torch.float32).to(torch.bfloat16)
    whole = ops.dequantize(kc, ops.quantize(kc, x), n, torch.bfloat16)
    parts = x.view(64, n // 64)
    pieces = ops.dequantize(kc, ops.quantize(kc, parts), n // 64, torch.bfloat16)
    assert torch.equal(whole.view(-1), pieces.view(-1))
    del whole, pieces
    s = ops.dequantize(kc, ops.quantize(kc, x.expand(2, n).contiguous()), n, torch.float32,
                       sum_rows=True)
    assert torch.equal(s, 2 * ops.dequantize(kc, ops.quantize(kc, x), n)[0])
