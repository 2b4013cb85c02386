"""Error feedback along the residual stream: each quantized all-reduce's error is cancelled
by the next one.

In a pre-norm decoder (Llama) every row-parallel reduce is added straight into the
residual stream: ``h += sum_r x_r``. A lossy all-reduce adds ``e = y - sum_r x_r`` instead,
and those errors pile up in ``h`` over the 2L reduces. Every rank knows its own part of
``e``: the quantization error of its partial sum in the reduce-scatter step
(``dec(enc(x_r)) - x_r``) and the error of re-quantizing the chunk it reduced in the
all-gather step (``dec(enc(acc_r)) - acc_r``); the parts of all ranks sum to ``e``
exactly. Adding ``-(own part)`` to the rank's *next* partial sum makes the next reduce
deliver ``sum x' - e + e'``: the residual stream then carries only the latest error
instead of the sum of all of them (each sublayer still reads a stream with one error in
it). No extra communication, no extra bits: the compensation rides in the next message.

Scope. The cancellation is exact only when consecutive reduces feed the residual stream
linearly (``sandwich_norms = False``: Llama, Gemma 1). Gemma 2/3 normalise each reduced
sum before the residual add (``h += norm(y)``), so there the compensation is only a
heuristic; docs/accuracy.md measures both. State resets at the embedding reduce (the first
reduce of every forward) and whenever the message shape changes (a new forward). The last
reduce's error stays (nothing follows it).

The wrapped all-reduce is exactly ``comm/allreduce.py``'s two-step algorithm; this module
only reads its intermediate values (through a recording scheme) to compute the rank's
own error part, with the same codec reference functions.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_lite.comm.allreduce import (EMBED_SITE, GroupScheme, QuantizedCommunicator,
                                          scheme_for, two_step_all_reduce)
from megatron_lite.comm.communicator import WrappingCommunicator

PREFIX = "ef+"


class _Recording:
    """A scheme proxy that keeps this rank's chunks and its reduced chunk."""

    def __init__(self, inner):
        self.inner = inner
        self.chunks = self.restore = self.acc = None

    def chunk(self, x, world_size):
        self.chunks, self.restore = self.inner.chunk(x, world_size)
        return self.chunks, self.restore

    def ag_encode(self, acc, chunk_id):
        self.acc = acc
        return self.inner.ag_encode(acc, chunk_id)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def own_error(scheme, chunks: torch.Tensor, acc: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's part of the all-reduce error, in chunk layout ``[W, c]`` (fp32):
    reduce-scatter error of its own W chunks plus all-gather error of chunk ``rank``."""
    from megatron_lite.comm.outlier import OutlierCodec
    from megatron_lite.comm.rotation import HadamardScheme, fwht
    from megatron_lite.comm.weighting import WeightedScheme
    if isinstance(scheme, WeightedScheme):
        # chunks and acc are in the scaled domain; the caller's restore unscales the error
        return own_error(scheme.inner, chunks, acc, rank)
    c = chunks.shape[-1]
    x = chunks.float()
    if isinstance(scheme, GroupScheme):
        rs = scheme.rs.decode(scheme.rs.encode(x), c, torch.float32) - x
        ag = scheme.ag.decode(scheme.ag.encode(acc), c, torch.float32) - acc
    elif isinstance(scheme, HadamardScheme):
        g = scheme.group_size
        xr = fwht(x, g)
        rs = fwht(scheme._rs.decode(scheme._rs.encode(xr), c, torch.float32) - xr, g)
        ag = fwht(scheme._ag.decode(scheme._ag.encode(acc), c, torch.float32) - acc, g)
    elif isinstance(scheme, OutlierCodec):
        rs = torch.stack([scheme.decode_chunk(scheme.encode_chunk(x[j], scheme.rs_step[rank, j]),
                                              c, scheme.rs_step[rank, j], torch.float32) - x[j]
                          for j in range(x.shape[0])])
        st = scheme.ag_step[rank]
        ag = scheme.decode_chunk(scheme.encode_chunk(acc, st), c, st, torch.float32) - acc
    else:
        raise TypeError(f"no error feedback for scheme {type(scheme).__name__}")
    rs = rs.clone()
    rs[rank] += ag
    # Non-finite groups decode to NaN; feeding NaN forward would poison every later
    # layer, so those positions carry no compensation.
    return torch.nan_to_num(rs, nan=0.0, posinf=0.0, neginf=0.0)


class ErrorFeedbackCommunicator(WrappingCommunicator):
    """Wraps a :class:`QuantizedCommunicator`; see the module docstring."""

    def __init__(self, inner: QuantizedCommunicator):
        super().__init__(inner)
        self.inner = inner
        self.carry: Optional[torch.Tensor] = None

    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if site == EMBED_SITE or self.carry is None or self.carry.shape != x.shape:
            self.carry = None
        if self.carry is not None:
            x = (x.float() + self.carry).to(x.dtype)
        backend, codec, _ = self.inner.choose(x, site)
        if backend is None:   # native sum: (almost) exact, nothing to carry
            self.carry = None
            return self.inner.base.all_reduce(x, site)
        rec = _Recording(scheme_for(codec))
        y = two_step_all_reduce(self.inner.base, x, rec)
        err = own_error(rec.inner, rec.chunks, rec.acc, self.rank)
        self.carry = -rec.restore(err).float()
        return y

