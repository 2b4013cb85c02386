"""Communicators: the objects behind ``TPGroup.all_reduce`` / ``TPGroup.all_gather``.

Contract (docs/architecture.md): after ``all_reduce`` every rank holds bitwise-identical
values; world size 1 short-circuits. Subclasses (quantized, simulated, fused) override
``all_reduce``; everything else in the engine only ever calls these two methods and
``all_reduce_add_rmsnorm``, the sum followed by the residual add and RMSNorm
(comm/norm.py), which is ``all_reduce`` plus torch ops unless a communicator has a
kernel that does all of it at once (router.py).

Every communicator knows its ``transport`` (comm/transport.py): how its ranks reach each
other, found when it is made; ``explain`` prints it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lite.comm.transport import LOCAL_ONE_RANK, TransportInfo, detect_transport
from megatron_lite.comm.norm import Layout, add_rmsnorm

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns);
# torch 2.11 (the GPU image) only has the old one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Done:
    """The handle of an exchange that has already finished (``wait`` does nothing)."""

    def wait(self) -> None:
        return None


DONE = Done()


class Communicator:
    """Abstract TP communicator for one rank of a group of ``world_size`` ranks.
    ``torch_distributed``: its primitives run on a torch.distributed process group (so
    NCCL kernels may be installed in front of it)."""

    torch_distributed = False
    # True where ``all_reduce_add_rmsnorm`` may run as one kernel (router.py): under
    # torch.compile it then stays one opaque op instead of all_reduce + traced torch ops.
    fuses_add_rmsnorm = False

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size
        self.process_group = None
        self.transport: TransportInfo = LOCAL_ONE_RANK

    # -- the two calls the model makes ------------------------------------------------
    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        raise NotImplementedError

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        raise NotImplementedError

    def all_reduce_add_rmsnorm(self, partial: torch.Tensor, residual: torch.Tensor,
                               norm_weight: Optional[torch.Tensor], eps: float,
                               site: Optional[str] = None, *, layout: Layout = Layout.PRE_NORM,
                               post_norm_weight: Optional[torch.Tensor] = None,
                               offset: float = 0.0, scale_in_fp32: bool = False,
                               bias: Optional[torch.Tensor] = None
                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(residual', normed)`` of comm/norm.py for ``y = all_reduce(partial, site)``.

        This is the reference and the fallback: this communicator's own ``all_reduce``
        (so wrappers that change the sum, quantize it or record it, keep doing so), then
        ``add_rmsnorm``'s torch ops. Ranks stay bitwise identical: every rank applies the
        same ops to identical sums and identical residual streams."""
        y = self.all_reduce(partial, site)
        return add_rmsnorm(y, residual, norm_weight, eps, layout=layout,
                           post_norm_weight=post_norm_weight, offset=offset,
                           scale_in_fp32=scale_in_fp32, bias=bias)

    def explain_add_rmsnorm(self, x: torch.Tensor, site: Optional[str] = None) -> str:
        """Which path an ``all_reduce_add_rmsnorm(x, ...)`` takes, and why."""
        return f"unfused: {self.explain(x, site)}, then torch ops"

    # -- primitives the two-step quantized all-reduce is written against -------------
    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor) -> None:
        raise NotImplementedError

    def all_gather_into_tensor(self, output: torch.Tensor, input: torch.Tensor) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    # Started exchanges: the handle's ``wait()`` must run before ``output`` is read, and
    # both tensors must stay alive until then. On NCCL the wait makes the current stream
    # wait for NCCL's (the host goes on); a communicator without asynchronous exchanges
    # runs them here and returns DONE.
    def all_to_all_single_async(self, output: torch.Tensor, input: torch.Tensor):
        self.all_to_all_single(output, input)
        return DONE

    def all_gather_into_tensor_async(self, output: torch.Tensor, input: torch.Tensor):
        self.all_gather_into_tensor(output, input)
        return DONE

    def explain(self, x: torch.Tensor, site: Optional[str] = None) -> str:
        """Which path an ``all_reduce(x, site)`` takes, and why (logs, benchmarks)."""
        return f"native ({type(self).__name__}); transport {self.transport}"

    # -- what a communicator may want to know about the model ------------------------
    def set_post_norms(self, post_norms: dict) -> None:
        """``{site: (gain [H], eps)}``: the norm each site's reduced sum passes through
        before the residual add (sandwich-norm models). Only error feedback uses it."""


class DistCommunicator(Communicator):
    """Plain torch.distributed (NCCL on GPU, gloo on CPU): the uncompressed baseline.

    ``transport``: None detects it (comm/transport.py), which is collective on an NCCL
    group: every rank makes its communicator at the same point."""

    torch_distributed = True

    def __init__(self, process_group: Optional[dist.ProcessGroup] = None,
                 transport: Optional[TransportInfo] = None):
        if process_group is None and not dist.is_initialized():
            super().__init__(0, 1)
        else:
            super().__init__(dist.get_rank(process_group), dist.get_world_size(process_group))
        self.process_group = process_group
        self.transport = transport or detect_transport(process_group)

    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        if self.world_size == 1:
            return x
        out = x.contiguous().clone()
        dist.all_reduce(out, group=self.process_group)
        return out

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        x = x.contiguous()
        # all_gather_into_tensor concatenates along dim 0; move `dim` there and back.
        xt = x.movedim(dim, 0).contiguous()
        out = torch.empty((self.world_size * xt.shape[0],) + tuple(xt.shape[1:]),
                          dtype=x.dtype, device=x.device)
        _all_gather_single(out, xt, group=self.process_group)
        return out.movedim(0, dim).contiguous()

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor) -> None:
        dist.all_to_all_single(output, input, group=self.process_group)

    def all_gather_into_tensor(self, output: torch.Tensor, input: torch.Tensor) -> None:
        _all_gather_single(output, input, group=self.process_group)

    def all_to_all_single_async(self, output: torch.Tensor, input: torch.Tensor):
        return dist.all_to_all_single(output, input, group=self.process_group, async_op=True)

    def all_gather_into_tensor_async(self, output: torch.Tensor, input: torch.Tensor):
        return _all_gather_single(output, input, group=self.process_group, async_op=True)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.process_group)


class WrappingCommunicator(Communicator):
    """A communicator that changes ``all_reduce`` and delegates everything else to ``base``.

    Quantizing, recording, codec-switching and reduce-skipping communicators are all of
    this kind: they decide what the TP sum does, while gathers and the primitives the
    two-step algorithm is written against always go to the real group underneath.
    """

    def __init__(self, base: Communicator):
        super().__init__(base.rank, base.world_size)
        self.base = base
        self.process_group = base.process_group
        self.torch_distributed = base.torch_distributed
        self.transport = base.transport

    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        return self.base.all_reduce(x, site)

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return self.base.all_gather(x, dim)

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor) -> None:
        self.base.all_to_all_single(output, input)

    def all_gather_into_tensor(self, output: torch.Tensor, input: torch.Tensor) -> None:
        self.base.all_gather_into_tensor(output, input)

    def all_to_all_single_async(self, output: torch.Tensor, input: torch.Tensor):
        return self.base.all_to_all_single_async(output, input)

    def all_gather_into_tensor_async(self, output: torch.Tensor, input: torch.Tensor):
        return self.base.all_gather_into_tensor_async(output, input)

    def barrier(self) -> None:
        self.base.barrier()

    def set_post_norms(self, post_norms: dict) -> None:
        self.base.set_post_norms(post_norms)

    def explain(self, x: torch.Tensor, site: Optional[str] = None) -> str:
        return self.base.explain(x, site)
