"""CUDA C++ codec kernels (kernels/csrc/codec.cu) for the integer group codecs at 8, 6, 5
and 4 bits, group 64 or 128 (the symmetric ``int8:G``, ``int6-sym:G`` and ``int4-sym:G``,
the asymmetric ``int4:G`` and ``int5:G``), with the ``hadamard-`` rotation and the
``weighted-`` channel scales folded into quantize. Same functions and same bits as the
Triton kernels of kernels/quant.py, which serve every other codec; kernels/codec.py
picks.

Why CUDA C++ here: in the Triton kernels the reshape-based butterflies of the rotation go
through layout conversions, and the ``weighted-`` scaling is a separate torch multiply.
Here a thread holds 32 values of one group (four 16-byte loads), a group is G/32 lanes
of one warp, the reductions and the butterflies that cross threads are warp shuffles,
rounding is a float addition (no conversion instructions), and the scales are applied in
the same pass. docs/results/codec_kernels.md holds their measurements against Triton's
and a bf16 copy. tests/test_codec_cuda_source.py runs this same source on the CPU, bit
for bit against the reference.

The source compiles on first use, on the GPU machine only (``torch.utils.cpp_extension.
load``, four translation units built in parallel, cached under a name that holds the
sources' hash, behind an ``flock`` that a killed build cannot leave held: ``build_lock``);
CPU machines never build it. ``MEGATRON_LITE_CUDA_DEFINES`` (``NAME`` or ``NAME=VALUE``,
separated by spaces or commas) adds preprocessor definitions to that build, in a build
directory of its own, so that one GPU session can build and time variants of a kernel
side by side (processes with different definitions): the sources define none of them.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import sys
from typing import Optional

import torch

from ..lru import LruDict
from .calls import (BF16_MAX, check_rotation, dequantize_buffers, error_buffers, geometry,
                    out_limit, quantize_buffers)
from .config import INTERPRET, KIND_ASYM, KIND_SYM, KernelCodec, KernelPlan
from .workspace import MAX_BLOCKS

_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_SRC = os.path.join(_CSRC, "codec.cu")   # includes the headers of csrc/
_SOURCES = (_SRC, os.path.join(_CSRC, "two_shot.cu"), os.path.join(_CSRC, "one_shot_q.cu"))
_ENTRY = "entry.h"   # csrc/entry.h: the entry points' declarations


class CudaCodecError(RuntimeError):
    pass


def build() -> None:
    """Build (or load) the extension now, e.g. before the first call of a timed run."""
    _ext()


_FUNCTIONS = ("ml_codec_quantize", "ml_codec_dequantize", "ml_codec_error",
              "ml_one_shot_prepare", "ml_two_shot_prepare", "ml_one_shot_q_prepare", "ml_launch",
              "ml_release")


DEFINES_ENV = "MEGATRON_LITE_CUDA_DEFINES"
_DEFINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(=[A-Za-z0-9_.+-]+)?")


def build_defines(text: Optional[str] = None) -> tuple:
    """The preprocessor definitions of ``text`` (default: ``$MEGATRON_LITE_CUDA_DEFINES``):
    ``NAME`` or ``NAME=VALUE`` items separated by spaces or commas, in order. Raises
    ValueError naming the first item that is not one."""
    text = os.environ.get(DEFINES_ENV, "") if text is None else text
    items = tuple(t for t in re.split(r"[\s,]+", text) if t)
    for t in items:
        if not _DEFINE.fullmatch(t):
            raise ValueError(f"{DEFINES_ENV}: {t!r} is not NAME or NAME=VALUE (letters, digits, "
                             "_ . + -)")
    return items


def source_tag(defines: tuple = ()) -> str:
    """The build's name: a hash of torch's, CUDA's and Python's versions, every source
    and header of csrc/, and the preprocessor definitions."""
    digest = hashlib.sha256(f"{torch.__version__} {torch.version.cuda} {sys.version_info[:2]}"
                            .encode())
    for name in sorted(os.listdir(_CSRC)):   # the sources and the headers they include
        if name.endswith((".cu", ".cuh", ".h")):
            with open(os.path.join(_CSRC, name), "rb") as f:
                digest.update(name.encode() + f.read())
    if defines:
        digest.update(("-D" + " -D".join(defines)).encode())
    return digest.hexdigest()[:12]


def _build_directory(tag: str, what: str = "codec") -> str:
    """Where extension ``what`` of source version ``tag`` is built: under torch's extensions
    root (``TORCH_EXTENSIONS_DIR`` if set), one directory per extension, source, torch,
    CUDA and Python version."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return os.path.join(root, f"megatron_lite_{what}_{tag}")


@contextlib.contextmanager
def build_lock(directory: str):
    """Hold the build of ``directory`` alone. torch's own lock (the file ``lock`` in the
    build directory, created and deleted around a build) outlives a build killed midway,
    and every later build then waits on it forever; an ``flock`` is released by the OS
    when its holder dies. Under it no other builder is running, so a ``lock`` file found
    there is stale and is removed."""
    import fcntl
    os.makedirs(directory, exist_ok=True)
    with open(directory + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            stale = os.path.join(directory, "lock")
            if os.path.exists(stale):
                os.remove(stale)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_if_changed(path: str, text: str) -> None:
    try:
        with open(path) as f:
            if f.read() == text:
                return      # an unchanged mtime: ninja does not rebuild it
    except FileNotFoundError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _load(what: str, sources, functions):
    """Build (once per source version and machine) and load extension ``what`` of
    ``sources``, binding ``functions`` (declared in csrc/entry.h)."""
    from torch.utils.cpp_extension import load
    defines = build_defines()
    flags = [f"-D{d}" for d in defines]
    tag = source_tag(defines)
    directory = _build_directory(tag, what)
    bindings = os.path.join(directory, "bindings.cpp")
    print(f"building the CUDA {what} kernels (kernels/csrc/, once per machine"
          + (f"; with {' '.join(flags)}" if flags else "") + ")", file=sys.stderr, flush=True)
    with build_lock(directory):
        _write_if_changed(bindings, f'#include <torch/extension.h>\n#include "{_ENTRY}"\n'
                          + "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n"
                          + "".join(f'  m.def("{f}", &{f}, "{f}");\n' for f in functions)
                          + "}\n")
        # No FMA contraction anywhere: the reference rounds every product and sum
        # separately (the source uses explicit _rn intrinsics as well; this keeps any
        # plain expression added later honest).
        return load(name=f"megatron_lite_{what}_{tag}", sources=[bindings, *sources],
                    # torch picks the C++ std
                    extra_cuda_cflags=["-O3", "--fmad=false"] + flags,
                    extra_include_paths=[_CSRC], build_directory=directory, verbose=False)


@functools.lru_cache(maxsize=None)
def _ext():
    """The codec extension (built once per source version and machine). codec.cu,
    two_shot.cu, one_shot_q.cu and the bindings are separate translation units, which
    ninja compiles in parallel (each .cu takes about a minute of one core)."""
    return _load("codec", _SOURCES, _FUNCTIONS)


@functools.lru_cache(maxsize=None)
def gemv_ext():
    """csrc/gemv.cu alone (kernels/gemv.py), so that a decode step without a quantized
    all-reduce does not wait for the codec kernels' build."""
    return _load("gemv", (os.path.join(_CSRC, "gemv.cu"),), ("ml_gemv",))


_QMAX = {KIND_ASYM: lambda bits: (1 << bits) - 1, KIND_SYM: lambda bits: (1 << (bits - 1)) - 1}
_BITS = {KIND_ASYM: (4, 5, 8), KIND_SYM: (4, 6, 8)}   # the widths codec.cu's dispatch builds


def serves(kc: KernelCodec) -> bool:
    """Whether these kernels have codec ``kc``: an integer group codec (symmetric at 8, 6 or
    4 bits, asymmetric at 8, 5 or 4) of group 64 or 128, on a real GPU (not the Triton
    interpreter)."""
    return (not INTERPRET and kc.kind in _BITS and kc.bits in _BITS[kc.kind]
            and kc.group in (64, 128) and kc.qmax == _QMAX[kc.kind](kc.bits))


def takes(kc: KernelCodec, *tensors: torch.Tensor) -> bool:
    """Whether these kernels serve codec ``kc`` on these (contiguous) tensors: ``serves``,
    and CUDA tensors with 16-byte aligned data."""
    return serves(kc) and all(t.is_cuda and t.data_ptr() % 16 == 0 for t in tensors)


def _check(err: int, what: str) -> None:
    if err:
        raise CudaCodecError(f"CUDA codec kernel {what} failed: cudaError {err}")


def _rot(kc: KernelCodec, rot: Optional[int]) -> float:
    """The rotation's scale fl32(1/sqrt(G)) (1.0 for none), checked as the Triton kernels
    check it."""
    check_rotation(kc, rot)
    return geometry(rot)[1]


def _whole_groups(kc: KernelCodec, n: int) -> None:
    # a thread decodes whole groups: a chunk of a partial group has no kernel here
    if n % kc.group:
        raise ValueError(f"chunk length {n} is not a multiple of the group size {kc.group}")


def _stream(t: torch.Tensor) -> int:
    # the raw handle, as Triton's launcher reads it: a Python Stream object costs
    # microseconds of host time per call (CUDA builds of torch only; never reached on CPU)
    return torch._C._cuda_getCurrentRawStream(t.get_device())


def quantize(kc: KernelCodec, x: torch.Tensor, rot: Optional[int] = None,
             scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``quant.quantize(kc, x, rot)``, bit for bit; with ``scale`` (fp32 [H], on x's
    device, H dividing x's length) the ``weighted-`` scaling first:
    ``codec.encode(fwht(fl32(x) * s[channel], rot))``, the channel of a value being its
    flat index mod H."""
    rs = _rot(kc, rot)
    if x.dtype not in _DTYPES:
        raise ValueError(f"input dtype {x.dtype}: expected bf16, fp16 or fp32")
    check_scale(scale, x.device, x.numel())
    x, out, rows, n, nb = quantize_buffers(kc, x)
    if out.numel() == 0:
        return out
    s_ptr, h = (scale.data_ptr(), scale.numel()) if scale is not None else (0, 1)
    _check(_ext().ml_codec_quantize(x.data_ptr(), out.data_ptr(), s_ptr, h, rows, n, nb,
                                    _DTYPES[x.dtype], kc.kind, kc.bits, kc.group,
                                    rot is not None, kc.c2, rs, _stream(x)), "quantize")
    return out


def dequantize(kc: KernelCodec, buf: torch.Tensor, n: int, out_dtype=torch.float32,
               sum_rows: bool = False, rot: Optional[int] = None) -> torch.Tensor:
    """``quant.dequantize``, bit for bit (same arguments and checks), for whole groups."""
    rs = _rot(kc, rot)
    if out_dtype not in _DTYPES:
        raise ValueError(f"output dtype {out_dtype}: expected bf16, fp16 or fp32")
    _whole_groups(kc, n)
    buf, out, outs, per = dequantize_buffers(kc, buf, n, out_dtype, sum_rows, rot)
    # output row o sums input rows o*per .. o*per + per - 1
    return _dequantize(kc, buf, out, outs, per, per, 1, n, rs, rot is not None)


def sum_ranks(kc: KernelCodec, gathered: torch.Tensor, n: int,
              rot: Optional[int] = None) -> torch.Tensor:
    """fp32 ``[J, n]``: ``out[j]`` = the in-order sum over ``r`` of ``decode(gathered[r,
    j])``, rotated back with ``rot``: the one-shot all-reduce's W dequantize-and-sums of
    a gathered ``[ranks, chunks, nbytes]`` buffer in one launch, the bits of
    ``dequantize(kc, gathered[:, j], n, sum_rows=True, rot=rot)`` for every ``j``."""
    rs = _rot(kc, rot)
    _whole_groups(kc, n)
    nb = kc.nbytes(n)
    if (gathered.dtype != torch.uint8 or gathered.dim() != 3 or gathered.shape[-1] != nb
            or gathered.shape[0] < 1):
        raise ValueError(f"expected [ranks, chunks, {nb}] uint8 bytes for {n} values, got "
                         f"{tuple(gathered.shape)} {gathered.dtype}")
    gathered = gathered.contiguous()
    ranks, chunks = gathered.shape[:2]
    out = torch.empty(chunks, n, dtype=torch.float32, device=gathered.device)
    return _dequantize(kc, gathered, out, chunks, ranks, 1, chunks, n, rs, rot is not None)


def _dequantize(kc, buf, out, outs, per, so, sr, n, rs, rot: bool) -> torch.Tensor:
    if out.numel() == 0:
        return out
    _check(_ext().ml_codec_dequantize(buf.data_ptr(), out.data_ptr(), outs, per, so, sr, n,
                                      kc.nbytes(n), _DTYPES[out.dtype], kc.kind, kc.bits,
                                      kc.group, rot, out_limit(out.dtype), rs, _stream(buf)),
           "dequantize")
    return out


def error_part(kc: KernelCodec, x: torch.Tensor, buf: torch.Tensor,
               rot: Optional[int] = None) -> torch.Tensor:
    """``quant.error_part``, bit for bit."""
    rs = _rot(kc, rot)
    if x.dtype not in _DTYPES:
        raise ValueError(f"input dtype {x.dtype}: expected bf16, fp16 or fp32")
    _whole_groups(kc, x.shape[-1])
    x, buf, out, rows, n, nb = error_buffers(kc, x, buf)
    if out.numel() == 0:
        return out
    _check(_ext().ml_codec_error(x.data_ptr(), buf.data_ptr(), out.data_ptr(), rows, n, nb,
                                 _DTYPES[x.dtype], kc.kind, kc.bits, kc.group, rot is not None,
                                 rs, _stream(x)), "error_part")
    return out


# Values per tile of the two-shot kernel: blocks of 128, 64 or 32 threads, 32 values each.
TWO_SHOT_TILES = (4096, 2048, 1024)


def takes_two_shot(plan: KernelPlan, x: torch.Tensor) -> bool:
    """Whether csrc/two_shot.cu runs ``plan`` on ``x``: a bf16 CUDA message of whole
    8-value chunks and a one-stage codec these kernels serve. Every rank decides alike
    (nothing here depends on the rank: an unaligned view is copied, not refused), as they
    must, since the ranks exchange that kernel's bytes."""
    return (plan.rs == plan.ag and serves(plan.rs) and x.is_cuda
            and x.dtype == torch.bfloat16 and x.numel() % 8 == 0)


class _Handle:
    """A prepared launch's handle in the extension's table (csrc/peers.cuh), released
    there when the last holder (``_HANDLES`` or a bound launch) drops it, so that the
    table holds the launches in use."""

    __slots__ = ("h", "_ext")

    def __init__(self, ext, h: int):
        self._ext, self.h = ext, h   # the extension kept alive while its handle is

    def __del__(self):
        try:
            self._ext.ml_release(self.h)
        except Exception:   # at interpreter exit the extension may be gone before it
            pass


# (extension, entry, arguments) -> _Handle of the most recently used HANDLE_CACHE_SIZE
# argument sets: each is prepared once while in use, however many bound launches ask for it
# (tests and the one-call functions below make a new launch per call); a process that sees
# every prompt length keeps at most these and the launches its backends and its router's
# runners hold (comm/fused.py, comm/router.py)
HANDLE_CACHE_SIZE = 1024
_HANDLES = LruDict(HANDLE_CACHE_SIZE)


def _prepare(entry: str, args: tuple) -> _Handle:
    """The handle of ``entry``'s launch with ``args`` bound (csrc/peers.cuh)."""
    ext = _ext()
    key = (id(ext), entry, args)
    got = _HANDLES.get(key)
    if got is None:
        h = getattr(ext, entry)(*args)
        if h < 0:
            raise CudaCodecError(f"CUDA codec kernel {entry} failed: cudaError {-h}")
        got = _HANDLES[key] = _Handle(ext, h)
    return got


def check_scale(scale: Optional[torch.Tensor], device: torch.device, n: int) -> None:
    """Raise unless ``scale`` (the ``weighted-`` channel scales; None: none) is 1-D fp32 on
    ``device`` and its length divides the message's ``n`` values."""
    if scale is not None and (scale.dtype != torch.float32 or scale.device != device
                              or scale.dim() != 1 or n % scale.numel()):
        raise ValueError("scale must be 1-D fp32 on the message's device and divide its length")


def _writable(t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` where the kernels can store 16-byte vectors into it (contiguous and aligned),
    else a temporary of ``like``'s shape."""
    if t.data_ptr() % 16 == 0 and t.is_contiguous():
        return t
    return torch.empty(like.shape, dtype=dtype, device=like.device)


class _BoundLaunch:
    """A prepared launch of the extension (from ``_prepare``: every argument but the data
    pointers and the stream bound in C++; ``_what`` names it in errors), so that an eager
    call converts five integers (``ml_launch``). ``_handles``: the launch without and with
    an error part (None where the kernel writes none, or until ``_prepare_handle`` makes
    it)."""

    _handles = (None, None)
    _what = None

    def _bind(self, entry: str, what: str, *args) -> None:
        self._handles, self._what = (_prepare(entry, args), None), what
        self._launch = _ext().ml_launch

    def _prepare_handle(self, with_error: bool) -> _Handle:
        raise ValueError(f"{self._what}: no launch {'with' if with_error else 'without'} an "
                         "error part")

    def fresh(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x, out)`` into a new ``out`` like ``x``, the eager call of the
        communicator's kernel backends (comm/fused.py): the output is allocated
        contiguous, and torch's allocators align it (512 B on CUDA, 64 B on the CPU), so
        only ``x`` is checked; the extension refuses a misaligned output with an error."""
        h = self._handles[0]
        if h is None:
            h = self._prepare_handle(False)
        x = x.contiguous()
        xp = x.data_ptr()
        if xp % 16:
            x = x.clone()
            xp = x.data_ptr()
        out = torch.empty_like(x)
        err = self._launch(h.h, xp, out.data_ptr(), 0, _stream(x))
        if err:
            _check(err, self._what)
        return out

    def __call__(self, x: torch.Tensor, out: torch.Tensor, err: Optional[torch.Tensor] = None):
        """Sum ``x`` (contiguous, of the bound length and dtype) into ``out`` (x's numel
        and dtype) and return ``out``; with ``err`` (fp32, x's numel) also write this rank's
        error part into it and return ``(out, err)``. The kernels move 16-byte vectors: a
        misaligned ``x`` is copied, and a temporary takes a result where ``out`` or ``err``
        is misaligned or not contiguous."""
        h = self._handles[err is not None]
        if h is None:
            h = self._prepare_handle(err is not None)
        if x.data_ptr() % 16:
            x = x.clone()
        dst = _writable(out, x, x.dtype)
        edst = None if err is None else _writable(err, x, torch.float32)
        _check(self._launch(h.h, x.data_ptr(), dst.data_ptr(),
                            edst.data_ptr() if edst is not None else 0, _stream(x)), self._what)
        if dst is not out:
            out.copy_(dst.view(out.shape))
        if err is None:
            return out
        if edst is not err:
            err.copy_(edst.view(err.shape))
        return out, err


class TwoShotLaunch(_BoundLaunch):
    """kernels/fused_allreduce.py's ``two_shot_all_reduce`` on csrc/two_shot.cu, for what
    ``takes_two_shot`` accepts, bound to one workspace, plan and message length ``n``
    with the geometry ``fused_allreduce.two_shot_plan`` chose over ``TWO_SHOT_TILES``:
    the same protocol over the same workspace (flags, epochs, slots), the same bits.
    Everything but the two data pointers and the stream is checked and converted once,
    here, so that a call costs one extension call (an eager caller's host time). The
    launch caps ``grid`` at the blocks the device holds at once (its blocks wait for
    their peers'; csrc/two_shot.cu says why)."""

    def __init__(self, ws, plan: KernelPlan, n: int, dtype: torch.dtype, tile: int,
                 chunk: int, tiles: int, grid: int, spin: int):
        kc, rot, scale, inv = plan.rs, plan.rot, plan.scale, plan.inv_scale
        if dtype != torch.bfloat16:   # the kernel's loads, stores and restore are bf16's
            raise ValueError(f"the two-shot kernel takes bf16 messages, not {dtype}")
        tb = kc.nbytes(tile)
        if tiles * tb > ws.layout.slot:
            raise ValueError(f"message of {n} values needs {tiles * tb} B per rank slot, "
                             f"workspace has {ws.layout.slot} B")
        check_scale(scale, ws.device, n)   # KernelPlan pairs inv with it, same length
        check_scale(inv, ws.device, n)
        lim = out_limit(dtype)
        lay = ws.layout
        self._scale = (scale, inv)               # bound by address: they must outlive the launch
        self._bind(
            "ml_two_shot_prepare", "two-shot all-reduce",
            ws.buffer_ptr, ws.counter_ptrs[1], ws.status_ptr, tuple(ws.deltas),
            scale.data_ptr() if scale is not None else 0,
            inv.data_ptr() if inv is not None else 0,
            n, chunk, tiles, tile, tb, lay.flag_off, lay.recv_off, lay.gather_off,
            lay.slot, ws.rank, ws.world, MAX_BLOCKS, kc.kind, kc.bits, kc.group,
            rot is not None, scale.numel() if scale is not None else 1, kc.c2,
            _rot(kc, rot),
            # mapped: decode as the fp32 reference does (bf16-range saturation), then the maps
            BF16_MAX if plan.mapped else lim, BF16_MAX if scale is not None else lim,
            spin, grid)


def two_shot_all_reduce(ws, x: torch.Tensor, plan: KernelPlan, out: torch.Tensor,
                        tile: int, chunk: int, tiles: int, grid: int, spin: int) -> torch.Tensor:
    """One call of :class:`TwoShotLaunch` (an ``out`` of another dtype, length or device
    gets a copy of the sum)."""
    x = x.contiguous()
    launch = TwoShotLaunch(ws, plan, x.numel(), x.dtype, tile, chunk, tiles, grid, spin)
    if out.dtype == x.dtype and out.numel() == x.numel() and out.device == x.device:
        return launch(x, out)
    return out.copy_(launch(x, torch.empty_like(x)).view(out.shape))


def takes_one_shot(x: torch.Tensor) -> bool:
    """Whether csrc/two_shot.cu's one-shot kernel runs ``x``: a CUDA message in bf16, fp16
    or fp32 on a real GPU (the interpreter runs the Triton kernel). Every rank decides
    alike."""
    return not INTERPRET and x.is_cuda and x.dtype in _DTYPES


class OneShotLaunch(_BoundLaunch):
    """kernels/fused_allreduce.py's ``one_shot_all_reduce`` on csrc/two_shot.cu, bound to
    one workspace, message length, dtype, block and grid: the same protocol over the same
    workspace (slots, parity, flags, the epochs of ``counters[0]``), the same grid and
    elements per block, the same bits. As :class:`TwoShotLaunch`, a call passes only the
    data pointers and the stream."""

    def __init__(self, ws, n: int, dtype: torch.dtype, block: int, grid: int, spin: int):
        lay = ws.layout
        self._bind("ml_one_shot_prepare", "one-shot all-reduce",
                   ws.buffer_ptr, ws.counter_ptrs[0], ws.status_ptr, tuple(ws.deltas), n,
                   block, lay.flag_off, lay.oneshot_off, lay.oneshot_slot, ws.rank, ws.world,
                   MAX_BLOCKS, _DTYPES[dtype], spin, grid)


def one_shot_all_reduce(ws, x: torch.Tensor, out: torch.Tensor, block: int, grid: int,
                        spin: int) -> torch.Tensor:
    """One call of :class:`OneShotLaunch`."""
    return OneShotLaunch(ws, x.numel(), x.dtype, block, grid, spin)(x, out)


class OneShotQLaunch(_BoundLaunch):
    """The one-shot algorithm's quantized all-reduce (comm/fused.py's
    ``one_shot_kernels_all_reduce``: quantize, all-gather, dequantize-and-sum, the
    scheme's finish and restore) in one launch of csrc/one_shot_q.cu's kernel, for
    what ``takes_two_shot`` accepts, bound to one workspace, plan and message length
    ``n``, with the two-shot kernel's tile geometry (``tile``, ``tiles``, ``grid``): each
    rank's codes go straight into every peer's ``recv`` slot, the same bits. A call
    ``launch(x, out)`` returns ``out``; ``launch(x, out, err)`` also writes this rank's
    error part (fp32, ``x``'s shape, as ``Scheme.own_error`` through the scheme's
    restore) into ``err`` and returns ``(out, err)``. Arguments are checked once, here."""

    def __init__(self, ws, plan: KernelPlan, n: int, tile: int, tiles: int, grid: int,
                 spin: int):
        kc, rot, scale, inv = plan.rs, plan.rot, plan.scale, plan.inv_scale
        if plan.ag != kc or not serves(kc):
            raise ValueError("the one-shot kernel takes a one-stage codec of codec.cu")
        if n % 8 or n < 1:
            raise ValueError(f"message of {n} values: whole 8-value chunks only")
        tb = kc.nbytes(tile)
        if tiles * tile < n or tiles * tb > ws.layout.slot:
            raise ValueError(f"message of {n} values needs {tiles * tb} B per rank slot, "
                             f"workspace has {ws.layout.slot} B")
        check_scale(scale, ws.device, n)   # KernelPlan pairs inv with it, same length
        check_scale(inv, ws.device, n)
        lay = ws.layout
        self._scale = (scale, inv)               # bound by address: they must outlive the launch
        self._args = (ws.buffer_ptr, ws.counter_ptrs[1], ws.status_ptr, tuple(ws.deltas),
                      scale.data_ptr() if scale is not None else 0,
                      inv.data_ptr() if inv is not None else 0, n, tiles, tile, tb,
                      lay.flag_off, lay.recv_off, lay.slot, ws.rank, ws.world, MAX_BLOCKS,
                      kc.kind, kc.bits, kc.group, rot is not None,
                      scale.numel() if scale is not None else 1, kc.c2, _rot(kc, rot))
        self._tail = (spin, grid)
        self._handles = [None, None]             # without, with the error part: on first use
        self._what = "one-shot quantized all-reduce"
        self._launch = _ext().ml_launch

    def _prepare_handle(self, with_error: bool) -> _Handle:
        h = self._handles[with_error] = _prepare(
            "ml_one_shot_q_prepare", self._args + (with_error,) + self._tail)
        return h
