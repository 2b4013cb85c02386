"""The quantized all-reduce algorithms, written once over the ``Scheme`` protocol
(comm/codecs/base.py) and the Communicator primitives, so that gloo, NCCL and the thread
simulation run the same arithmetic.

Two-step (Flash Communication, arXiv 2412.04964)::

    chunks  = scheme.chunk(x, W)              # [W, c]: zero-padded (or channel-permuted)
    send[j] = rs_encode(chunks)[j]            # rank r quantizes all W chunks
    all_to_all_single(recv, send)             # = reduce-scatter: rank j gets every chunk j
    acc     = sum_r rs_decode(recv)[r]        # fp32, r = 0, 1, ..., W-1 in this order
    mine    = ag_encode(acc)                  # requantize the reduced chunk
    all_gather_into_tensor(all, mine)
    y       = ag_decode(all)                  # every rank decodes the SAME bytes (its own
                                              # chunk included), so ranks are bit-identical

One-shot (``algo=one-shot``): every rank quantizes its whole partial sum once, all ranks
gather every rank's bytes and each sums the W decoded partials itself::

    send     = rs_encode(chunks)                  # exactly the two-step send buffer
    all_gather_into_tensor(all, send)             # every rank gets every rank's bytes
    y[j]     = finish(sum_r rs_decode(all[:, j])) # fp32, r = 0, 1, ..., W-1 in this order

Each value is quantized once instead of twice, so for W uncorrelated partials the error
power is about half the two-step one at the same bits per value. The price is traffic:
a rank sends its whole message to W - 1 peers, ``(W - 1) * n`` codes against two-step's
``2 (W - 1) / W * n``; equal at W = 2, twice at W = 4. It is the algorithm of small
(latency-bound) messages in vLLM's and TensorRT-LLM's custom all-reduces, which send
bf16 this way.

Both sums run in fp32 in rank order 0..W-1 on every rank and backend (an SGLang fix that
moved the TP sum to fp32 changed a 35B model's GPQA from 0.788 to 0.833; DESIGN.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

import torch

from megatron_lite.comm.codecs.base import CodecError, Scheme
from megatron_lite.comm.communicator import Communicator


class Algo(str, Enum):
    TWO_STEP = "two-step"
    ONE_SHOT = "one-shot"


@dataclass
class Trace:
    """What one rank's all-reduce saw, for error feedback (comm/feedback.py): its chunks,
    the restore of their layout, and the chunk it reduced (two-step only)."""

    chunks: Optional[torch.Tensor] = None
    restore: Optional[Callable] = None
    acc: Optional[torch.Tensor] = None


def rank_order_sum(parts: torch.Tensor) -> torch.Tensor:
    """``parts[0] + parts[1] + ...`` in fp32, in this fixed rank order: the sum is the same
    on every backend and rank."""
    acc = parts[0].clone()
    for r in range(1, parts.shape[0]):
        acc += parts[r]
    return acc


def check_algo(scheme: Scheme, algo: Algo) -> None:
    """Refuse a scheme the algorithm cannot run, in one line."""
    if algo == Algo.ONE_SHOT and scheme.traits.two_stage:
        raise CodecError(f"algo=one-shot: {scheme.spec} is a two-stage codec (int4 "
                         "reduce-scatter, int8 all-gather); one-shot has one stage")
    if algo == Algo.TWO_STEP and scheme.traits.one_shot_only:
        raise CodecError(f"{scheme.spec} codes each rank's partial in its own basis: it "
                         "needs algo=one-shot")


def two_step_all_reduce(comm: Communicator, x: torch.Tensor, scheme: Scheme,
                        trace: Optional[Trace] = None) -> torch.Tensor:
    """Quantized sum of ``x`` over ``comm``'s ranks; output in ``x.dtype`` and shape."""
    _check_input(x)
    check_algo(scheme, Algo.TWO_STEP)
    w, rank = comm.world_size, comm.rank
    chunks, restore = scheme.chunk(x, w)
    c = chunks.shape[-1]
    send = scheme.rs_encode(chunks, rank).contiguous()
    recv = torch.empty_like(send)
    comm.all_to_all_single(recv, send)
    acc = rank_order_sum(scheme.rs_decode(recv, rank, c))
    mine = scheme.ag_encode(acc, rank).contiguous()
    gathered = torch.empty((w * mine.numel(),), dtype=torch.uint8, device=mine.device)
    comm.all_gather_into_tensor(gathered, mine)
    if trace is not None:
        trace.chunks, trace.restore, trace.acc = chunks, restore, acc
    return restore(scheme.ag_decode(gathered.view(w, -1), c, x.dtype))


def one_shot_all_reduce(comm: Communicator, x: torch.Tensor, scheme: Scheme,
                        trace: Optional[Trace] = None) -> torch.Tensor:
    """Quantized sum of ``x`` with one quantization per value (module docstring)."""
    _check_input(x)
    check_algo(scheme, Algo.ONE_SHOT)
    w, rank = comm.world_size, comm.rank
    chunks, restore = scheme.chunk(x, w)
    c = chunks.shape[-1]
    send = scheme.rs_encode(chunks, rank).contiguous()
    gathered = torch.empty((w,) + tuple(send.shape), dtype=torch.uint8, device=send.device)
    comm.all_gather_into_tensor(gathered.view(-1), send.view(-1))
    acc = torch.stack([rank_order_sum(scheme.rs_decode(gathered[:, j], j, c))  # [P, c]
                       for j in range(chunks.shape[0])])
    if trace is not None:
        trace.chunks, trace.restore, trace.acc = chunks, restore, None
    return restore(scheme.finish(acc, x.dtype))


def quantized_all_reduce(comm: Communicator, x: torch.Tensor, scheme: Scheme,
                         algo: Algo = Algo.TWO_STEP, trace: Optional[Trace] = None
                         ) -> torch.Tensor:
    """``x`` summed over ``comm`` with ``scheme``, by ``algo``."""
    run = one_shot_all_reduce if Algo(algo) == Algo.ONE_SHOT else two_step_all_reduce
    return run(comm, x, scheme, trace)


def _check_input(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise CodecError(f"quantized all-reduce needs a float tensor, got {x.dtype}")
