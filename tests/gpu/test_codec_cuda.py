"""GPU: the CUDA C++ codec kernels (kernels/codec_cuda.py) against the reference codecs.

Bit for bit (the checks of tests/codec_kernel_checks.py, which the CPU runs on a host
build of the same source), then CUDA-graph replay, and the fallback of kernels/codec.py
to the Triton kernels for what the CUDA kernels do not take.
"""
import pytest
import torch

from tests.codec_kernel_checks import CASES, SUM_CASES, check_bitwise, check_sum_ranks, value_diff
from tests.gpu._harness import needs_cuda, same_bits

pytestmark = [pytest.mark.gpu, needs_cuda]


def _kernels():
    from megatron_lite.kernels import codec, codec_cuda, quant
    return codec, codec_cuda, quant


@pytest.mark.parametrize("spec,rot,dtype", CASES)
def test_codec_cuda_bitwise(spec, rot, dtype):
    _, cc, _ = _kernels()
    from megatron_lite.comm.codecs import get_codec
    kc = get_codec(spec).kernel_codec()
    assert cc.takes(kc, torch.zeros(128, device="cuda", dtype=dtype))
    check_bitwise(cc, spec, rot, dtype, "cuda")


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


@pytest.mark.parametrize("spec,rot", SUM_CASES)
def test_codec_cuda_sum_ranks(spec, rot):
    """The one-launch sum over ranks: the reference's bits, and those of one Triton
    dequantize-and-sum per chunk, and kernels/codec.py dispatches to it."""
    codec_ops, cc, quant = _kernels()
    from megatron_lite.comm.codecs import get_codec
    codec = get_codec(spec)
    kc, g = codec.kernel_codec(), codec.group_size
    r = g if rot else None
    gathered, got = check_sum_ranks(cc, spec, rot, "cuda")
    n = got.shape[-1]
    want = torch.stack([quant.dequantize(kc, gathered[:, j], n, torch.float32, sum_rows=True,
                                         rot=r) for j in range(gathered.shape[1])])
    assert same_bits(want, got), (spec, n, "sum_ranks vs triton", value_diff(want.cpu(), got))
    assert same_bits(got, codec_ops.sum_ranks(kc, gathered, n, rot=r))


@pytest.mark.parametrize("spec", ["int5:128", "int5:64"])
def test_codec_cuda_dequantize_two_tiles_per_block(spec):
    """int5's dequantize without rotation (csrc/codec.cu's decode_kernel) does two tiles
    per block from about 17 MB (tiles_for): an odd number of tiles, rows that end inside a
    tile, and the last block's spare tile, each output dtype, against the reference."""
    _, cc, _ = _kernels()
    from megatron_lite.comm.codecs import get_codec
    from tests.gpu.test_quant_kernels import hostile
    codec = get_codec(spec)
    kc = codec.kernel_codec()
    rows, n = 3, 31249 * 128            # 3 x 489 tiles of 8192 values (256 threads)
    assert (rows * -(-n // 8192)) % 2 == 1
    x = hostile(rows, n, torch.bfloat16, seed=5)
    ref = codec.encode(x)
    for od in (torch.float32, torch.bfloat16, torch.float16):
        want = codec.decode(ref, n, od)
        have = cc.dequantize(kc, ref.to("cuda"), n, od)
        assert same_bits(want, have), (spec, od, value_diff(want, have))
