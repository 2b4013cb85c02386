"""The CUDA C++ codec kernels' own source (kernels/csrc/codec.cu), built for the CPU with
tests/cuda_host/ (each warp on 32 host threads, IEEE single precision as on the GPU) and
called through kernels/codec_cuda.py's wrappers: bit for bit against the reference codecs,
with the GPU test's checks (tests/codec_kernel_checks.py). This checks the kernels' logic,
layout and rounding on every CI run; tests/gpu/ checks the GPU build and its speed.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from tests.codec_kernel_checks import CASES, SUM_CASES, check_bitwise, check_sum_ranks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = os.path.join(REPO, "tests", "cuda_host")
CSRC = os.path.join(REPO, "kernels", "csrc")
_ARGS = {
    "quantize": [ctypes.c_int64] * 11 + [ctypes.c_bool, ctypes.c_double, ctypes.c_double,
                                         ctypes.c_int64],
    "dequantize": [ctypes.c_int64] * 12 + [ctypes.c_bool, ctypes.c_double, ctypes.c_double,
                                           ctypes.c_int64],
    "error": [ctypes.c_int64] * 10 + [ctypes.c_bool, ctypes.c_double, ctypes.c_int64],
}


@pytest.fixture(scope="module")
def host_ext(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    files = sorted(os.path.join(d, f) for d in (HOST, CSRC) for f in os.listdir(d)
                   if f.endswith((".h", ".cuh", ".cu", ".cpp")))
    tag = hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()[:12]
    lib = tmp_path_factory.mktemp("cuda_host") / f"host_codec_{tag}.so"
    # -ffp-contract=off: no FMA contraction, as the GPU build's --fmad=false
    subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC",
                    "-shared", "-pthread", "-I", HOST, "-I", CSRC,
                    os.path.join(HOST, "host_codec.cpp"), "-o", str(lib)],
                   check=True, capture_output=True, text=True)
    so = ctypes.CDLL(str(lib))
    fns = {}
    for op, args in _ARGS.items():
        fn = getattr(so, f"host_codec_{op}")
        fn.argtypes, fn.restype = args, ctypes.c_int
        fns[f"ml_codec_{op}"] = fn
    return type("HostCodecExtension", (), {k: staticmethod(v) for k, v in fns.items()})


@pytest.fixture
def cc(host_ext, monkeypatch):
    """kernels/codec_cuda.py with the host build in place of the GPU one."""
    from megatron_lite.kernels import codec_cuda
    monkeypatch.setattr(codec_cuda, "_ext", lambda: host_ext)
    monkeypatch.setattr(codec_cuda, "_stream", lambda t: 0)
    return codec_cuda


@pytest.mark.parametrize("spec,rot,dtype", CASES)
def test_codec_source_bitwise(cc, spec, rot, dtype):
    from megatron_lite.comm.codecs import get_codec
    g = get_codec(spec).group_size
    # the GPU test's odd group counts, and a row of several blocks, kept small for host threads
    check_bitwise(cc, spec, rot, dtype, "cpu", sizes=((5, g * 3), (3, g * 37), (2, 8192 + 5 * g)))


@pytest.mark.parametrize("spec,rot", SUM_CASES)
def test_codec_source_sum_ranks(cc, spec, rot):
    check_sum_ranks(cc, spec, rot, "cpu")


def test_codec_source_refuses_what_it_has_no_kernel_for(cc):
    """An unknown layout comes back as an error code, which the wrapper raises."""
    from megatron_lite.comm.codecs import get_codec
    kc = get_codec("int4:128").kernel_codec()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with pytest.raises(cc.CudaCodecError):
        cc._check(cc._ext().ml_codec_quantize(x.data_ptr(), 0, 0, 1, 2, 256, 0, 1, kc.kind,
                                              kc.bits, 96, False, kc.c2, 1.0, 0), "quantize")
