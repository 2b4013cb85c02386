"""Tensor-parallel layers (Megatron-LM names and contracts).

Linear layers are bias-free unless built with ``bias=True`` (Qwen2's q/k/v projections,
``attention_bias``): a column-parallel bias is split like the output rows, a row-parallel
bias is held whole by every rank and added once, after the TP sum.

Every layer takes its ``TPGroup`` explicitly and owns only this rank's slice of the weight;
the slicing itself lives in ``megatron_lite.checkpoint.layout``. Parameters are created
uninitialised (``torch.empty``): they are always loaded from a checkpoint. The products are
``F.linear``'s, except for one bf16 row on a GPU (a batch-1 decode step), which
kernels/gemv.py computes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel_state import TPGroup
from megatron_lite.comm.norm import add_rmsnorm
from megatron_lite.kernels.gemv import linear
from megatron_lite.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
    reduce_add_rmsnorm_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region, scatter_to_tensor_model_parallel_region)


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} {a} is not divisible by TP size {b}")
    return a // b


class ColumnParallelLinear(nn.Module):
    """Y = X A with A split along its output (column) dimension.

    A is [input_size, output_size]; rank r holds A_r = A[:, cols of r], stored as the
    weight ``[output_size_per_partition, input_size]`` (nn.Linear layout), and computes
    Y_r = X A_r. With ``gather_output`` the slices are all-gathered into the full Y, else
    Y_r is returned (the usual input of a RowParallelLinear).

    ``output_size_per_partition`` defaults to output_size / tp; fused projections whose
    slices are not an even split (qkv with replicated KV heads) pass it explicitly.
    With ``bias`` rank r also holds b_r, the entries of b of its output rows (the layout
    table slices b exactly as the weight's rows), and computes Y_r = X A_r + b_r.
    """

    def __init__(self, input_size: int, output_size: int, *, group: TPGroup,
                 gather_output: bool = False, output_size_per_partition: Optional[int] = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.input_size, self.output_size = input_size, output_size
        self.gather_output = gather_output
        self.output_size_per_partition = output_size_per_partition or _divide(
            output_size, group.world_size, "output_size")
        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size,
                                               device=device, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.output_size_per_partition, device=device,
                                             dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_model_parallel_region(x, self.group)
        y = linear(x, self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y, self.group) if self.gather_output else y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size}, "
                f"out_per_partition={self.output_size_per_partition}, "
                f"gather_output={self.gather_output}, bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """Y = X A with A split along its input (row) dimension; Y = sum_r X_r A_r.

    A is [input_size, output_size]; rank r holds A_r = A[rows of r, :], stored as the
    weight ``[output_size, input_size / tp]``. X arrives split along its last dim
    (``input_is_parallel``, e.g. from a ColumnParallelLinear) or is scattered here. The
    partial products are summed by ``reduce_from_tensor_model_parallel_region`` under the
    name ``site`` (e.g. "layers.3.mlp.down_proj"): this is where low-bit comm plugs in.
    With ``bias`` every rank holds the whole b and adds it to the reduced sum, Y = sum_r
    X_r A_r + b (as Megatron-LM's RowParallelLinear): added before the reduce it would be
    counted tp times, and the codecs would carry it.

    ``forward_add_rmsnorm(x, residual, norm_weight, eps, **norm)`` returns what a decoder
    layer makes of Y, ``(residual + Y, rmsnorm(residual + Y))`` (or the sandwich layout,
    comm/norm.py), through one comm call, so that the communicator can fuse the residual
    add and the norm into the all-reduce.
    """

    def __init__(self, input_size: int, output_size: int, *, group: TPGroup,
                 input_is_parallel: bool = True, site: Optional[str] = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel = input_is_parallel
        self.site = site
        self.input_size_per_partition = _divide(input_size, group.world_size, "input_size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition,
                                               device=device, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(output_size, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        partial = linear(x, self.weight)
        y = reduce_from_tensor_model_parallel_region(partial, self.group, self.site)
        # Every rank adds the same b to bitwise-identical sums: ranks stay identical.
        return y if self.bias is None else y + self.bias

    def forward_add_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor,
                            norm_weight: Optional[torch.Tensor], eps: float, **norm):
        """``(residual', normed)`` of comm/norm.py for Y = this layer's output."""
        if self.group.world_size == 1:
            # forward itself (and its hooks: lab/calibration.py reads Y at TP 1)
            return add_rmsnorm(self(x), residual, norm_weight, eps, **norm)
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.group)
        return reduce_add_rmsnorm_from_tensor_model_parallel_region(
            linear(x, self.weight), residual, norm_weight, eps, self.group, self.site,
            bias=self.bias, **norm)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, in_per_partition={self.input_size_per_partition}, "
                f"out={self.output_size}, site={self.site!r}, bias={self.bias is not None}")


def vocab_range(padded_vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the (padded) vocab rows held by ``rank``."""
    per = _divide(padded_vocab_size, world_size, "padded vocab size")
    return rank * per, (rank + 1) * per


class VocabParallelEmbedding(nn.Module):
    """E[ids] with the table E [padded_vocab, hidden] split along the vocab (row) dim.

    Rank r holds rows [r*Vp/tp, (r+1)*Vp/tp). It looks up the ids that fall in its range,
    writes zeros for every other id, and the all-reduce (site "embed_tokens") sums the
    one non-zero contribution per token: an exact result, since x + 0 == x.
    """

    def __init__(self, padded_vocab_size: int, embedding_dim: int, *, group: TPGroup,
                 site: str = "embed_tokens", device=None, dtype=None):
        super().__init__()
        self.group = group
        self.site = site
        self.padded_vocab_size = padded_vocab_size
        self.vocab_start, self.vocab_end = vocab_range(padded_vocab_size, group.rank,
                                                       group.world_size)
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, embedding_dim,
                                               device=device, dtype=dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = torch.where(outside, torch.zeros_like(ids), ids - self.vocab_start)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out, self.group, self.site)


class ParallelLMHead(nn.Module):
    """logits = h W^T with W [padded_vocab, hidden] split along the vocab (row) dim.

    Rank r computes the logits of its vocab rows. Rows at or beyond the real ``vocab_size``
    are padding: their logits are set to -inf, so softmax/argmax over local (vocab-parallel)
    logits never picks them. Optional final soft-capping ``cap * tanh(logits / cap)`` is
    element-wise, so it is applied to the local logits before the gather (Gemma 2:
    Gemma2ForCausalLM.forward). ``forward(h)`` returns the full [..., vocab_size] logits
    (all-gathered, padding stripped), bitwise identical on every rank;
    ``forward(h, gather=False)`` returns the local [..., Vp/tp] slice.
    """

    def __init__(self, vocab_size: int, padded_vocab_size: int, hidden_size: int, *,
                 group: TPGroup, logit_softcap: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.padded_vocab_size = padded_vocab_size
        self.logit_softcap = logit_softcap
        self.vocab_start, self.vocab_end = vocab_range(padded_vocab_size, group.rank,
                                                       group.world_size)
        n_pad_local = max(0, self.vocab_end - max(self.vocab_start, vocab_size))
        self.n_pad_local = n_pad_local
        self.weight = nn.Parameter(torch.empty(self.vocab_end - self.vocab_start, hidden_size,
                                               device=device, dtype=dtype), requires_grad=False)

    def forward(self, h: torch.Tensor, gather: bool = True) -> torch.Tensor:
        logits = linear(copy_to_tensor_model_parallel_region(h, self.group), self.weight)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        if self.n_pad_local:
            # padding rows sit at the end of the last ranks' slices
            logits[..., logits.shape[-1] - self.n_pad_local:] = float("-inf")
        if not gather:
            return logits
        return gather_from_tensor_model_parallel_region(logits, self.group)[..., :self.vocab_size]
