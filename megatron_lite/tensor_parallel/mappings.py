"""TP-region functions (Megatron-LM names), inference only: no autograd counterparts.

In Megatron each of these is a pair (forward op, backward op). For inference only the
forward matters:

=============================================  ==========================  ===============
function                                       forward                     Megatron backward
=============================================  ==========================  ===============
copy_to_tensor_model_parallel_region           identity                    all-reduce
reduce_from_tensor_model_parallel_region       all-reduce (the TP sum)     identity
gather_from_tensor_model_parallel_region       all-gather along last dim   split
scatter_to_tensor_model_parallel_region        keep own last-dim chunk     all-gather
=============================================  ==========================  ===============

``reduce_from_tensor_model_parallel_region`` is the only place a TP sum happens; it calls
``group.all_reduce(x, site)`` so the comm layer (quantized, fused, simulated) can replace
it without the layers knowing. ``reduce_add_rmsnorm_from_tensor_model_parallel_region`` is
the same sum followed by the residual add and RMSNorm that a decoder layer applies to it
(comm/norm.py), handed to the comm layer as one call so that it can run them in the
all-reduce's kernel. All short-circuit at world size 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lite.comm.norm import add_rmsnorm
from megatron_lite.parallel_state import TPGroup


def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity in the forward pass."""
    return x


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: TPGroup,
                                             site: Optional[str] = None) -> torch.Tensor:
    """Sum the partial results of all ranks. ``site`` names the producing layer."""
    if group.world_size == 1:
        return x
    return group.all_reduce(x, site)


def reduce_add_rmsnorm_from_tensor_model_parallel_region(
        x: torch.Tensor, residual: torch.Tensor, norm_weight: Optional[torch.Tensor],
        eps: float, group: TPGroup, site: Optional[str] = None, **norm):
    """``(residual', normed)`` of comm/norm.py for the sum of the partial results ``x``;
    ``norm``: the keyword arguments of ``Communicator.all_reduce_add_rmsnorm`` (layout,
    post_norm_weight, offset, scale_in_fp32, bias)."""
    if group.world_size == 1:
        return add_rmsnorm(x, residual, norm_weight, eps, **norm)
    return group.all_reduce_add_rmsnorm(x, residual, norm_weight, eps, site, **norm)


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Concatenate every rank's last-dim slice, in rank order."""
    if group.world_size == 1:
        return x
    return group.all_gather(x, dim=-1)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: TPGroup) -> torch.Tensor:
    """Keep this rank's contiguous chunk of the last dim (it must divide evenly)."""
    if group.world_size == 1:
        return x
    last = x.shape[-1]
    if last % group.world_size:
        raise ValueError(f"last dim {last} is not divisible by TP size {group.world_size}")
    return x.chunk(group.world_size, dim=-1)[group.rank].contiguous()
