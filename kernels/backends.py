"""Fused all-reduce backends for the chain of ``megatron_lite.comm.allreduce``, and ``auto``.

``install_fused(comm)`` (collective: every rank calls it at the same point) allocates one
symmetric workspace for a :class:`~megatron_lite.comm.allreduce.QuantizedCommunicator`
and puts :class:`AutoBackend` in front of its chain. ``auto`` picks, by message size:

* ``oneshot``  one-shot bf16 kernel (latency-bound decode messages; never quantized),
* ``nccl``     the base communicator's own all-reduce (uncompressed),
* ``fused``    the one-launch two-shot kernel with the site's codec,

from a threshold table measured per GPU kind and world size (``thresholds.py``, written
from ``tools/bench_allreduce.py --json``). Whatever auto cannot take (no P2P, a CPU
tensor, a codec without kernels such as outlier-int4, a message above the workspace)
falls through to the next backend, ultimately the portable two-step path.

``algo=one-shot`` sites skip ``auto`` (its kernels run the two-step algorithm) and are
served by :class:`OneShotKernelsBackend`: the reference one-shot algorithm with the Triton
quantize and dequantize-and-sum kernels around NCCL's all-gather (no workspace needed).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_lite.comm.allreduce import Backend

from . import fused_allreduce as fa
from . import quant
from .thresholds import thresholds_for
from .workspace import SymmWorkspace, WorkspaceUnavailable, cuda_workspace, shm_workspace

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def kernel_maps(codec, x: torch.Tensor):
    """``(group, scale, plain codec)`` for the message ``x``: a codec that is a fixed map
    around a plain codec (``hadamard-``: a rotation of ``group`` values; ``weighted-``:
    channel ``scale``) runs the plain codec's kernel between the maps of kernels/maps.py;
    any other codec is its own plain codec (``group`` and ``scale`` None)."""
    maps_of = getattr(codec, "kernel_maps", None)
    return maps_of(x) if maps_of is not None else (None, None, codec)


def plain_codec(codec):
    """The plain codec whose kernels serve ``codec`` (itself unless it is a mapped codec)."""
    return getattr(codec, "plain", codec)


def has_kernels(codec) -> Optional[str]:
    """None if both stages of ``codec`` (or of the plain codec it wraps) have Triton
    kernels, else the reason."""
    codec = plain_codec(codec)
    try:
        rs, ag = quant.kcodec(codec.rs), quant.kcodec(codec.ag)
    except (ValueError, AttributeError) as e:
        return str(e) if isinstance(e, ValueError) else f"no kernels for {codec!r}"
    groups = {k.group for k in (rs, ag) if k.kind != quant.KIND_BF16}
    return None if len(groups) <= 1 else "stages with different group sizes"


class FusedState:
    """The workspace of one communicator, or why there is none."""

    def __init__(self, ws: Optional[SymmWorkspace], why: Optional[str] = None):
        self.ws, self.why = ws, why

    def unsupported(self, x: torch.Tensor) -> Optional[str]:
        if self.ws is None:
            return self.why or "no symmetric workspace"
        if x.device != self.ws.device:
            return f"tensor on {x.device}, workspace on {self.ws.device}"
        if x.dtype not in _FLOATS:
            return f"dtype {x.dtype} is not bf16/fp16/fp32"
        return None


class OneShotBackend(Backend):
    """One-shot bf16/fp16/fp32 all-reduce (ignores the codec: full precision)."""

    name = "oneshot"

    def __init__(self, state: FusedState):
        self.state = state

    def unsupported(self, x, codec, comm):
        why = self.state.unsupported(x)
        if why is None and x.numel() * x.element_size() > self.state.ws.layout.oneshot_max_bytes:
            why = f"{x.numel() * x.element_size()} B > one-shot buffer"
        return why

    def all_reduce(self, x, codec, comm):
        return fa.one_shot_all_reduce(self.state.ws, x).view(x.shape)


class FusedTwoShotBackend(Backend):
    """The one-launch quantized two-shot kernel with the call's codec."""

    name = "fused"

    def __init__(self, state: FusedState):
        self.state = state

    def unsupported(self, x, codec, comm):
        why = self.state.unsupported(x)
        if why is None:
            why = has_kernels(codec)
        if why is None and x.numel() > self.state.ws.layout.max_elems:
            why = f"{x.numel()} values > workspace ({self.state.ws.layout.max_elems})"
        return why

    def all_reduce(self, x, codec, comm):
        group, scale, plain = kernel_maps(codec, x)   # maps run inside the kernel
        return fa.two_shot_all_reduce(self.state.ws, x, plain, rot=group,
                                      scale=scale).view(x.shape)


def one_shot_kernels_all_reduce(base, x: torch.Tensor, codec, with_error: bool = False):
    """``comm.allreduce.one_shot_all_reduce`` with the plain codec's encode and the
    decode-and-sum done by the Triton kernels of :mod:`quant` (bit-exact with the
    reference codec; the ``hadamard-`` rotation runs inside them, kernels/maps.py);
    chunking, the ``weighted-`` scaling and the saturations are the reference's own torch
    ops, so the result is the reference's bits. One quantize launch, one NCCL all-gather,
    W dequantize-and-sum launches.

    ``with_error``: also return this rank's error part, exactly as error feedback computes
    it (``comm.feedback.own_error`` of the one-shot algorithm, restored to ``x``'s layout,
    fp32): one more launch (:func:`quant.error_part`)."""
    from megatron_lite.comm.allreduce import GroupScheme, scheme_for
    from megatron_lite.comm.codecs import saturate
    if isinstance(codec, GroupScheme):   # a plain codec's scheme: take the codec
        codec = codec.codec
    scheme = scheme_for(codec)
    group, scale, plain = kernel_maps(codec, x)
    w = base.world_size
    chunks, restore = scheme.chunk(x, w)       # weighted-: already scaled (torch, exact)
    c = chunks.shape[-1]
    send = quant.quantize(plain, chunks, rot=group)          # [W, nb]; rotated in-kernel
    gathered = torch.empty((w,) + tuple(send.shape), dtype=torch.uint8, device=send.device)
    base.all_gather_into_tensor(gathered.view(-1), send.view(-1))
    acc = torch.stack([quant.dequantize(plain, gathered[:, j], c, torch.float32,
                                        sum_rows=True, rot=group)     # rank order, then
                       for j in range(w)])                           # rotated back
    if group:   # scheme.finish after its rotation: saturate (fp32 for weighted-, unscaled next)
        y = restore(saturate(acc, torch.float32 if scale is not None else x.dtype))
    else:
        y = restore(scheme.finish(acc, x.dtype))
    if not with_error:
        return y
    return y, restore(quant.error_part(plain, chunks, send, rot=group)).float()


class OneShotKernelsBackend(Backend):
    """``algo=one-shot`` through :func:`one_shot_kernels_all_reduce` (CUDA tensors; CPU
    ones under ``TRITON_INTERPRET=1`` for tests). ``path=two-step`` keeps the portable
    path."""

    name = "one-shot-kernels"

    def unsupported(self, x, codec, comm):
        cfg = getattr(comm, "config", None)
        if getattr(cfg, "algo", "two-step") != "one-shot":
            return "only for algo=one-shot"
        if getattr(cfg, "path", "auto") == "two-step":
            return "path=two-step"
        if not (x.is_cuda or quant.INTERPRET):
            return "not a CUDA tensor"
        if x.dtype not in _FLOATS:
            return f"dtype {x.dtype}"
        return has_kernels(codec)

    def all_reduce(self, x, codec, comm):
        return one_shot_kernels_all_reduce(comm.base, x, codec)

    def all_reduce_with_error(self, x, codec, comm):
        """``(sum, this rank's error part)`` for error feedback (comm/feedback.py)."""
        return one_shot_kernels_all_reduce(comm.base, x, codec, with_error=True)


class AutoBackend(Backend):
    """Size-based choice among one-shot bf16, NCCL and the fused quantized kernel."""

    name = "auto"

    def __init__(self, state: FusedState, table: Optional[Dict] = None):
        self.state = state
        self.oneshot = OneShotBackend(state)
        self.fused = FusedTwoShotBackend(state)
        self.table = table

    def _table(self) -> Dict:
        if self.table is None:
            ws = self.state.ws
            name = torch.cuda.get_device_name(ws.device) if ws.device.type == "cuda" else "cpu"
            self.table = thresholds_for(name, ws.world)
        return self.table

    def choose(self, x: torch.Tensor, codec, comm=None) -> str:
        """``oneshot`` / ``fused`` / ``nccl`` (uncompressed) or ``two-step`` (step aside
        for the portable path), from the message size and ``comm.config.path``."""
        cfg = getattr(comm, "config", None)
        path = getattr(cfg, "path", "auto")
        if path == "two-step" or getattr(cfg, "algo", "two-step") != "two-step":
            return "two-step"   # the kernels run the two-step algorithm only
        if path == "fused":
            return "fused" if self.fused.unsupported(x, codec, None) is None else "two-step"
        nbytes = x.numel() * x.element_size()
        tab = self._table()
        if nbytes <= tab["oneshot_max"] and self.oneshot.unsupported(x, codec, None) is None:
            return "oneshot"
        cname = getattr(codec, "name", "")
        fmin = tab["fused_min"].get(cname, tab["fused_min"].get("*"))
        if fmin is not None and nbytes >= fmin and self.fused.unsupported(x, codec, None) is None:
            return "fused"
        return "nccl"

    def unsupported(self, x, codec, comm):
        why = self.state.unsupported(x)
        if why is not None:
            return why
        which = self.choose(x, codec, comm)
        if which == "two-step":
            path, algo = comm.config.path, comm.config.algo
            if algo != "two-step":
                return (f"algo={algo}: no fused kernel (the one-shot kernels or the "
                        "portable path run it)")
            return (f"path={path}" if path == "two-step" else
                    f"path={path}: {self.fused.unsupported(x, codec, None)}")
        if which == "nccl" and has_kernels(codec) is not None:
            # A codec without kernels (outlier-int4) keeps its quantized two-step path.
            return has_kernels(codec)
        return None

    def all_reduce(self, x, codec, comm):
        which = self.choose(x, codec, comm)
        if which == "oneshot":
            return self.oneshot.all_reduce(x, codec, comm)
        if which == "fused":
            return self.fused.all_reduce(x, codec, comm)
        return comm.base.all_reduce(x)


def make_state(group=None, max_bytes: int = 128 << 20, oneshot_max_bytes: int = 1 << 20,
               device: Optional[torch.device] = None, cpu_shm: bool = False) -> FusedState:
    """Allocate the workspace over ``group`` (collective). ``cpu_shm`` builds the /dev/shm
    stand-in for tests on CPU (kernels then need TRITON_INTERPRET=1)."""
    try:
        if cpu_shm:
            return FusedState(shm_workspace(group, max_bytes, oneshot_max_bytes))
        return FusedState(cuda_workspace(group, max_bytes, oneshot_max_bytes, device))
    except WorkspaceUnavailable as e:
        return FusedState(None, str(e))


def install_fused(comm, max_bytes: int = 128 << 20, oneshot_max_bytes: int = 1 << 20,
                  table: Optional[Dict] = None, cpu_shm: bool = False):
    """Put :class:`AutoBackend` in front of ``comm``'s backend chain (collective), and
    :class:`OneShotKernelsBackend` right behind it.

    ``comm`` is a QuantizedCommunicator whose base wraps a torch.distributed group. On a
    machine without P2P the workspace is absent and ``auto`` steps aside (its reason
    shows in ``comm.explain``). Returns the AutoBackend."""
    group = getattr(comm, "process_group", None)
    if not dist.is_initialized():
        state = FusedState(None, "torch.distributed is not initialized")
    elif not cpu_shm and dist.get_backend(group) != "nccl":
        state = FusedState(None, f"process group backend is {dist.get_backend(group)}, not nccl")
    else:
        state = make_state(group, max_bytes, oneshot_max_bytes, cpu_shm=cpu_shm)
    auto = AutoBackend(state, table)
    # after auto, before the portable path; once, however often auto is reinstalled
    comm.backends = [b for b in comm.backends if not isinstance(b, OneShotKernelsBackend)]
    comm.add_backend(OneShotKernelsBackend(), first=True)
    comm.add_backend(auto, first=True)
    return auto
