"""GPU: the CUDA C++ codec kernels (kernels/codec_cuda.py) against the reference codecs.

Bit for bit, as tests/gpu/test_quant_kernels.py does for the Triton kernels: integer
payloads, bf16 metadata (any NaN pattern counts as NaN), decoded values, the in-order fp32
sum of rows, the hadamard- rotation and the weighted- scaling folded into quantize, and the
error part, on hostile values and odd row counts; then CUDA-graph replay, and the fallback
of kernels/codec.py to the Triton kernels for what the CUDA kernels do not take.
"""
import pytest
import torch

from tests.gpu._harness import needs_cuda, same_bits
from tests.gpu.test_quant_kernels import hostile

pytestmark = [pytest.mark.gpu, needs_cuda]

# int8 is the symmetric (absmax) codec, int4 the asymmetric (min/step) one, int4-sym the
# symmetric one at 4 bits (offset-binary codes)
SPECS = ["int8:128", "int4:128", "int8:64", "int4:64", "int4-sym:128"]
CASES = ([(s, rot, torch.bfloat16) for s in SPECS for rot in (False, True)]
         + [("int4:128", True, torch.float16), ("int4:128", True, torch.float32),
            ("int8:128", False, torch.float32), ("int8:128", True, torch.float16)])


def _kernels():
    from megatron_lite.kernels import codec, codec_cuda, quant
    return codec, codec_cuda, quant


def _fwht(x, g):
    from megatron_lite.comm.codecs.hadamard import fwht
    return fwht(x, g)


def _enc_equal(codec, n, ref, got):
    npay = n * codec.bits // 8
    got = got.cpu()
    return (torch.equal(ref[..., :npay], got[..., :npay])
            and same_bits(ref[..., npay:].contiguous().view(torch.bfloat16),
                          got[..., npay:].contiguous().view(torch.bfloat16)))


def _diff(codec, n, ref, got):
    """Where two encodings differ (for the failure message)."""
    npay = n * codec.bits // 8
    got = got.cpu()
    bad = (ref != got).nonzero()
    first = bad[:3].tolist()
    return (f"{len(bad)} bytes differ ({int((bad[:, -1] < npay).sum())} payload); first "
            f"{first}: ref {[int(ref[tuple(i)]) for i in first]} got "
            f"{[int(got[tuple(i)]) for i in first]}")


def _vdiff(want, have):
    have = have.cpu()
    bad = ~((want == have) | (torch.isnan(want) & torch.isnan(have)))
    idx = bad.nonzero()[:3].tolist()
    return (f"{int(bad.sum())} values differ; first {idx}: want "
            f"{[float(want[tuple(i)]) for i in idx]} have {[float(have[tuple(i)]) for i in idx]}")


@pytest.mark.parametrize("spec,rot,dtype", CASES)
def test_codec_cuda_bitwise(spec, rot, dtype):
    _, cc, _ = _kernels()
    from megatron_lite.comm.codecs import get_codec
    codec = get_codec(spec)
    g = codec.group_size
    kc = codec.kernel_codec()
    r = g if rot else None
    for rows, n in ((5, g * 3), (7, g * 37), (5, 8192 + 5 * g)):
        x = hostile(rows, n, dtype, seed=n + rows)
        assert cc.takes(kc, x.cuda())
        xr = _fwht(x.float(), g) if rot else x
        ref = codec.encode(xr)
        got = cc.quantize(kc, x.cuda(), rot=r)
        assert _enc_equal(codec, n, ref, got), (spec, n, "quantize", _diff(codec, n, ref, got))
        # weighted-: fl32(x) * s by flat index mod H (H = n here, and a divisor of n)
        for h in (n, g):
            s = torch.exp(torch.randn(h, generator=torch.Generator().manual_seed(h)))
            xs = (x.float().reshape(-1, h) * s).reshape(x.shape)
            ref_s = codec.encode(_fwht(xs, g) if rot else xs)
            got_s = cc.quantize(kc, x.cuda(), rot=r, scale=s.cuda())
            assert _enc_equal(codec, n, ref_s, got_s), (spec, n, h, "weighted quantize",
                                                        _diff(codec, n, ref_s, got_s))
        outs = (torch.float32,) if rot else (torch.float32, torch.bfloat16, torch.float16)
        for od in outs:
            want = codec.decode(ref, n, od)
            if rot:
                want = _fwht(want, g)
            have = cc.dequantize(kc, ref.cuda(), n, od, rot=r)
            assert same_bits(want, have), (spec, n, od, "dequantize", _vdiff(want, have))
        parts = codec.decode(ref, n, torch.float32)
        acc = parts[0].clone()
        for i in range(1, rows):
            acc += parts[i]
        if rot:
            acc = _fwht(acc, g)
        have = cc.dequantize(kc, ref.cuda(), n, torch.float32, sum_rows=True, rot=r)
        assert same_bits(acc, have), (spec, n, "dequantize-and-sum", _vdiff(acc, have))
        err = codec.decode(ref, n, torch.float32) - (xr.float())
        if rot:
            err = _fwht(err, g)
        err = torch.nan_to_num(err, 0.0, 0.0, 0.0)
        have = cc.error_part(kc, x.cuda(), ref.cuda(), rot=r)
        assert same_bits(err, have), (spec, n, "error part", _vdiff(err, have))


def test_codec_cuda_graph_replay():
    """Captured once, replayed on new values: the same bits as eager launches."""
    _, cc, _ = _kernels()
    from megatron_lite.comm.codecs import get_codec
    kc = get_codec("int4:128").kernel_codec()
    x = torch.randn(4, 1 << 16, device="cuda", dtype=torch.bfloat16)
    cc.quantize(kc, x, rot=128)                  # build, and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        buf = cc.quantize(kc, x, rot=128)
        y = cc.dequantize(kc, buf, x.shape[-1], torch.float32, sum_rows=True, rot=128)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        eb = cc.quantize(kc, x, rot=128)
        assert torch.equal(buf, eb)
        assert same_bits(y, cc.dequantize(kc, eb, x.shape[-1], torch.float32, sum_rows=True,
                                          rot=128))


def test_codec_dispatch_falls_back_to_triton():
    """kernels/codec.py: a misaligned view or another codec goes to the Triton kernels,
    with the same bits."""
    codec_ops, cc, quant = _kernels()
    from megatron_lite.comm.codecs import get_codec
    kc = get_codec("int8:128").kernel_codec()
    base = torch.randn(2 * 1024 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(2, 1024)                    # 2-byte offset: not 16-byte aligned
    assert not cc.takes(kc, x)
    assert torch.equal(codec_ops.quantize(kc, x), quant.quantize(kc, x))
    assert torch.equal(codec_ops.quantize(kc, x.clone()), cc.quantize(kc, x.clone()))
    for other in ("fp8:128", "int3:128", "int4:32"):   # codecs the CUDA kernels leave to Triton
        assert not cc.takes(get_codec(other).kernel_codec(), x.clone())


def test_codec_cuda_rejects_bad_input():
    _, cc, _ = _kernels()
    from megatron_lite.comm.codecs import get_codec
    kc = get_codec("int4:128").kernel_codec()
    with pytest.raises(ValueError):
        cc.quantize(kc, torch.zeros(100, device="cuda"))
    with pytest.raises(ValueError):
        cc.quantize(kc, torch.zeros(256, device="cuda"), rot=64)
    with pytest.raises(ValueError):
        cc.dequantize(kc, torch.zeros(10, dtype=torch.uint8, device="cuda"), 128)
    with pytest.raises(ValueError):
        cc.quantize(kc, torch.zeros(256, device="cuda"),
                    scale=torch.ones(3, device="cuda"))


def _in_order(rows):
    """rows[0] + rows[1] + ... in fp32, starting from rows[0] (not from 0: -0.0 stays)."""
    rows = iter(rows)
    acc = next(rows).clone()
    for r in rows:
        acc += r
    return acc


@pytest.mark.parametrize("spec,rot", [("int4:128", True), ("int8:128", False),
                                      ("int8:64", True), ("int4-sym:128", False)])
def test_codec_cuda_sum_ranks(spec, rot):
    """The one-shot all-reduce's sums over ranks of a gathered [ranks, chunks, bytes]
    buffer, in one launch: the bits of one dequantize-and-sum per chunk, and of the
    reference's in-order fp32 sum of decoded rows."""
    codec_ops, cc, quant = _kernels()
    from megatron_lite.comm.codecs import get_codec
    codec = get_codec(spec)
    kc, g = codec.kernel_codec(), codec.group_size
    r = g if rot else None
    for ranks, chunks, n in ((3, 4, g * 5), (2, 2, 4096), (4, 4, g * 3)):
        x = hostile(ranks * chunks, n, torch.bfloat16, seed=ranks * n)
        gathered = cc.quantize(kc, x.cuda(), rot=r).view(ranks, chunks, -1)
        got = cc.sum_ranks(kc, gathered, n, rot=r)
        want = torch.stack([quant.dequantize(kc, gathered[:, j], n, torch.float32,
                                             sum_rows=True, rot=r) for j in range(chunks)])
        assert same_bits(want, got), (spec, n, "sum_ranks vs triton", _vdiff(want.cpu(), got))
        cpu = gathered.cpu()
        ref = torch.stack([_in_order(codec.decode(cpu[k, j], n, torch.float32)
                                     for k in range(ranks)) for j in range(chunks)])
        if rot:
            ref = _fwht(ref, g)
        assert same_bits(ref, got.cpu()), (spec, n, "sum_ranks vs reference", _vdiff(ref, got))
        assert same_bits(got, codec_ops.sum_ranks(kc, gathered, n, rot=r))
