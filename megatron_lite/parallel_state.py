"""Tensor-parallel state: the TP group every layer is handed explicitly.

``initialize_model_parallel()`` reads the torchrun environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), joins a process group (NCCL with CUDA, gloo
otherwise; ``backend=`` or ``MEGATRON_LITE_BACKEND`` override) and makes every rank one TP
group. Without a torchrun environment it is a single rank with no process group at all.
If the caller already initialised torch.distributed (e.g. the test harness), that default
group is used as is. The group's communicator detects its transport there (NVLink/P2P,
host memory or network: comm/transport.py), collectively on NCCL.

``TPGroup`` forwards the two collectives the model uses to a Communicator (plain
torch.distributed, a quantized one, or ``ThreadCommunicator`` simulating N ranks in one
process). Contract (docs/architecture.md): after ``all_reduce`` all ranks hold
bitwise-identical tensors.
"""
from __future__ import annotations

import itertools
import os
import weakref
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from megatron_lite.comm.communicator import Communicator, DistCommunicator
from megatron_lite.comm.norm import Layout, add_rmsnorm

BACKEND_ENV = "MEGATRON_LITE_BACKEND"

# Under torch.compile the collectives are custom ops (``megatron_lite::all_reduce`` and
# ``::all_gather``): one graph covers the whole decode step, so inductor fuses the
# elementwise work on both sides of a collective, and the op itself is opaque. The op
# carries only the group's number; its implementation looks the group up here and calls
# the communicator, so the communicator's Python state (codec plans, kernel workspaces and
# their epochs, error-feedback debts) is never traced or guarded on. Eagerly, TPGroup
# calls the communicator directly (no dispatcher hop on the host path).
_GROUPS: "weakref.WeakValueDictionary[int, TPGroup]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


@torch.library.custom_op("megatron_lite::all_reduce", mutates_args=())
def _all_reduce_op(x: torch.Tensor, group_id: int, site: str) -> torch.Tensor:
    y = _GROUPS[group_id].communicator.all_reduce(x, site or None)
    return y.clone() if y is x else y          # a custom op's output must not alias


@_all_reduce_op.register_fake
def _(x, group_id, site):
    return torch.empty_like(x)


@torch.library.custom_op("megatron_lite::all_gather", mutates_args=())
def _all_gather_op(x: torch.Tensor, group_id: int, dim: int) -> torch.Tensor:
    y = _GROUPS[group_id].communicator.all_gather(x, dim)
    return y.clone() if y is x else y


@_all_gather_op.register_fake
def _(x, group_id, dim):
    shape = list(x.shape)
    shape[dim] *= _GROUPS[group_id].world_size
    return x.new_empty(shape)


# The sum with the residual add and RMSNorm, for communicators that may run it as one
# kernel. ``normed`` comes back empty where no norm weight is given (the op's outputs are
# always two tensors).
@torch.library.custom_op("megatron_lite::all_reduce_add_rmsnorm", mutates_args=())
def _all_reduce_add_rmsnorm_op(partial: torch.Tensor, residual: torch.Tensor,
                               norm_weight: Optional[torch.Tensor],
                               post_norm_weight: Optional[torch.Tensor],
                               bias: Optional[torch.Tensor], group_id: int, site: str,
                               eps: float, offset: float, scale_in_fp32: bool, layout: str
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    new, normed = _GROUPS[group_id].communicator.all_reduce_add_rmsnorm(
        partial, residual, norm_weight, eps, site or None, layout=Layout(layout),
        post_norm_weight=post_norm_weight, offset=offset, scale_in_fp32=scale_in_fp32,
        bias=bias)
    return new, (normed if normed is not None else new.new_empty(0))


@_all_reduce_add_rmsnorm_op.register_fake
def _(partial, residual, norm_weight, post_norm_weight, bias, group_id, site, eps, offset,
      scale_in_fp32, layout):
    return (torch.empty_like(residual),
            torch.empty_like(residual) if norm_weight is not None else residual.new_empty(0))


class TPGroup:
    """One rank's handle on its tensor-parallel group.

    ``all_reduce(x, site)`` is the only TP sum in the model (called through
    ``reduce_from_tensor_model_parallel_region``); ``site`` names the layer whose partial
    sums are reduced, so the communicator can apply per-layer comm settings.
    """

    def __init__(self, communicator: Communicator, process_group=None):
        self.communicator = communicator
        self.process_group = process_group
        self.group_id = next(_NEXT_ID)
        _GROUPS[self.group_id] = self

    @classmethod
    def from_communicator(cls, comm: Communicator) -> "TPGroup":
        return cls(comm, getattr(comm, "process_group", None))

    @property
    def rank(self) -> int:
        return self.communicator.rank

    @property
    def world_size(self) -> int:
        return self.communicator.world_size

    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        """Sum of ``x`` over the group (a new tensor; ``x`` itself at world size 1)."""
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return torch.ops.megatron_lite.all_reduce(x, self.group_id, site or "")
        return self.communicator.all_reduce(x, site)

    def all_reduce_add_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor,
                               norm_weight: Optional[torch.Tensor], eps: float,
                               site: Optional[str] = None, *, layout: Layout = Layout.PRE_NORM,
                               post_norm_weight: Optional[torch.Tensor] = None,
                               offset: float = 0.0, scale_in_fp32: bool = False,
                               bias: Optional[torch.Tensor] = None):
        """``(residual', normed)`` of comm/norm.py for the sum of ``partial`` over the
        group (``Communicator.all_reduce_add_rmsnorm``). Under torch.compile it is one
        opaque op only where the communicator may fuse it; elsewhere the all-reduce op
        and the traced torch ops, which inductor fuses with their neighbours."""
        norm = dict(layout=layout, post_norm_weight=post_norm_weight, offset=offset,
                    scale_in_fp32=scale_in_fp32, bias=bias)
        if self.world_size == 1:
            return add_rmsnorm(partial, residual, norm_weight, eps, **norm)
        if torch.compiler.is_compiling():
            if not self.communicator.fuses_add_rmsnorm:
                return add_rmsnorm(self.all_reduce(partial, site), residual, norm_weight, eps,
                                   **norm)
            new, normed = torch.ops.megatron_lite.all_reduce_add_rmsnorm(
                partial, residual, norm_weight, post_norm_weight, bias, self.group_id,
                site or "", eps, offset, scale_in_fp32, Layout(layout).value)
            return new, (normed if norm_weight is not None else None)
        return self.communicator.all_reduce_add_rmsnorm(partial, residual, norm_weight, eps,
                                                        site, **norm)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenation of every rank's ``x`` along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return torch.ops.megatron_lite.all_gather(x, self.group_id, dim % x.dim())
        return self.communicator.all_gather(x, dim)

    def barrier(self) -> None:
        if self.world_size > 1:
            self.communicator.barrier()

    def __repr__(self) -> str:
        return (f"TPGroup(rank={self.rank}, world_size={self.world_size}, "
                f"communicator={type(self.communicator).__name__})")


_TP_GROUP: Optional[TPGroup] = None
_WE_INITIALIZED_DIST = False


def default_backend() -> str:
    return os.environ.get(BACKEND_ENV) or ("nccl" if torch.cuda.is_available() else "gloo")


def initialize_model_parallel(backend: Optional[str] = None,
                              timeout_s: float = 600.0) -> TPGroup:
    """Build the global TP group (all ranks of the job) and return it.

    Sets the CUDA device from LOCAL_RANK when the backend is NCCL. Idempotent: a second
    call returns the existing group.
    """
    global _TP_GROUP, _WE_INITIALIZED_DIST
    if _TP_GROUP is not None:
        return _TP_GROUP
    backend = backend or default_backend()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized() and world_size > 1:
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world_size} but {key} is not set; "
                                   "launch with torchrun")
        kwargs = {}
        if backend == "nccl" and torch.cuda.is_available():
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        _WE_INITIALIZED_DIST = True
    # DistCommunicator over the default group; rank 0 of 1 when there is no process group.
    _TP_GROUP = TPGroup(DistCommunicator(None), None)
    return _TP_GROUP


def get_tp_group() -> TPGroup:
    """The global TP group; initialises it from the environment on first use."""
    return _TP_GROUP if _TP_GROUP is not None else initialize_model_parallel()


def destroy_model_parallel() -> None:
    """Forget the TP group; tear down the process group only if we created it."""
    global _TP_GROUP, _WE_INITIALIZED_DIST
    _TP_GROUP = None
    if _WE_INITIALIZED_DIST and dist.is_initialized():
        dist.destroy_process_group()
    _WE_INITIALIZED_DIST = False
