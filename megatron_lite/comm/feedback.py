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

Pre-norm models (Llama, Gemma 1; ``sandwich_norms = False``): the cancellation is exact.
The rank's state is just its last error part.

Sandwich-norm models (Gemma 2/3) normalise each reduced sum before the residual add:
``h += G * y / rho(y)``, with ``G = offset + w`` the norm's per-channel gain and
``rho(y) = sqrt(mean(y^2) + eps)`` per token. An error ``e`` in ``y`` then reaches the
stream as ``G * e / rho`` (to first order; the part of ``e`` along ``y`` is removed too,
1/H of it for noise), and the next site's norm has another gain and another ``rho``, so
adding ``-e`` to the next message is wrong; docs/accuracy.md measured it destructive.
The norm-aware version keeps, per rank, a *debt* ``d``: its share of the stream's error,
in stream units. Before a reduce with gain ``G`` it adds ``c`` to its partial sum, chosen
to cancel the debt through that site's norm:

* ``c = -rho~ * d * G / (G^2 + lam^2)``: the least-squares payment with a Tikhonov
  penalty on the message size, ``lam = DAMPING * median |G|``. Channels whose gain is
  small relative to the site's pay little and keep the rest of their debt for later
  sites: a plain ``-rho~ d / G`` blows the message up on them, and the quantization
  noise with it (Gemma 3's post-norm gains span 0 to 1650 within one site).
* ``rho~ = sqrt(W) * rms(x_r)`` per token: the next sum's ``rho`` is not known before the
  reduce, and this is its value for W uncorrelated partials of this rank's size.
* ``|c|`` is capped at the rank's ``max |x_r|`` per token.

After the reduce every rank knows the exact ``rho`` of the decoded sum, so the debt is
updated exactly (to first order): ``d += G * (c + own error part) / rho``. A wrong
``rho~`` only pays too little or too much; the difference stays in the debt and is paid
at the next site. The model supplies the gains (``Transformer.post_reduce_norms``, set
with :meth:`ErrorFeedbackCommunicator.set_post_norms`); sites without one are pre-norm
sites and take the exact path above.

State resets at the embedding reduce (the first reduce of every forward) and whenever
the message shape changes (a new forward). The last reduce's error stays (nothing
follows it).

The wrapped all-reduce is exactly comm/algorithms.py's algorithm (two-step, or one-shot
with ``algo=one-shot``, where a rank's error part is just its partial's quantization
error); this module reads its intermediate values (a ``Trace``) and asks the scheme for
the rank's own error part (``Scheme.own_error``, the same codec reference functions). A
backend of the inner chain that returns the sum and the error part in one call
(``returns_error``: the one-shot Triton kernels on an NCCL group) is used instead where
it takes the message; it gives the same bits.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from megatron_lite.comm.algorithms import Trace, quantized_all_reduce
from megatron_lite.comm.communicator import WrappingCommunicator
from megatron_lite.comm.router import QuantizedCommunicator
from megatron_lite.comm.spec import EMBED_SITE

# lam / median|G| of the norm-aware payment. Chosen on Gemma-3-270M, simulated TP 4,
# weighted-hadamard-int4:128, KL against bf16 on wiki_passages windows 100-103 / 104-107
# (disjoint from the calibration and evaluation windows of docs/results/accuracy.md):
# without feedback 0.133 / 0.101; DAMPING 0.25 -> - / 0.051, 0.35 -> 0.058 / 0.051,
# 0.5 -> 0.064 / 0.047, 0.7 -> 0.064 / -, 1 -> 0.072 / 0.055, 2 -> 0.086 / -. Flat from
# 0.25 to 0.7.
DAMPING = 0.5


class ErrorFeedbackCommunicator(WrappingCommunicator):
    """Wraps a :class:`QuantizedCommunicator`; see the module docstring."""

    def __init__(self, inner: QuantizedCommunicator,
                 post_norms: Optional[Dict[str, Tuple[torch.Tensor, float]]] = None):
        super().__init__(inner)
        self.inner = inner
        self.spec = inner.spec
        self.debt: Optional[torch.Tensor] = None
        self.set_post_norms(post_norms or {})

    def set_post_norms(self, post_norms: Dict[str, Tuple[torch.Tensor, float]]) -> None:
        """``{site: (gain [H], eps)}``: the norm each site's reduced sum passes through
        before the residual add (sandwich-norm models); empty for pre-norm models."""
        self.post_norms = {}
        for site, (gain, eps) in post_norms.items():
            g = gain.detach().float()
            self.post_norms[site] = (g, float(eps), DAMPING * g.abs().median())

    def all_reduce(self, x: torch.Tensor, site: Optional[str] = None) -> torch.Tensor:
        if self.world_size == 1:
            return x
        if site == EMBED_SITE or self.debt is None or self.debt.shape != x.shape:
            self.debt = None
        norm = self.post_norms.get(site)
        pay = None
        if self.debt is not None:
            pay = -self.debt if norm is None else self._payment(x, norm)
            paid = (x.float() + pay).to(x.dtype)
            if norm is not None and x.dtype != torch.float32:
                pay = paid.float() - x.float()   # what the bf16/fp16 message really carries
            x = paid
        plan = self.inner.plan(x, site)
        if plan.scheme is None:   # native sum: (almost) exact, nothing new to carry
            y = self.inner.base.all_reduce(x, site)
            # behind a norm, the payment moved the stream and is booked
            self.debt = (self._settle(norm, y, pay, None)
                         if norm is not None and pay is not None else None)
            return y
        fast = self.inner.error_backend(x, plan.scheme)
        if fast is not None:
            y, err = fast.all_reduce_with_error(x, plan.scheme, self.inner)
        else:
            trace = Trace()
            y = quantized_all_reduce(self.inner.base, x, plan.scheme, self.spec.algo, trace,
                                     self.spec.chunk_bytes)
            err = trace.restore(plan.scheme.own_error(trace.chunks, trace.acc,
                                                      self.rank)).float()
        # Pre-norm: the debt is exactly the new error (the payment cancelled the old one).
        self.debt = err if norm is None else self._settle(norm, y, pay, err)
        return y

    def explain(self, x: torch.Tensor, site: Optional[str] = None) -> str:
        """What a call does: feedback needs each rank's error part, so it runs a backend
        that returns it (the one-shot kernels) or else the portable path of its
        algorithm, whatever the inner chain would pick for a plain sum."""
        plan = self.inner.plan(x, site)
        where = f"; transport {self.transport}"
        if plan.scheme is None:
            return plan.why + where
        fast = self.inner.error_backend(x, plan.scheme)
        if fast is not None:
            return f"error feedback, {fast.name} with {plan.scheme.spec}{where}"
        return (f"error feedback, portable {self.spec.algo.value} with {plan.scheme.spec}"
                + where)

    def _payment(self, x: torch.Tensor, norm) -> torch.Tensor:
        gain, _, lam = norm
        xf = x.float()
        rho = xf.pow(2).mean(-1, keepdim=True).sqrt() * self.world_size ** 0.5
        pay = -rho * self.debt * gain / (gain * gain + lam * lam)
        cap = xf.abs().amax(-1, keepdim=True)
        return torch.maximum(torch.minimum(pay, cap), -cap)

    def _settle(self, norm, y: torch.Tensor, pay: Optional[torch.Tensor],
                err: Optional[torch.Tensor]) -> torch.Tensor:
        gain, eps, _ = norm
        rho = torch.sqrt(y.float().pow(2).mean(-1, keepdim=True) + eps)
        moved = err if pay is None else (pay if err is None else pay + err)
        debt = gain * moved / rho
        if self.debt is not None:
            debt = self.debt + debt
        # A non-finite sum (NaN/Inf input) must not poison every later message.
        return torch.nan_to_num(debt, nan=0.0, posinf=0.0, neginf=0.0)
