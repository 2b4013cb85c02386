"""The CUDA C++ kernels' own source (kernels/csrc/: the codec kernels and the fused
two-shot all-reduce), built for the CPU with tests/cuda_host/ (a block's threads as
fibers on one host thread, IEEE single precision as on the GPU) and called through
kernels/codec_cuda.py's wrappers: the codec kernels bit for bit against the reference
codecs with the GPU test's checks (tests/codec_kernel_checks.py), and the two-shot kernel
across gloo processes over the /dev/shm workspace against comm/algorithms.py's two-step
all-reduce. This checks the kernels' logic, layout, rounding and protocol on every CI
run; tests/gpu/ checks the GPU build, its memory ordering and its speed.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from megatron_lite.kernels.codec_cuda import build_defines
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
# the prepared launches (csrc/peers.cuh): every argument but the data pointers and the
# stream, the 8 peer deltas spelled out
_PREPARE_ARGS = {
    "one_shot": [ctypes.c_int64] * 22,
    "two_shot": ([ctypes.c_int64] * 28 + [ctypes.c_bool, ctypes.c_int64]
                 + [ctypes.c_double] * 4 + [ctypes.c_int64] * 2),
    "one_shot_q": ([ctypes.c_int64] * 26 + [ctypes.c_bool, ctypes.c_int64, ctypes.c_double,
                                            ctypes.c_double, ctypes.c_bool]
                   + [ctypes.c_int64] * 2),
}


def _build(out_dir) -> str:
    """The host build of kernels/csrc/ (cached by the sources' hash), its path."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    files = sorted(os.path.join(d, f) for d in (HOST, CSRC) for f in os.listdir(d)
                   if f.endswith((".h", ".cuh", ".cu", ".cpp")))
    # the GPU build's MEGATRON_LITE_CUDA_DEFINES, so that a kernel variant is checked here
    defines = [f"-D{d}" for d in build_defines()]
    tag = hashlib.sha256(b"".join(open(f, "rb").read() for f in files)
                         + " ".join(defines).encode()).hexdigest()[:12]
    lib = os.path.join(str(out_dir), f"host_codec_{tag}.so")
    if os.path.exists(lib):   # built by another module of this session
        return lib
    tmp = f"{lib}.{os.getpid()}.tmp"
    # -ffp-contract=off: no FMA contraction, as the GPU build's --fmad=false
    subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fPIC",
                    "-shared", "-pthread", *defines, "-I", HOST, "-I", CSRC,
                    os.path.join(HOST, "host_codec.cpp"), "-o", tmp],
                   check=True, capture_output=True, text=True)
    os.replace(tmp, lib)
    return lib


def shared_build_dir(tmp_path_factory):
    """One directory per test session for the host build, so that the modules that load
    it (this one, tests/test_gemv_source.py) compile it once."""
    d = tmp_path_factory.getbasetemp() / "cuda_host"
    d.mkdir(exist_ok=True)
    return d


class _Prepare:
    """An ``ml_*_prepare`` entry as the extension takes it (the 8 peer deltas as a
    sequence, argument 3)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args[:3], *args[3], *args[4:])


def _load(lib: str):
    """The host build as kernels/codec_cuda.py's extension object."""
    so = ctypes.CDLL(lib)
    fns = {}
    for op, args in _ARGS.items():
        fn = getattr(so, f"host_codec_{op}")
        fn.argtypes, fn.restype = args, ctypes.c_int
        fns[f"ml_codec_{op}"] = fn
    for kind, args in _PREPARE_ARGS.items():
        fn = getattr(so, f"host_{kind}_prepare")
        fn.argtypes, fn.restype = args, ctypes.c_int64
        fns[f"ml_{kind}_prepare"] = _Prepare(fn)
    so.host_launch.argtypes, so.host_launch.restype = [ctypes.c_int64] * 5, ctypes.c_int
    fns["ml_launch"] = so.host_launch
    so.host_release.argtypes, so.host_release.restype = [ctypes.c_int64], ctypes.c_int
    fns["ml_release"] = so.host_release
    return type("HostCodecExtension", (), {k: staticmethod(v) for k, v in fns.items()})


def _use_host_build(codec_cuda, ext, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(codec_cuda, "_ext", lambda: ext)
        monkeypatch.setattr(codec_cuda, "_stream", lambda t: 0)
    else:   # a child process of its own
        codec_cuda._ext = lambda: ext
        codec_cuda._stream = lambda t: 0


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    return _build(shared_build_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def host_ext(host_lib):
    return _load(host_lib)


@pytest.fixture
def cc(host_ext, monkeypatch):
    """kernels/codec_cuda.py with the host build in place of the GPU one."""
    from megatron_lite.kernels import codec_cuda
    _use_host_build(codec_cuda, host_ext, monkeypatch)
    return codec_cuda


def test_host_emulator_shuffles_syncs_and_reports_a_stuck_block(host_lib):
    """tests/cuda_host/'s fibers: a shuffle reads the partner lane, __syncthreads orders
    the block's stores, __syncwarp a warp's shared-memory stores, blocks run with their
    own blockIdx; a block whose threads can never all meet (a lane returned before a
    shuffle) is a launch error, not a hang."""
    so = ctypes.CDLL(host_lib)
    probe = so.host_emulator_probe
    probe.argtypes, probe.restype = [ctypes.c_int64] * 4, ctypes.c_int
    grid, block = 3, 96
    n = grid * block
    out = torch.full((3 * n,), -1.0)
    assert probe(out.data_ptr(), grid, block, 0) == 0
    t = torch.arange(block)
    for b in range(grid):
        shuffled = b * 1000 + (t ^ 1)
        assert torch.equal(out[b * block:(b + 1) * block], shuffled.float())
        after = out[n + b * block:n + (b + 1) * block]
        assert torch.equal(after, shuffled.roll(-1).float())
        in_warp = shuffled.view(-1, 32).roll(-1, dims=1).flatten()
        assert torch.equal(out[2 * n + b * block:2 * n + (b + 1) * block], in_warp.float())
    assert probe(out.data_ptr(), 1, 64, 1) != 0


def _unscale_cases(h: int, scale: torch.Tensor) -> torch.Tensor:
    """Values y of channels 0 .. h-1 (rows of h) whose quotients y / s fall on and within
    8 units in the last place of bf16's ties, where a product by fl32(1/s) may round to
    the other bf16 neighbour; then zeros, NaN, ±inf, the fp32 extremes, subnormals and
    ordinary values."""
    g = torch.Generator().manual_seed(11)
    rows = []
    # a tie: a random bf16 value's bits with the dropped 16 bits at 0x8000, moved by d;
    # the first rows' values normal, the last row's subnormal (top bits below 0x0080)
    for d in range(-8, 9):
        top = torch.cat([torch.randint(0x0080, 0x7F7F, (56, h), generator=g, dtype=torch.int32),
                         torch.randint(0, 0x0080, (8, h), generator=g, dtype=torch.int32)])
        sign = torch.randint(0, 2, (64, h), generator=g, dtype=torch.int32) << 31
        q = ((top << 16) + 0x8000 + d | sign).view(torch.float32)
        # y = fl32(q * s): its quotient y / s is within an ulp of q, near the tie
        rows.append((q.double() * scale.double()).float())
    special = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"),
                            3.4028235e38, -3.4028235e38, 1.4e-45, -1e-40, 1.17549435e-38,
                            3.3895314e38, 3.3961e38, 1.0, -2.5, 65504.0, 1e-30])
    rows.append(special.repeat(h // 16 + 1)[:h].view(1, h))
    rows.append(special.flip(0).repeat(h // 16 + 1)[:h].view(1, h))
    rows.append(torch.randn(64, h, generator=g) * 40)
    return torch.cat(rows).reshape(-1, h)


@pytest.mark.parametrize("h", [192, 100])
def test_unscale_restores_the_quotients_bf16(host_lib, h):
    """codec_weighted.cuh's Unscale (the fused kernels' weighted- restore: a product by
    fl32(1/s), a division where that product lies near a bf16 tie, saturated to bf16's
    range) gives bf16(clamp(y / s)) of the reference bit for bit, on quotients at and
    around every kind of tie and on NaN, ±inf, zeros and subnormals, and values already
    within bf16's range; and the product alone does not (so the cases reach the
    division). h = 100 is not a multiple of 8: chunks wrap the channels and the
    scales are loaded one by one."""
    from megatron_lite.comm.codecs.base import saturate
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    from megatron_lite.comm.codecs import CodecSpec
    so = ctypes.CDLL(host_lib)
    probe = so.host_unscale_probe
    probe.argtypes, probe.restype = [ctypes.c_int64] * 6, ctypes.c_int
    g = torch.Generator().manual_seed(3)
    scale = torch.exp2(torch.empty(h).uniform_(-20, 20, generator=g))
    scale[:4] = torch.tensor([2.0 ** -64, 2.0 ** 64, 1.0, 0.1])
    ws = WeightedScheme(CodecSpec("weighted-int8", 128), scale)
    # the reciprocals are fl32(1/s), correctly rounded (an IEEE fp32 division here)
    assert torch.equal(ws.inv_scale, torch.ones_like(ws.scale) / ws.scale)
    y = _unscale_cases(h, ws.scale)
    out = torch.empty_like(y)
    assert probe(y.data_ptr(), ws.scale.data_ptr(), ws.inv_scale.data_ptr(), h,
                 y.numel() // 8, out.data_ptr()) == 0

    def bf16(v):   # the callers' saturation and rounding (the reference's saturate)
        return saturate(v, torch.bfloat16).view(torch.int16)
    want = bf16(y / ws.scale)
    assert torch.equal(bf16(out), want)
    # saturated by Unscale itself (the callers round without clamping), where some
    # quotients do leave bf16's range
    bf16_max = torch.finfo(torch.bfloat16).max
    assert ((y / ws.scale).abs() > bf16_max).sum() > 10
    assert (out.abs() <= bf16_max)[~out.isnan()].all()
    product = bf16(y * ws.inv_scale)
    assert (product != want).sum() > 100   # the cases do need the division


def test_weighted_scales_out_of_range_are_refused():
    """Scales whose reciprocals the kernels' restore could not use (outside [2^-64, 2^64])
    are refused when the codec is built, with the range in the message."""
    from megatron_lite.comm.codecs import CodecSpec
    from megatron_lite.comm.codecs.base import CodecError
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    for bad in (2.0 ** -65, 2.0 ** 65):
        with pytest.raises(CodecError, match=r"within \[2\^-64, 2\^64\]"):
            WeightedScheme(CodecSpec("weighted-int8", 128), torch.tensor([1.0, bad]))


@pytest.mark.parametrize("spec,rot,dtype", CASES)
def test_codec_source_bitwise(cc, spec, rot, dtype):
    from megatron_lite.comm.codecs import get_codec
    g = get_codec(spec).group_size
    # the GPU test's odd group counts, and a row of several blocks, kept small for the host
    check_bitwise(cc, spec, rot, dtype, "cpu", sizes=((5, g * 3), (3, g * 37), (2, 8192 + 5 * g)))


@pytest.mark.parametrize("spec", ["int4:128", "int4:64"])
def test_codec_source_bitwise_full_blocks(cc, spec):
    """A message big enough that every block keeps its 256 threads (codec.cu's
    threads_for: the smaller messages above run in blocks of 32 to 128), so that every
    warp of a block stages its tile (G = 64) through its own shared-memory words."""
    check_bitwise(cc, spec, True, torch.bfloat16, "cpu", sizes=((264, 7808),))


@pytest.mark.parametrize("spec,rot", SUM_CASES)
def test_codec_source_sum_ranks(cc, spec, rot):
    check_sum_ranks(cc, spec, rot, "cpu")


def test_prepared_launches_are_shared_and_checked(cc):
    """A launch is prepared once per distinct argument set while it is in use (a per-call
    launch object must not add one each call); bad arguments are refused at prepare time
    and an unknown handle at launch time, as error codes the wrappers raise."""
    deltas = (0,) * 8
    args = (0, 0, 0, deltas, 4096, 512, 0, 0, 1 << 14, 0, 2, 64, 1, 1 << 10, 8)
    h = cc._prepare("ml_one_shot_prepare", args)
    assert cc._prepare("ml_one_shot_prepare", args) == h
    assert cc._prepare("ml_one_shot_prepare", args[:4] + (8192,) + args[5:]) != h
    with pytest.raises(cc.CudaCodecError, match="cudaError 1"):
        cc._prepare("ml_one_shot_prepare", args[:10] + (9,) + args[11:])   # 9 ranks
    with pytest.raises(cc.CudaCodecError):
        cc._check(cc._ext().ml_launch(1 << 40, 0, 0, 0, 0), "launch")


def test_prepared_launch_slots_are_released_and_reused(cc, monkeypatch):
    """csrc/peers.cuh's table holds the launches in use: a handle that neither the cache
    (here two argument sets) nor a launch holds is released, a released handle launches
    nothing and is not released twice, and its slot takes the next prepared launch."""
    import gc

    from megatron_lite.lru import LruDict
    monkeypatch.setattr(cc, "_HANDLES", LruDict(2))
    gc.collect()                      # nothing else is released during the test

    def prepare(n):
        return cc._prepare("ml_one_shot_prepare",
                           (0, 0, 0, (0,) * 8, n, 512, 0, 0, 1 << 14, 0, 2, 64, 1, 1 << 10, 8))

    ext = cc._ext()
    a, b = prepare(4096), prepare(8192)
    assert prepare(4096) is a and a.h != b.h
    prepare(16384)                    # the cache drops 8192's handle, which b still holds
    assert len(cc._HANDLES) == 2 and prepare(8192) is not b
    freed = b.h
    del b                             # the last holder: released now
    assert ext.ml_release(freed) == 1   # cudaErrorInvalidValue: already released
    assert ext.ml_launch(freed, 0, 0, 0, 0) == 1
    assert prepare(32768).h == freed  # the slot is taken again


def test_codec_source_refuses_what_it_has_no_kernel_for(cc):
    """An unknown layout comes back as an error code, which the wrapper raises."""
    from megatron_lite.comm.codecs import get_codec
    kc = get_codec("int4:128").kernel_codec()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with pytest.raises(cc.CudaCodecError):
        cc._check(cc._ext().ml_codec_quantize(x.data_ptr(), 0, 0, 1, 2, 256, 0, 1, kc.kind,
                                              kc.bits, 96, False, kc.c2, 1.0, 0), "quantize")


def _two_shot_body(rank, world, lib):
    """On every rank: the two-shot kernel on the shared-memory workspace against the
    two-step reference, for plain, rotated and weighted codecs at 4, 5 and 8 bits; checksums of the outputs."""
    import math

    from megatron_lite.comm import fused as backends
    from megatron_lite.comm.algorithms import two_step_all_reduce
    from megatron_lite.comm.codecs import CodecSpec, get_scheme
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.kernels import codec_cuda, fused_allreduce as fa
    from tests.gpu._harness import same_bits
    _use_host_build(codec_cuda, _load(lib))
    state = backends.make_state(None, max_bytes=1 << 18, oneshot_max_bytes=1 << 14,
                                cpu_shm=True)
    ws, base, res = state.ws, DistCommunicator(), []
    scale = torch.rand(192, generator=torch.Generator().manual_seed(5)) * 8 + 0.05
    schemes = [get_scheme("int4:128"), get_scheme("int8:64"), get_scheme("int4-sym:128"),
               get_scheme("hadamard-int8:128"), get_scheme("hadamard-int4:64"),
               WeightedScheme(CodecSpec("weighted-hadamard-int4", 64), scale),
               WeightedScheme(CodecSpec("weighted-int8", 128), scale),
               get_scheme("hadamard-int5:128"),
               WeightedScheme(CodecSpec("weighted-hadamard-int5", 64), scale),
               WeightedScheme(CodecSpec("weighted-hadamard-int6-sym", 128), scale)]
    for i, scheme in enumerate(schemes):
        for n in (192, 47 * 192, 40 * 192):
            g = torch.Generator().manual_seed(1000 * i + 17 * n + rank)
            x = (torch.randn(n, generator=g) * (rank + 1) * 3).to(torch.bfloat16)
            if n > 600 and rank == world - 1:
                x[300] = math.nan
            x = x.view(-1, 192)   # rows of the weighted- codecs' 192 channels
            plan = scheme.kernel_plan(x)
            geo = fa.two_shot_plan(n, world, plan.group, x.device, 2 * n, plan.mapped,
                                   tile_sizes=codec_cuda.TWO_SHOT_TILES)
            got = codec_cuda.two_shot_all_reduce(ws, x, plan, torch.empty_like(x), *geo,
                                                 1 << 22)
            want = two_step_all_reduce(base, x, scheme)
            res.append([str(scheme.spec), n, bool(same_bits(got, want)),
                        int(got.view(torch.int16).sum()), int(ws.status[0])])
            # a launch bound once (what the backends keep per kind of message), on another
            # message of the same kind
            y = (x.float() * -0.75 + 1).to(torch.bfloat16)
            launch = codec_cuda.TwoShotLaunch(ws, plan, n, x.dtype, *geo, 1 << 22)
            got = launch.fresh(y)   # the backends' eager call: a new output
            res.append([f"{scheme.spec} bound", n,
                        bool(same_bits(got, two_step_all_reduce(base, y, scheme))),
                        int(got.view(torch.int16).sum()), int(ws.status[0])])
    # 100 channels (fewer than a group, not a multiple of 8): the restore's general
    # channel loop and scale loads, not the aligned fast path every model takes
    s100 = torch.rand(100, generator=torch.Generator().manual_seed(6)) * 8 + 0.05
    for scheme in (WeightedScheme(CodecSpec("weighted-int8", 128), s100),
                   WeightedScheme(CodecSpec("weighted-hadamard-int4", 64), s100)):
        for n in (200, 48 * 100):
            g = torch.Generator().manual_seed(31 * n + rank)
            x = (torch.randn(n, generator=g) * (rank + 1) * 3).to(torch.bfloat16).view(-1, 100)
            plan = scheme.kernel_plan(x)
            geo = fa.two_shot_plan(n, world, plan.group, x.device, 2 * n, plan.mapped,
                                   tile_sizes=codec_cuda.TWO_SHOT_TILES)
            got = codec_cuda.two_shot_all_reduce(ws, x, plan, torch.empty_like(x), *geo,
                                                 1 << 22)
            res.append([f"{scheme.spec} h=100", n,
                        bool(same_bits(got, two_step_all_reduce(base, x, scheme))),
                        int(got.view(torch.int16).sum()), int(ws.status[0])])
    # the kernel loads, restores and stores bf16 only: another dtype is refused
    try:
        codec_cuda.TwoShotLaunch(ws, plan, n, torch.float16, *geo, 1 << 22)
        refused = False
    except ValueError as e:
        refused = "bf16" in str(e)
    res.append(["float16 refused", n, refused, 0, 0])
    return res


@pytest.mark.parametrize("world", [2, 3])
def test_two_shot_source_matches_two_step_across_processes(host_lib, world):
    """The fused two-shot kernel over the /dev/shm workspace, with its flags and epochs
    (several calls in a row), gives the two-step reference's bits on every rank."""
    from tests._dist import run_distributed
    ranks = run_distributed(_two_shot_body, world, host_lib, timeout=600)
    for rows in ranks:
        assert len(rows) == 65
        bad = [r for r in rows if not r[2] or r[4]]
        assert not bad, bad
    sums = [[r[3] for r in rows] for rows in ranks]
    assert all(s == sums[0] for s in sums[1:]), sums


def _one_shot_body(rank, world, lib):
    """On every rank: the one-shot kernel on the shared-memory workspace against the exact
    rank-order fp32 sum, in bf16, fp16 and fp32, at sizes below, at and past a block, with
    a NaN and an Inf from one rank; several calls in a row (both parities of the slots).
    Returns (dtype, n, bitwise equal, checksum, status) per call."""
    import math
    from megatron_lite.comm import fused as backends
    from megatron_lite.kernels import codec_cuda, fused_allreduce as fa
    from tests.gpu._harness import same_bits
    _use_host_build(codec_cuda, _load(lib))
    state = backends.make_state(None, max_bytes=1 << 18, oneshot_max_bytes=1 << 15,
                                cpu_shm=True)
    ws, res = state.ws, []
    grid = fa.one_shot_grid(ws, torch.device("cpu"))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in (1, 7, 513, 3000, 8191 if dtype != torch.float32 else 4093):
            g = torch.Generator().manual_seed(31 * n + rank)
            x = (torch.randn(n, generator=g) * 4 * (rank + 1)).to(dtype)
            if n > 600 and rank == world - 1:
                x[5], x[n - 1] = math.nan, math.inf
            xs = [(torch.randn(n, generator=torch.Generator().manual_seed(31 * n + r))
                   * 4 * (r + 1)).to(dtype) for r in range(world)]
            for r in range(world):
                if n > 600 and r == world - 1:
                    xs[r][5], xs[r][n - 1] = math.nan, math.inf
            want = xs[0].float()
            for r in range(1, world):
                want = want + xs[r].float()
            got = codec_cuda.one_shot_all_reduce(ws, x, torch.empty_like(x),
                                                 fa.one_shot_block(n, x.device), grid, 1 << 20)
            res.append([str(dtype), n, bool(same_bits(got, want.to(dtype))),
                        float(torch.nan_to_num(got.float()).sum()), int(ws.status[0])])
            # bound once, called twice (the backends' prepared launch)
            launch = codec_cuda.OneShotLaunch(ws, n, dtype, fa.one_shot_block(n, x.device),
                                              grid, 1 << 20)
            for k in (2, 3):
                want_k = (xs[0] * k).float()
                for r in range(1, world):
                    want_k = want_k + (xs[r] * k).float()
                # the output given, then a new one (the backends' eager call) for an input
                # that starts one element past a 16-byte boundary (copied first)
                if k == 2:
                    got = launch(x * k, torch.empty_like(x))
                else:
                    off = torch.empty(n + 1, dtype=dtype)[1:]
                    off.copy_(x * k)
                    got = launch.fresh(off)
                res.append([f"{dtype} bound x{k}", n, bool(same_bits(got, want_k.to(dtype))),
                            float(torch.nan_to_num(got.float()).sum()), int(ws.status[0])])
    return res


@pytest.mark.parametrize("world", [2, 3])
def test_one_shot_source_matches_rank_order_sum(host_lib, world):
    """csrc/two_shot.cu's one-shot kernel (the Triton one-shot's twin, launched through the
    extension) over the /dev/shm workspace: the exact rank-order fp32 sum's bits on every
    rank, NaN and Inf included, call after call."""
    from tests._dist import run_distributed
    ranks = run_distributed(_one_shot_body, world, host_lib, timeout=600)
    for rows in ranks:
        assert len(rows) == 45
        bad = [r for r in rows if not r[2] or r[4]]
        assert not bad, bad
    assert all(r == ranks[0] for r in ranks)


def _one_shot_q_body(rank, world, lib):
    """On every rank: the one-shot quantized kernel over the shared-memory workspace
    against comm/algorithms.py's one-shot all-reduce and the scheme's own error part
    (restored, as error feedback takes it), for plain, rotated and weighted codecs at 4,
    5, 6 and 8 bits, a NaN from one rank, messages of partial groups; a two-shot call
    between (the kernels share the recv slots and their flags). Per call: (codec, n, sum
    equal, error equal, checksum, status)."""
    import math

    from megatron_lite.comm import fused as backends
    from megatron_lite.comm.algorithms import Trace, one_shot_all_reduce, two_step_all_reduce
    from megatron_lite.comm.codecs import CodecSpec, get_scheme
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.kernels import codec_cuda, fused_allreduce as fa
    from tests.gpu._harness import same_bits
    _use_host_build(codec_cuda, _load(lib))
    state = backends.make_state(None, max_bytes=1 << 18, oneshot_max_bytes=1 << 14,
                                cpu_shm=True)
    ws, base, res, cpu = state.ws, DistCommunicator(), [], torch.device("cpu")
    scale = torch.rand(192, generator=torch.Generator().manual_seed(7)) * 8 + 0.05
    schemes = [get_scheme("int4:128"), get_scheme("int8:64"), get_scheme("hadamard-int4:64"),
               get_scheme("hadamard-int8:128"), get_scheme("hadamard-int5:128"),
               WeightedScheme(CodecSpec("weighted-hadamard-int4", 128), scale),
               WeightedScheme(CodecSpec("weighted-int8", 64), scale),
               WeightedScheme(CodecSpec("weighted-hadamard-int6-sym", 128), scale)]
    for i, scheme in enumerate(schemes):
        weighted = isinstance(scheme, WeightedScheme)
        for n in (192, 47 * 192, 40 * 192) + (() if weighted else (1000,)):
            g = torch.Generator().manual_seed(100 * i + 7 * n + rank)
            x = (torch.randn(n, generator=g) * (rank + 1) * 3).to(torch.bfloat16)
            if n > 600 and rank == world - 1:
                x[300] = math.nan
            x = x.view(-1, 192) if weighted else x
            plan = scheme.kernel_plan(x)
            geo = fa.one_shot_q_geometry(ws, n, plan, cpu)
            launch = codec_cuda.OneShotQLaunch(ws, plan, n, *geo, 1 << 22)
            trace = Trace()
            want = one_shot_all_reduce(base, x, scheme, trace)
            want_err = trace.restore(scheme.own_error(trace.chunks, trace.acc, rank)).float()
            got, err = launch(x, torch.empty_like(x), torch.empty(x.shape, dtype=torch.float32))
            res.append([str(scheme.spec), n, bool(same_bits(got, want)),
                        bool(same_bits(err, want_err)), int(got.view(torch.int16).sum()),
                        int(ws.status[0])])
            # the recv slots' other user in between, then the sum alone
            tgeo = fa.two_shot_plan(n, world, plan.group, cpu, 2 * n, plan.mapped,
                                    tile_sizes=codec_cuda.TWO_SHOT_TILES)
            y = (x.float() * -0.5 + 1).to(torch.bfloat16)
            got = codec_cuda.two_shot_all_reduce(ws, y, plan, torch.empty_like(y), *tgeo,
                                                 1 << 22)
            ok = bool(same_bits(got, two_step_all_reduce(base, y, scheme)))
            got = launch.fresh(y)   # a new output; the launch without the error part
            res.append([f"{scheme.spec} sum", n,
                        ok and bool(same_bits(got, one_shot_all_reduce(base, y, scheme))), True,
                        int(got.view(torch.int16).sum()), int(ws.status[0])])
    return res


@pytest.mark.parametrize("world", [2, 3])
def test_one_shot_quantized_source_matches_one_shot_algorithm(host_lib, world):
    """csrc/two_shot.cu's one-launch one-shot quantized all-reduce over the /dev/shm
    workspace: the bits of the one-shot algorithm's sum and of each rank's error part
    (what error feedback carries), on every rank, call after call, between two-shot
    calls over the same slots."""
    from tests._dist import run_distributed
    ranks = run_distributed(_one_shot_q_body, world, host_lib, timeout=600)
    for rows in ranks:
        assert len(rows) == 58
        bad = [r for r in rows if not (r[2] and r[3]) or r[5]]
        assert not bad, bad
    sums = [[r[4] for r in rows] for rows in ranks]
    assert all(s == sums[0] for s in sums[1:]), sums


def test_build_lock_outlives_a_killed_build(tmp_path):
    """A build killed midway leaves torch's ``lock`` file behind (every later build would
    wait on it forever) and dies holding the flock: the next builder gets the flock and
    finds the stale file gone."""
    import sys
    from megatron_lite.kernels import codec_cuda
    d = tmp_path / "megatron_lite_codec_x"
    d.mkdir()
    (d / "lock").write_text("")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
         str(d) + ".lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait()
    with codec_cuda.build_lock(str(d)):
        assert not (d / "lock").exists()
        (d / "lock").write_text("")      # torch's baton during our own build
    assert (d / "lock").exists()         # ours: torch removes it itself when done


def test_build_defines_name_their_own_build(monkeypatch):
    """MEGATRON_LITE_CUDA_DEFINES: NAME or NAME=VALUE items, spaces or commas between, in
    a build of their own (another tag); anything else is refused naming the item."""
    from megatron_lite.kernels import codec_cuda
    assert codec_cuda.build_defines("") == ()
    assert codec_cuda.build_defines(" ML_A, ML_B=3  ML_C=0.5") == ("ML_A", "ML_B=3", "ML_C=0.5")
    for bad in ("ML_A=", "1ML", "ML_A=$(rm)", "-DML_A", "ML A=1=2"):
        with pytest.raises(ValueError, match="MEGATRON_LITE_CUDA_DEFINES"):
            codec_cuda.build_defines(bad)
    monkeypatch.setenv(codec_cuda.DEFINES_ENV, "ML_X=2")
    assert codec_cuda.build_defines() == ("ML_X=2",)
    plain = codec_cuda.source_tag()
    assert plain == codec_cuda.source_tag(())
    tags = {plain, codec_cuda.source_tag(("ML_X=2",)), codec_cuda.source_tag(("ML_X=3",)),
            codec_cuda.source_tag(("ML_X=2", "ML_Y"))}
    assert len(tags) == 4
