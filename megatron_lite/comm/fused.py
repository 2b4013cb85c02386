"""The kernel backends of the communicator chain (comm/router.py), over megatron_lite.kernels.

``install_fused(comm)`` (collective: every rank calls it at the same point) allocates one
symmetric workspace for a QuantizedCommunicator and puts, in front of its chain:

* :class:`AutoBackend`, which picks by message size from the ``nvlink`` threshold table
  measured per GPU kind and world size (kernels/thresholds.py):

  - ``oneshot``  the one-shot bf16 kernel (latency-bound decode messages; never quantized),
  - ``nccl``     the base communicator's own all-reduce (uncompressed),
  - ``fused``    the one-launch two-shot kernel with the site's scheme;

* :class:`OneShotKernelsBackend` for ``algo=one-shot``, which also returns each rank's
  error part for error feedback: for a bf16 message and a codec of the CUDA codec
  kernels, one launch over the workspace (kernels/csrc/one_shot_q.cu:
  each rank's codes go straight into its peers' slots); otherwise the reference one-shot
  algorithm with the quantize and dequantize-and-sum codec kernels around NCCL's
  all-gather (no workspace needed).

Whatever they cannot take (no P2P, a CPU tensor, a scheme without a kernel plan such as
outlier-int4 or klt, a message above the workspace) falls through to the portable path
(an ``auto`` site: to the base communicator's own all-reduce). On a transport other than
``nvlink`` (comm/transport.py: no peer access, or the ``--transport`` emulation's NCCL
variables) no workspace is made, so the fused kernels never run where a real machine of
that transport could not run them.
Every path gives the reference's bits (tests/test_kernels_interpret.py, tests/gpu/).

Both one-shot paths (``auto`` -> ``oneshot``, and ``one-shot-kernels``) also run
``all_reduce_add_rmsnorm`` as one kernel over the workspace
(kernels/allreduce_norm.py: the same sum, then the residual add and RMSNorm) where the
message fits it; the two-shot and NCCL choices keep the unfused path.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_lite.comm.algorithms import Algo, in_pieces, pieces
from megatron_lite.comm.codecs import NoKernelError, Scheme, saturate
from megatron_lite.comm.router import Backend, QuantizedCommunicator
from megatron_lite.comm.spec import Path
from megatron_lite.comm.transport import Transport
from megatron_lite.kernels.config import INTERPRET, KernelPlan
from megatron_lite.lru import LruDict

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)

# Prepared launches kept per backend (megatron_lite/lru.py): the kinds of message in use;
# one forgotten is prepared again on its next call.
LAUNCH_CACHE_SIZE = 1024


def kernel_plan(scheme: Scheme, x: torch.Tensor) -> Optional[KernelPlan]:
    """The scheme's kernel plan for ``x``, or None where it has none."""
    try:
        return scheme.kernel_plan(x)
    except NoKernelError:
        return None


def no_kernel(scheme: Scheme, x: torch.Tensor) -> Optional[str]:
    """None if the scheme has a kernel plan for ``x``, else the reason."""
    try:
        scheme.kernel_plan(x)
    except NoKernelError as e:
        return str(e)
    return None


class FusedState:
    """The workspace of one communicator, or why there is none."""

    def __init__(self, ws=None, why: Optional[str] = None):
        self.ws, self.why = ws, why

    def unsupported(self, x: torch.Tensor) -> Optional[str]:
        if self.ws is None:
            return self.why or "no symmetric workspace"
        if x.device != self.ws.device:
            return f"tensor on {x.device}, workspace on {self.ws.device}"
        if x.dtype not in _FLOATS:
            return f"dtype {x.dtype} is not bf16/fp16/fp32"
        return None

    def add_rmsnorm_unsupported(self, x: torch.Tensor, plan: Optional[KernelPlan]
                                ) -> Optional[str]:
        """None if the fused all-reduce + add + RMSNorm kernel takes ``x`` (raw with
        ``plan`` None, else with the plan's codec)."""
        why = self.unsupported(x)
        if why is None:
            from megatron_lite.kernels import allreduce_norm
            why = allreduce_norm.unsupported(self.ws, x, plan)
        return why

    def all_reduce_add_rmsnorm(self, x, plan, residual, norm_weight, eps, **norm):
        """The fused kernel's ``(residual', normed)``, or None where the call's residual
        or weights do not fit it (the caller then takes the unfused path)."""
        from megatron_lite.kernels import allreduce_norm
        if allreduce_norm.check_args(x, residual, norm_weight, norm.get("post_norm_weight"),
                                     norm.get("bias")) is not None:
            return None
        return allreduce_norm.all_reduce_add_rmsnorm(self.ws, x, residual, norm_weight, eps,
                                                     plan=plan, **norm)


def _fa():
    """kernels/fused_allreduce.py, imported where a launch is first prepared (it imports
    triton), not on every call."""
    from megatron_lite.kernels import fused_allreduce
    return fused_allreduce


class Launchers:
    """A backend's prepared launches, one per kind of message: ``(shape, dtype, scheme)``
    -> a callable that sums such a message (kernels/fused_allreduce.py's
    ``*_launcher``). The plan's checks, the kernel's geometry and its arguments are
    worked out on a kind's first call, so a later eager call allocates the output and
    launches. A backend serves one workspace, hence one device, and a scheme lives as
    long as its communicator (held here, so its id is never reused). The most recently
    used ``LAUNCH_CACHE_SIZE`` kinds are kept: a process that sees every prompt length
    does not keep a launch for each."""

    def __init__(self):
        self._runs = LruDict(LAUNCH_CACHE_SIZE)

    def get(self, x: torch.Tensor, scheme: Optional[Scheme], make):
        key = (x.shape, x.dtype, id(scheme))
        got = self._runs.get(key)
        if got is None:
            got = self._runs[key] = (scheme, make())
        return got[1]


class OneShotBackend(Backend):
    """One-shot bf16/fp16/fp32 all-reduce (ignores the scheme: full precision)."""

    name = "oneshot"
    uses_kernels = True

    def __init__(self, state: FusedState):
        self.state = state
        self.launchers = Launchers()

    def unsupported(self, x, scheme, comm):
        why = self.state.unsupported(x)
        if why is None and x.numel() * x.element_size() > self.state.ws.layout.oneshot_max_bytes:
            why = f"{x.numel() * x.element_size()} B > one-shot buffer"
        return why

    def launcher(self, x: torch.Tensor):
        """The prepared one-shot launch of messages like ``x`` (see ``Launchers``)."""
        return self.launchers.get(x, None, lambda: _fa().one_shot_launcher(self.state.ws, x))

    def runner(self, x, scheme, comm):
        return self.launcher(x)

    def all_reduce(self, x, scheme, comm):
        return self.launcher(x)(x)


class FusedTwoShotBackend(Backend):
    """The one-launch quantized two-shot kernel with the call's scheme (its maps folded in)."""

    name = "fused"
    uses_kernels = True

    def __init__(self, state: FusedState):
        self.state = state
        self.launchers = Launchers()

    def unsupported(self, x, scheme, comm):
        why = self.state.unsupported(x)
        if why is None:
            why = no_kernel(scheme, x)
        if why is None and x.numel() > self.state.ws.layout.max_elems:
            why = f"{x.numel()} values > workspace ({self.state.ws.layout.max_elems})"
        return why

    def launcher(self, x: torch.Tensor, scheme: Scheme):
        """The prepared two-shot launch of messages like ``x`` with ``scheme``."""
        return self.launchers.get(x, scheme, lambda: _fa().two_shot_launcher(
            self.state.ws, x, scheme.kernel_plan(x)))

    def runner(self, x, scheme, comm):
        return self.launcher(x, scheme)

    def all_reduce(self, x, scheme, comm):
        return self.launcher(x, scheme)(x)


def one_shot_kernels_all_reduce(base, x: torch.Tensor, scheme: Scheme, with_error: bool = False,
                                chunk_bytes: int = 0):
    """comm/algorithms.py's one-shot algorithm with the plain codec's encode and the
    decode-and-sum done by the codec kernels (kernels/codec.py: CUDA C++ for int8/int4,
    Triton otherwise; bit-exact with the reference codec; the ``hadamard-`` rotation runs
    inside them); chunking, the ``weighted-`` scaling and the saturations are the
    reference's own torch ops, so the result is the reference's bits. One quantize
    launch, one NCCL all-gather, one dequantize-and-sum launch (W of them on the Triton
    kernels).

    ``with_error``: also return this rank's error part, exactly as ``Scheme.own_error``
    computes it for the one-shot algorithm, restored to ``x``'s layout, fp32 (one more
    launch, ``error_part``). ``chunk_bytes``: in pieces of whole groups, each all-gather
    started before the next piece is quantized, as comm/algorithms.py's chunked one-shot
    (the same bits)."""
    from megatron_lite.kernels import codec as kc_ops
    plan = scheme.kernel_plan(x)
    w = base.world_size
    chunks, restore = scheme.chunk(x, w)       # weighted-: already scaled (torch, exact)
    cuts = pieces(scheme, chunks.shape[-1], x.numel() * x.element_size(), chunk_bytes)
    started = []
    for a, b in cuts:
        send = kc_ops.quantize(plan.rs, chunks[:, a:b], rot=plan.rot)  # [W, nb]; rotated
        got = torch.empty((w,) + tuple(send.shape), dtype=torch.uint8, device=send.device)
        started.append((send, got, base.all_gather_into_tensor_async(got.view(-1),
                                                                     send.view(-1))))
    accs, errs = [], []
    for (a, b), (send, got, work) in zip(cuts, started):
        work.wait()
        accs.append(kc_ops.sum_ranks(plan.rs, got, b - a, rot=plan.rot))  # rank order
        if with_error:
            errs.append(kc_ops.error_part(plan.rs, chunks[:, a:b], send, rot=plan.rot))
    acc = accs[0] if len(cuts) == 1 else torch.cat(accs, dim=-1)
    if plan.rot:
        # the kernel rotated back already: the scheme's finish without its rotation
        # (fp32 for weighted-, whose restore unscales, then rounds)
        y = restore(saturate(acc, torch.float32 if plan.scale is not None else x.dtype))
    else:
        y = restore(scheme.finish(acc, x.dtype))
    if not with_error:
        return y
    return y, restore(errs[0] if len(cuts) == 1 else torch.cat(errs, dim=-1)).float()


class OneShotKernelsBackend(Backend):
    """``algo=one-shot``: one launch over the workspace where
    ``fused_allreduce.one_shot_q_launcher`` takes the message, else
    :func:`one_shot_kernels_all_reduce` (CUDA tensors; CPU ones under
    ``TRITON_INTERPRET=1`` for tests); the same bits either way. ``path=two-step`` keeps
    the portable path."""

    name = "one-shot-kernels"
    uses_kernels = True
    returns_error = True

    def __init__(self, state: Optional[FusedState] = None):
        # with a workspace, the sum (and its error part) is one launch where the codec and
        # message fit it, and the fused add + RMSNorm runs; without one, the codec
        # kernels around NCCL's all-gather
        self.state = state if state is not None else FusedState(None, "no workspace given")
        self.fuses_add_rmsnorm = self.state.ws is not None
        self.launchers = Launchers()

    def launcher(self, x: torch.Tensor, scheme: Scheme):
        """The prepared one-launch kernel for messages like ``x`` with ``scheme``
        (kernels/fused_allreduce.py's ``one_shot_q_launcher``), or None."""
        if self.state.unsupported(x) is not None:
            return None
        return self.launchers.get(x, scheme, lambda: _fa().one_shot_q_launcher(
            self.state.ws, x, scheme.kernel_plan(x)))

    def unsupported(self, x, scheme, comm):
        if comm.spec.algo != Algo.ONE_SHOT:
            return "only for algo=one-shot"
        if comm.spec.path == Path.TWO_STEP:
            return "path=two-step"
        if not (x.is_cuda or INTERPRET):
            return "not a CUDA tensor"
        if x.dtype not in _FLOATS:
            return f"dtype {x.dtype}"
        return no_kernel(scheme, x)

    def runner(self, x, scheme, comm):
        launch = self.launcher(x, scheme)
        if launch is not None:
            return launch.fresh
        return super().runner(x, scheme, comm)

    def all_reduce(self, x, scheme, comm):
        launch = self.launcher(x, scheme)
        if launch is not None:   # the same bits in one launch (``chunk=`` has no use there)
            return launch.fresh(x)
        return one_shot_kernels_all_reduce(comm.base, x, scheme,
                                           chunk_bytes=comm.spec.chunk_bytes)

    def all_reduce_with_error(self, x, scheme, comm):
        """``(sum, this rank's error part)`` for error feedback (comm/feedback.py)."""
        launch = self.launcher(x, scheme)
        if launch is not None:
            x = x.contiguous()
            return launch(x, torch.empty_like(x),
                          torch.empty(x.shape, dtype=torch.float32, device=x.device))
        return one_shot_kernels_all_reduce(comm.base, x, scheme, with_error=True,
                                           chunk_bytes=comm.spec.chunk_bytes)

    def describe(self, x, scheme, comm):
        if self.launcher(x, scheme) is not None:
            return self.name + " (one launch over the workspace)"
        return self.name + in_pieces(x, scheme, comm.spec.chunk_bytes)

    def add_rmsnorm_unsupported(self, x, scheme, comm):
        return self.state.add_rmsnorm_unsupported(x, kernel_plan(scheme, x))

    def all_reduce_add_rmsnorm(self, x, scheme, comm, residual, norm_weight, eps, **norm):
        # P2P one-shot over the workspace: each rank's codes go straight to its peers
        # instead of through NCCL's all-gather; the same codes and sum
        return self.state.all_reduce_add_rmsnorm(x, scheme.kernel_plan(x), residual,
                                                 norm_weight, eps, **norm)


class AutoBackend(Backend):
    """Size-based choice among one-shot bf16, NCCL and the fused quantized kernel."""

    name = "auto"
    uses_kernels = True
    serves_auto = True        # with bf16 (the auto keyword's scheme) it never quantizes

    def __init__(self, state: FusedState, table: Optional[Dict] = None):
        self.state = state
        self.oneshot = OneShotBackend(state)
        self.fused = FusedTwoShotBackend(state)
        self.table = table
        self.fuses_add_rmsnorm = state.ws is not None
        self.launchers = Launchers()

    def _table(self) -> Dict:
        if self.table is None:
            from megatron_lite.kernels.thresholds import thresholds_for
            ws = self.state.ws
            name = torch.cuda.get_device_name(ws.device) if ws.device.type == "cuda" else "cpu"
            self.table = thresholds_for(name, ws.world)
        return self.table

    def choose(self, x: torch.Tensor, scheme: Scheme, comm) -> str:
        """``oneshot`` / ``fused`` / ``nccl`` (uncompressed) or ``portable`` (step aside
        for the portable path), from the message size and the spec's path."""
        spec = comm.spec
        if spec.path == Path.TWO_STEP or spec.algo != Algo.TWO_STEP:
            return "portable"   # the kernels run the two-step algorithm only
        if spec.path == Path.FUSED:
            return "fused" if self.fused.unsupported(x, scheme, None) is None else "portable"
        nbytes = x.numel() * x.element_size()
        tab = self._table()
        if nbytes <= tab["oneshot_max"] and self.oneshot.unsupported(x, scheme, None) is None:
            return "oneshot"
        fmin = tab["fused_min"].get(scheme.name, tab["fused_min"].get("*"))
        if fmin is not None and nbytes >= fmin and self.fused.unsupported(x, scheme, None) is None:
            return "fused"
        return "nccl"

    def unsupported(self, x, scheme, comm):
        why = self.state.unsupported(x)
        if why is not None:
            return why
        which = self.choose(x, scheme, comm)
        if which == "portable":
            path, algo = comm.spec.path, comm.spec.algo
            if algo != Algo.TWO_STEP:
                return (f"algo={algo.value}: no fused kernel (the one-shot kernels or the "
                        "portable path run it)")
            return (f"path={path.value}" if path == Path.TWO_STEP else
                    f"path={path.value}: {self.fused.unsupported(x, scheme, None)}")
        if which == "nccl" and no_kernel(scheme, x) is not None:
            # A scheme without kernels (outlier-int4) keeps its quantized two-step path.
            return no_kernel(scheme, x)
        return None

    def describe(self, x, scheme, comm) -> str:
        return f"auto -> {self.choose(x, scheme, comm)}"

    def add_rmsnorm_unsupported(self, x, scheme, comm):
        which = self.choose(x, scheme, comm)
        if which != "oneshot":
            return f"auto -> {which}: the fused add + RMSNorm follows the one-shot sum only"
        return self.state.add_rmsnorm_unsupported(x, None)

    def all_reduce_add_rmsnorm(self, x, scheme, comm, residual, norm_weight, eps, **norm):
        # the one-shot kernel's raw fp32 rank-order sum (full precision, as ``oneshot``)
        return self.state.all_reduce_add_rmsnorm(x, None, residual, norm_weight, eps, **norm)

    def runner(self, x, scheme, comm):
        # the choice depends on the message's size, dtype and the spec alone: made once
        return self.launchers.get(x, scheme, lambda: self._launcher(x, scheme, comm))

    def all_reduce(self, x, scheme, comm):
        return self.runner(x, scheme, comm)(x)

    def _launcher(self, x, scheme, comm):
        which = self.choose(x, scheme, comm)
        if which == "oneshot":
            return self.oneshot.launcher(x)
        if which == "fused":
            return self.fused.launcher(x, scheme)
        return comm.base.all_reduce


def make_state(group=None, max_bytes: int = 128 << 20, oneshot_max_bytes: int = 1 << 20,
               device: Optional[torch.device] = None, cpu_shm: bool = False) -> FusedState:
    """Allocate the workspace over ``group`` (collective). ``cpu_shm`` builds the /dev/shm
    stand-in for tests on CPU (kernels then need TRITON_INTERPRET=1)."""
    from megatron_lite.kernels.workspace import (WorkspaceUnavailable, cuda_workspace,
                                                 shm_workspace)
    try:
        if cpu_shm:
            return FusedState(shm_workspace(group, max_bytes, oneshot_max_bytes))
        return FusedState(cuda_workspace(group, max_bytes, oneshot_max_bytes, device))
    except WorkspaceUnavailable as e:
        return FusedState(None, str(e))


def install_fused(comm: QuantizedCommunicator, max_bytes: int = 128 << 20,
                  oneshot_max_bytes: int = 1 << 20, table: Optional[Dict] = None,
                  cpu_shm: bool = False, one_rank: bool = False) -> AutoBackend:
    """Put :class:`AutoBackend` in front of ``comm``'s backend chain (collective), and
    :class:`OneShotKernelsBackend` right behind it; replaces any kernel backends the
    chain had. On a machine without P2P the workspace is absent and ``auto`` steps aside
    (its reason shows in ``comm.explain``). ``one_rank``: a one-rank NCCL group gets a
    workspace too (no peer to reach; ``tools/bench_allreduce.py --host-overhead`` times the
    kernels' launch path on one GPU with it; serving at TP 1 never sums, so it makes
    none). Returns the AutoBackend."""
    group = comm.process_group
    if not dist.is_initialized():
        state = FusedState(None, "torch.distributed is not initialized")
    elif not cpu_shm and dist.get_backend(group) != "nccl":
        state = FusedState(None, f"process group backend is {dist.get_backend(group)}, not nccl")
    elif (not cpu_shm and comm.transport.transport != Transport.NVLINK
          and not (one_rank and comm.world_size == 1)):
        state = FusedState(None, f"transport {comm.transport}: the fused kernels need peer "
                                 "access")
    else:
        state = make_state(group, max_bytes, oneshot_max_bytes, cpu_shm=cpu_shm)
    auto = AutoBackend(state, table)
    rest = [b for b in comm.backends if not b.uses_kernels]
    comm.set_backends([auto, OneShotKernelsBackend(state)] + rest)
    return auto


def install_fused_on_nccl(comm: QuantizedCommunicator, max_bytes: int = 128 << 20) -> None:
    """``install_fused`` when the base is an NCCL group and triton is importable (the
    chain stays portable otherwise). Collective: every rank builds its communicator at
    the same point."""
    if not comm.base.torch_distributed or not dist.is_initialized():
        return
    if dist.get_backend(comm.base.process_group) != "nccl":
        return
    if importlib.util.find_spec("triton") is None:
        return
    install_fused(comm, max_bytes=max_bytes)
