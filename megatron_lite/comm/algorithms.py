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

Chunked (``chunk_bytes``): a message larger than ``chunk_bytes`` is cut, along each rank's
chunk, into pieces of whole codec groups (``Scheme.piece_quantum``); each piece runs the
same stages, and every exchange is started asynchronously, so that coding piece i + 1
overlaps the exchange of piece i, and decoding piece i the exchange of piece i + 1::

    for i:  send[i] = rs_encode(chunks[:, piece i]);  start all_to_all(recv[i], send[i])
    for i:  wait a2a i;  acc[i] = sum_r rs_decode(recv[i]);  start all_gather(all[i], ag_encode(acc[i]))
    for i:  wait gather i;  y[:, piece i] = ag_decode(all[i])

A group is coded from its own values only (its scales, its rotation), and the sums are
elementwise, so the pieces give the unchunked result bit for bit (any piece size, any
backend; tests/test_transport.py). On NCCL, ``wait`` makes the current stream wait for
NCCL's (no host sync), so the exchanges run beside the coding kernels and a CUDA graph
captures them like any collective. Schemes whose codes depend on a value's position in
the chunk (static per-channel steps, per-rank transforms) have no quantum and run whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, List, Optional, Tuple

import torch

from megatron_lite.comm.codecs.base import CodecError, Scheme
from megatron_lite.comm.communicator import Communicator


# Input bytes per piece of the chunked portable path (``--comm ...,chunk=SIZE``). Not
# measured: large enough that a piece's exchange outweighs a collective's fixed cost
# (tens of us on NCCL) and its coding a launch's; a prefill message of 8192 tokens x 4096
# bf16 channels (64 MiB) becomes 16 pieces, a decode message stays whole.
DEFAULT_CHUNK_BYTES = 4 << 20


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


def pieces(scheme: Scheme, c: int, nbytes: int, chunk_bytes: int) -> List[Tuple[int, int]]:
    """Column ranges ``[a, b)`` of a ``[P, c]`` chunk matrix of a message of ``nbytes``:
    about ``chunk_bytes`` of the message each, whole codec groups; one range where the
    message fits in a piece, ``chunk_bytes`` is 0 or the scheme has no quantum."""
    q = scheme.piece_quantum()
    if not chunk_bytes or q is None or nbytes <= chunk_bytes:
        return [(0, c)]
    per = -(-c // -(-nbytes // chunk_bytes))        # columns per piece, then whole groups
    width = -(-per // q) * q
    return [(a, min(a + width, c)) for a in range(0, c, width)]


def in_pieces(x: torch.Tensor, scheme: Scheme, chunk_bytes: int) -> str:
    """`` in pieces of N B`` where the chunked path cuts ``x``, else '' (for ``explain``)."""
    if chunk_bytes and scheme.piece_quantum() and x.numel() * x.element_size() > chunk_bytes:
        return f" in pieces of {chunk_bytes} B"
    return ""


def two_step_all_reduce(comm: Communicator, x: torch.Tensor, scheme: Scheme,
                        trace: Optional[Trace] = None, chunk_bytes: int = 0) -> torch.Tensor:
    """Quantized sum of ``x`` over ``comm``'s ranks; output in ``x.dtype`` and shape.
    ``chunk_bytes``: pieces of about this many input bytes (module docstring; 0: whole)."""
    _check_input(x)
    check_algo(scheme, Algo.TWO_STEP)
    w, rank = comm.world_size, comm.rank
    chunks, restore = scheme.chunk(x, w)
    c = chunks.shape[-1]
    cuts = pieces(scheme, c, x.numel() * x.element_size(), chunk_bytes)
    if len(cuts) > 1:
        return _two_step_pieces(comm, x, scheme, chunks, restore, cuts, trace)
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


def _two_step_pieces(comm, x, scheme, chunks, restore, cuts, trace) -> torch.Tensor:
    """The two-step algorithm piece by piece, every exchange started before the next
    piece is coded (module docstring)."""
    w, rank = comm.world_size, comm.rank
    sent = []
    for a, b in cuts:
        send = scheme.rs_encode(chunks[:, a:b], rank).contiguous()
        recv = torch.empty_like(send)
        sent.append((send, recv, comm.all_to_all_single_async(recv, send)))
    gathers, accs = [], []
    for i, (a, b) in enumerate(cuts):
        _, recv, work = sent[i]
        work.wait()
        sent[i] = None                    # send and recv are free once the exchange is
        acc = rank_order_sum(scheme.rs_decode(recv, rank, b - a))
        mine = scheme.ag_encode(acc, rank).contiguous()
        gathered = torch.empty((w * mine.numel(),), dtype=torch.uint8, device=mine.device)
        gathers.append((mine, gathered, comm.all_gather_into_tensor_async(gathered, mine)))
        if trace is not None:
            accs.append(acc)
    out = []
    for (a, b), (_, gathered, work) in zip(cuts, gathers):
        work.wait()
        out.append(scheme.ag_decode(gathered.view(w, -1), b - a, x.dtype))
    if trace is not None:
        trace.chunks, trace.restore, trace.acc = chunks, restore, torch.cat(accs)
    return restore(torch.cat(out, dim=-1))


def one_shot_all_reduce(comm: Communicator, x: torch.Tensor, scheme: Scheme,
                        trace: Optional[Trace] = None, chunk_bytes: int = 0) -> torch.Tensor:
    """Quantized sum of ``x`` with one quantization per value (module docstring);
    ``chunk_bytes`` as in :func:`two_step_all_reduce`."""
    _check_input(x)
    check_algo(scheme, Algo.ONE_SHOT)
    w, rank = comm.world_size, comm.rank
    chunks, restore = scheme.chunk(x, w)
    c = chunks.shape[-1]
    cuts = pieces(scheme, c, x.numel() * x.element_size(), chunk_bytes)
    if len(cuts) > 1:
        started = []
        for a, b in cuts:
            send = scheme.rs_encode(chunks[:, a:b], rank).contiguous()
            got = torch.empty((w,) + tuple(send.shape), dtype=torch.uint8, device=send.device)
            started.append((send, got,
                            comm.all_gather_into_tensor_async(got.view(-1), send.view(-1))))
        parts = []
        for (a, b), (_, got, work) in zip(cuts, started):
            work.wait()
            parts.append(torch.stack([rank_order_sum(scheme.rs_decode(got[:, j], j, b - a))
                                      for j in range(chunks.shape[0])]))
        if trace is not None:
            trace.chunks, trace.restore, trace.acc = chunks, restore, None
        return restore(scheme.finish(torch.cat(parts, dim=-1), x.dtype))
    send = scheme.rs_encode(chunks, rank).contiguous()
    gathered = torch.empty((w,) + tuple(send.shape), dtype=torch.uint8, device=send.device)
    comm.all_gather_into_tensor(gathered.view(-1), send.view(-1))
    acc = torch.stack([rank_order_sum(scheme.rs_decode(gathered[:, j], j, c))  # [P, c]
                       for j in range(chunks.shape[0])])
    if trace is not None:
        trace.chunks, trace.restore, trace.acc = chunks, restore, None
    return restore(scheme.finish(acc, x.dtype))


def quantized_all_reduce(comm: Communicator, x: torch.Tensor, scheme: Scheme,
                         algo: Algo = Algo.TWO_STEP, trace: Optional[Trace] = None,
                         chunk_bytes: int = 0) -> torch.Tensor:
    """``x`` summed over ``comm`` with ``scheme``, by ``algo``, in pieces of about
    ``chunk_bytes`` (0: whole; the same bits either way)."""
    run = one_shot_all_reduce if Algo(algo) == Algo.ONE_SHOT else two_step_all_reduce
    return run(comm, x, scheme, trace, chunk_bytes)


def _check_input(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise CodecError(f"quantized all-reduce needs a float tensor, got {x.dtype}")
