"""kernels/csrc/gemv.cu built for the CPU (tests/cuda_host/, as tests/test_codec_cuda_source.py
builds the codec kernels) and called through kernels/gemv.py: bit for bit against the
kernel's sum order (tests/gemv_reference.py) on odd sizes, NaN and infinities; a view at
an odd offset takes F.linear; and the layers call it only for one bf16 row on a GPU."""
import ctypes
import os

import pytest
import torch
import torch.nn.functional as F

from tests.gemv_reference import gemv_reference
from tests.test_codec_cuda_source import _build, shared_build_dir


@pytest.fixture(scope="module")
def host_gemv(tmp_path_factory):
    so = ctypes.CDLL(_build(shared_build_dir(tmp_path_factory)))
    so.host_gemv.argtypes, so.host_gemv.restype = [ctypes.c_int64] * 6, ctypes.c_int
    return so.host_gemv


@pytest.fixture
def gemv(host_gemv, monkeypatch):
    """kernels/gemv.py with the host build in place of the GPU one."""
    from megatron_lite.kernels import codec_cuda, gemv
    ext = type("HostGemv", (), {"ml_gemv": staticmethod(host_gemv)})
    monkeypatch.setattr(codec_cuda, "gemv_ext", lambda: ext)
    monkeypatch.setattr(codec_cuda, "_stream", lambda t: 0)
    return gemv


@pytest.mark.parametrize("n,k", [(1, 8), (13, 264), (9, 1024), (17, 4104)])
def test_gemv_source_bitwise(gemv, n, k):
    g = torch.Generator().manual_seed(n * k)
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    y = gemv._gemv(x, w)
    assert y.shape == (1, n) and y.dtype == torch.bfloat16
    ref = gemv_reference(x, w)
    assert torch.equal(y[0].view(torch.int16), ref.view(torch.int16))
    # the same sum as cuBLAS's up to bf16 rounding of a differently ordered fp32 sum
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


def test_gemv_source_sum_order(gemv):
    """Rows whose fp32 sum depends on the order (2^25 + 1 rounds to 2^25): the butterfly's
    (xor 16 first), a lane's words' (L before L + 32) and a word's values' (in order). A
    kernel that sums in another order gives 0 where these give 1, or the reverse."""
    big = 2.0 ** 25
    w = torch.zeros(3, 512)
    w[0, 0], w[0, 16 * 8], w[0, 1 * 8] = big, -big, 1.0          # lanes 0, 16 and 1
    w[1, 0:4] = torch.tensor([big, 1.0, -big, 1.0])               # one word
    w[2, 0], w[2, 32 * 8], w[2, 32 * 8 + 1] = big, -big, 1.0      # words 0 and 32 of lane 0
    w = w.to(torch.bfloat16)
    x = torch.ones(512, dtype=torch.bfloat16)
    y = gemv._gemv(x, w)
    assert torch.equal(y.view(torch.int16), gemv_reference(x, w).view(torch.int16))
    assert y.float().tolist() == [1.0, 1.0, 1.0]


def test_gemv_source_nan_and_infinities(gemv):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 256, generator=g).to(torch.bfloat16)
    x = torch.randn(256, generator=g).to(torch.bfloat16)
    x[:3] = 1.0
    w[3, 7] = float("nan")
    w[5, 0] = float("inf")
    w[6, 1], w[6, 2] = float("inf"), float("-inf")   # +inf - inf: NaN
    y = gemv._gemv(x, w)
    ref = gemv_reference(x, w)
    assert torch.equal(y.view(torch.int16), ref.view(torch.int16))
    assert y[3].isnan() and y[6].isnan() and y[5].isinf()
    assert y[3].view(torch.int16) == 0x7FC0   # c10's NaN, as every kernel here writes


def test_gemv_odd_offset_takes_f_linear(gemv):
    w = torch.randn(8, 64).to(torch.bfloat16)
    x = torch.randn(65).to(torch.bfloat16)[1:]   # 2 bytes past a 16-byte boundary
    assert x.data_ptr() % 16
    assert torch.equal(gemv._gemv(x, w), F.linear(x, w))


def test_gemv_takes_one_bf16_row_on_a_gpu_only():
    """``takes`` on fake CUDA tensors (no GPU needed to ask it): one bf16 row, a contiguous
    bf16 weight on the same device, no bias, no autograd; real CPU tensors go to F.linear."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from megatron_lite.kernels.gemv import linear, takes
    w = torch.randn(8, 64).to(torch.bfloat16)
    x = torch.randn(1, 64).to(torch.bfloat16)
    assert not takes(x, w)                                     # a CPU tensor
    assert torch.equal(linear(x, w), F.linear(x, w))
    bf = dict(dtype=torch.bfloat16, device="cuda")
    with FakeTensorMode():
        cw, cx = torch.empty(8, 64, **bf), torch.empty(1, 64, **bf)
        assert takes(cx, cw) and takes(torch.empty(1, 1, 64, **bf), cw)
        assert not takes(torch.empty(2, 64, **bf), cw)                     # two rows
        assert not takes(cx.float(), cw.float())                           # fp32
        assert not takes(cx, cw, torch.empty(8, **bf))                     # a bias
        assert not takes(cx, torch.empty_strided((8, 64), (1, 8), **bf))   # not contiguous
        assert not takes(torch.empty(1, 60, **bf), torch.empty(8, 60, **bf))   # 60 % 8
        assert not takes(torch.empty(1, 64, **bf, requires_grad=True), cw)     # autograd
        assert not takes(cx, torch.empty(0, 64, **bf))                     # no rows
        assert not takes(cx, torch.empty(8, 64, dtype=torch.bfloat16, device="cuda:1"))
        with torch.no_grad():
            assert takes(torch.empty(1, 64, **bf, requires_grad=True), cw)


def test_gemv_without_a_kernel_build_is_f_linear(gemv, monkeypatch):
    """A machine that cannot build the extension (no CUDA compiler): one warning, then
    F.linear for every call."""
    def fail():
        raise OSError("nvcc not found")
    monkeypatch.setattr(gemv.codec_cuda, "gemv_ext", fail)
    monkeypatch.setattr(gemv, "_UNAVAILABLE", [])
    w = torch.randn(8, 64).to(torch.bfloat16)
    x = torch.randn(1, 64).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="nvcc not found"):
        assert torch.equal(gemv._gemv(x, w), F.linear(x, w))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(gemv._gemv(x, w), F.linear(x, w))


def test_gemv_extension_is_gemv_cu_alone(monkeypatch, tmp_path):
    """codec_cuda.gemv_ext builds csrc/gemv.cu with bindings for ml_gemv alone, in a build
    directory of its own (not the codec extension's, whose build takes minutes)."""
    import torch.utils.cpp_extension as ext

    from megatron_lite.kernels import codec_cuda
    seen = {}
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(ext, "load", lambda **kw: seen.update(kw) or "loaded")
    assert codec_cuda.gemv_ext.__wrapped__() == "loaded"
    bindings, *sources = seen["sources"]
    assert [os.path.basename(s) for s in sources] == ["gemv.cu"]
    text = open(bindings).read()
    assert 'm.def("ml_gemv", &ml_gemv' in text and "ml_codec" not in text
    assert seen["name"].startswith("megatron_lite_gemv_")
    assert os.path.basename(seen["build_directory"]).startswith("megatron_lite_gemv_")
    assert "--fmad=false" in seen["extra_cuda_cflags"]
