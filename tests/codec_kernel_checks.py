"""The checks of the CUDA C++ codec kernels (kernels/csrc/codec.cu, called through
kernels/codec_cuda.py) against the reference codecs, on any device the kernels run on:
the GPU (tests/gpu/test_codec_cuda.py) and the CPU, where tests/cuda_host/ builds the same
source for the host (tests/test_codec_cuda_source.py).

Bit for bit: integer payloads, bf16 metadata (any NaN pattern counts as NaN), decoded
values, the in-order fp32 sum of rows, the hadamard- rotation and the weighted- scaling
folded into quantize, the error part, and the one-launch sum over ranks, on hostile values
(NaN, +-Inf, beyond bf16, denormals, 1e+-30) and odd group counts per row.
"""
import torch

from tests.gpu._harness import same_bits
from tests.gpu.test_quant_kernels import hostile

# int8 is the symmetric (absmax) codec, int4 and int5 the asymmetric (min/step) ones (int5
# in two bit planes, 4 + 1), int4-sym and int6-sym the symmetric ones at 4 and 6 bits
# (offset-binary codes; int6 in two bit planes, 4 + 2)
SPECS = ["int8:128", "int4:128", "int8:64", "int4:64", "int4-sym:128", "int5:128", "int5:64",
         "int6-sym:128", "int6-sym:64"]
CASES = ([(s, rot, torch.bfloat16) for s in SPECS for rot in (False, True)]
         + [("int4:128", True, torch.float16), ("int4:128", True, torch.float32),
            ("int8:128", False, torch.float32), ("int8:128", True, torch.float16),
            # G = 64 stages its loads through shared memory at every input width
            ("int4:64", True, torch.float32), ("int8:64", False, torch.float16)])
SUM_CASES = [("int4:128", True), ("int8:128", False), ("int8:64", True), ("int4-sym:128", False),
             ("int5:128", True), ("int6-sym:64", True)]


def fwht(x, g):
    from megatron_lite.comm.codecs.hadamard import fwht as ref
    return ref(x, g)


def enc_equal(codec, n, ref, got):
    npay = n * codec.bits // 8
    got = got.cpu()
    return (torch.equal(ref[..., :npay], got[..., :npay])
            and same_bits(ref[..., npay:].contiguous().view(torch.bfloat16),
                          got[..., npay:].contiguous().view(torch.bfloat16)))


def enc_diff(codec, n, ref, got):
    """Where two encodings differ (for the failure message)."""
    npay = n * codec.bits // 8
    got = got.cpu()
    bad = (ref != got).nonzero()
    first = bad[:3].tolist()
    return (f"{len(bad)} bytes differ ({int((bad[:, -1] < npay).sum())} payload); first "
            f"{first}: ref {[int(ref[tuple(i)]) for i in first]} got "
            f"{[int(got[tuple(i)]) for i in first]}")


def value_diff(want, have):
    have = have.cpu()
    bad = ~((want == have) | (torch.isnan(want) & torch.isnan(have)))
    idx = bad.nonzero()[:3].tolist()
    return (f"{int(bad.sum())} values differ; first {idx}: want "
            f"{[float(want[tuple(i)]) for i in idx]} have {[float(have[tuple(i)]) for i in idx]}")


def in_order(rows):
    """rows[0] + rows[1] + ... in fp32, starting from rows[0] (not from 0: -0.0 stays)."""
    rows = iter(rows)
    acc = next(rows).clone()
    for r in rows:
        acc += r
    return acc


def check_bitwise(cc, spec, rot, dtype, device, sizes=None):
    """Quantize (plain and weighted-), dequantize to every output dtype, dequantize-and-sum
    and the error part of codec ``spec`` on ``device``, against the reference."""
    from megatron_lite.comm.codecs import get_codec
    codec = get_codec(spec)
    g = codec.group_size
    kc = codec.kernel_codec()
    r = g if rot else None
    for rows, n in sizes or ((5, g * 3), (7, g * 37), (5, 8192 + 5 * g)):
        x = hostile(rows, n, dtype, seed=n + rows)
        xd = x.to(device)
        xr = fwht(x.float(), g) if rot else x
        ref = codec.encode(xr)
        got = cc.quantize(kc, xd, rot=r)
        assert enc_equal(codec, n, ref, got), (spec, n, "quantize", enc_diff(codec, n, ref, got))
        # weighted-: fl32(x) * s by flat index mod H (H = n and H = G: 8 consecutive
        # values share a row of scales; H = 3G/2, where the message allows it: a group
        # wraps around the scales once; H = 4: 8 values wrap around them)
        for h in (n, g, 3 * g // 2, 4):
            if x.numel() % h:
                continue
            s = torch.exp(torch.randn(h, generator=torch.Generator().manual_seed(h)))
            xs = (x.float().reshape(-1, h) * s).reshape(x.shape)
            ref_s = codec.encode(fwht(xs, g) if rot else xs)
            got_s = cc.quantize(kc, xd, rot=r, scale=s.to(device))
            assert enc_equal(codec, n, ref_s, got_s), (spec, n, h, "weighted quantize",
                                                       enc_diff(codec, n, ref_s, got_s))
        outs = (torch.float32,) if rot else (torch.float32, torch.bfloat16, torch.float16)
        for od in outs:
            want = codec.decode(ref, n, od)
            if rot:
                want = fwht(want, g)
            have = cc.dequantize(kc, ref.to(device), n, od, rot=r)
            assert same_bits(want, have), (spec, n, od, "dequantize", value_diff(want, have))
        acc = in_order(codec.decode(ref, n, torch.float32))
        if rot:
            acc = fwht(acc, g)
        have = cc.dequantize(kc, ref.to(device), n, torch.float32, sum_rows=True, rot=r)
        assert same_bits(acc, have), (spec, n, "dequantize-and-sum", value_diff(acc, have))
        err = codec.decode(ref, n, torch.float32) - (xr.float())
        if rot:
            err = fwht(err, g)
        err = torch.nan_to_num(err, 0.0, 0.0, 0.0)
        have = cc.error_part(kc, xd, ref.to(device), rot=r)
        assert same_bits(err, have), (spec, n, "error part", value_diff(err, have))


def check_sum_ranks(cc, spec, rot, device):
    """The one-shot all-reduce's sums over ranks of a gathered [ranks, chunks, bytes]
    buffer, in one launch: the bits of the reference's in-order fp32 sum of decoded rows."""
    from megatron_lite.comm.codecs import get_codec
    codec = get_codec(spec)
    kc, g = codec.kernel_codec(), codec.group_size
    r = g if rot else None
    for ranks, chunks, n in ((3, 4, g * 5), (2, 2, 4096), (4, 4, g * 3)):
        x = hostile(ranks * chunks, n, torch.bfloat16, seed=ranks * n)
        gathered = cc.quantize(kc, x.to(device), rot=r).view(ranks, chunks, -1)
        got = cc.sum_ranks(kc, gathered, n, rot=r)
        cpu = gathered.cpu()
        ref = torch.stack([in_order(codec.decode(cpu[k, j], n, torch.float32)
                                    for k in range(ranks)) for j in range(chunks)])
        if rot:
            ref = fwht(ref, g)
        assert same_bits(ref, got.cpu()), (spec, n, "sum_ranks vs reference", value_diff(ref, got))
    return gathered, got
