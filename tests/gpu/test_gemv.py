"""kernels/gemv.py's CUDA kernel (csrc/gemv.cu) on the GPU: bit for bit against its sum
order (tests/gemv_reference.py) on the llama3-8b decode shapes and odd ones, NaN, the
same bits under CUDA-graph replay and under torch.compile (where the op must run), and a
TP layer's one-row product through it."""
import pytest
import torch
import torch.nn.functional as F

from tests.gemv_reference import gemv_reference
from tests.gpu._harness import needs_cuda

pytestmark = needs_cuda


def _bits(t):
    return t.contiguous().view(torch.int16)


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (13, 264), (4099, 4104)])
def test_gemv_bitwise(n, k):
    from megatron_lite.kernels import gemv
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16).cuda()
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).cuda()
    assert gemv.takes(x, w)
    y = gemv.linear(x, w)
    assert torch.equal(_bits(y[0].cpu()), _bits(gemv_reference(x, w)))
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=2e-2)


def test_gemv_nan_graph_replay_and_compile():
    from megatron_lite.kernels import gemv
    w = torch.randn(1000, 2048, device="cuda").to(torch.bfloat16)
    w[7, 3] = float("nan")
    x = torch.randn(1, 1, 2048, device="cuda").to(torch.bfloat16)
    eager = gemv.linear(x, w)
    assert eager.shape == (1, 1, 1000) and eager[0, 0, 7].isnan()
    assert torch.equal(_bits(eager.view(-1).cpu()), _bits(gemv_reference(x, w)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gemv.linear(x, w)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.linear(x, w)
    x.copy_(torch.randn_like(x, dtype=torch.float32).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(_bits(out), _bits(gemv.linear(x, w)))
    calls = []
    real = gemv._gemv

    def counted(a, b):
        calls.append(1)
        return real(a, b)
    gemv._gemv = counted   # the custom op's body looks it up at run time
    try:
        compiled = torch.compile(lambda a, b: gemv.linear(a, b) * 2, fullgraph=True)
        assert torch.equal(_bits(compiled(x, w)), _bits(real(x, w) * 2))
    finally:
        gemv._gemv = real
    assert calls, "the compiled graph did not run the GEMV op"


def test_layers_take_the_gemv_for_one_row():
    """A TP 1 column-parallel layer: one bf16 row goes through the kernel (its sum order's
    bits), a bias or a second row through F.linear."""
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.parallel_state import TPGroup
    from megatron_lite.tensor_parallel.layers import ColumnParallelLinear
    group = TPGroup(DistCommunicator(None))
    for bias in (False, True):
        layer = ColumnParallelLinear(256, 40, group=group, bias=bias, device="cuda",
                                     dtype=torch.bfloat16)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(40, 256) * 0.05)
            if bias:
                layer.bias.copy_(torch.randn(40))
            x = torch.randn(1, 1, 256, device="cuda").to(torch.bfloat16)
            y = layer(x)
            two = layer(torch.cat([x, x], dim=1))
        if bias:
            assert torch.equal(_bits(y), _bits(F.linear(x, layer.weight, layer.bias)))
        else:
            assert torch.equal(_bits(y.view(-1).cpu()), _bits(gemv_reference(x, layer.weight)))
        assert torch.equal(_bits(two), _bits(F.linear(torch.cat([x, x], dim=1), layer.weight,
                                                      layer.bias)))
