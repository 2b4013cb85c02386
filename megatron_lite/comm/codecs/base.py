"""The two declared interfaces of the codec layer, and the bit helpers every codec shares.

``Codec`` is a wire format: ``n`` floats (a multiple of the group size) to
``encoded_nbytes(n)`` bytes and back, bit-exact (group.py documents the layouts and the
arithmetic). ``Scheme`` is how one codec all-reduces a message: what the algorithms
(comm/algorithms.py), error feedback (comm/feedback.py) and the fused kernels
(comm/fused.py) may ask of it. Every codec family (one module of this package) implements
``Scheme`` and registers its names (registry.py); nothing outside a family looks at a
codec's name or type.

The two-step algorithm asks, in order::

    chunks, restore = scheme.chunk(x, W)        # [P, c]: rank j reduces chunk j (P = W)
    send  = scheme.rs_encode(chunks, rank)      # [P, nb] bytes: this rank's codes
    part  = scheme.rs_decode(recv, j, c)        # [W, c] fp32: every source's chunk j
    wire  = scheme.ag_encode(acc, j)            # the reduced chunk, requantized
    y     = restore(scheme.ag_decode(gathered, c, dtype))

and the one-shot algorithm stops after ``rs_decode``: ``restore(scheme.finish(acc,
dtype))``. A scheme whose codes are per rank (``traits.one_shot_only``) returns a single
chunk holding the whole message.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from megatron_lite.errors import MegatronLiteError
from megatron_lite.kernels.config import KernelCodec, KernelPlan

BF16_MAX = float(torch.finfo(torch.bfloat16).max)  # 3.3895313892515355e38
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128

Restore = Callable[[torch.Tensor], torch.Tensor]


class CodecError(MegatronLiteError, ValueError):
    """Bad codec spec or bad codec input (unknown codec, group size that does not fit)."""


class NoKernelError(CodecError):
    """The scheme has no fused kernel for this message; the message says why."""


@dataclass(frozen=True)
class CodecSpec:
    """A parsed ``CODEC[:GROUP]``. ``group_size`` is None where the codec takes none
    (bf16; outlier-int4 with static per-channel steps)."""

    name: str
    group_size: Optional[int]

    def __str__(self) -> str:
        return self.name if self.group_size is None else f"{self.name}:{self.group_size}"


@dataclass(frozen=True)
class Traits:
    """What the algorithms must know about a scheme without looking at its name.

    ``two_stage``: the all-gather stage uses another wire format than the reduce-scatter
    (Flash Communication's int4-int8), so the one-shot algorithm, which has one stage,
    refuses it. ``one_shot_only``: codes are per rank (klt), so there is no reduce-scatter
    to run. ``calibrated``: the scheme's state comes from a calibration file, per site.
    """

    two_stage: bool = False
    one_shot_only: bool = False
    calibrated: bool = False


# ----------------------------------------------------------------------------- bit helpers
def round_up_bf16(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v >= 0`` (finite) rounded toward +inf to a bf16 value, returned as fp32."""
    b = v.contiguous().view(torch.int32)
    return ((b + 0xFFFF) & -65536).view(torch.float32)


def round_down_bf16(v: torch.Tensor) -> torch.Tensor:
    """fp32 ``v`` (finite) rounded toward -inf to a bf16 value, returned as fp32."""
    b = v.contiguous().view(torch.int32)
    up = (b + 0xFFFF) & -65536    # magnitude up: toward -inf for negatives
    down = b & -65536             # truncate: toward -inf for non-negatives
    return torch.where(b < 0, up, down).view(torch.float32)


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``q`` (integers in [0, 2^bits), last dim a multiple of 8/bits) LSB-first."""
    per = 8 // bits
    q = q.to(torch.int32).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=q.device) * bits
    return (q << shifts).sum(-1).to(torch.uint8)


def unpack_bits(buf: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``n`` codes as int32."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=buf.device) * bits
    q = (buf.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(*buf.shape[:-1], buf.shape[-1] * per)[..., :n]


def bit_planes(bits: int) -> Tuple[int, ...]:
    """Bit-plane widths of a b-bit code, low bits first: 3 -> (2, 1), 5 -> (4, 1),
    6 -> (4, 2), 7 -> (4, 2, 1) (1, 2, 4, 8: one plane)."""
    return tuple(p for p in (8, 4, 2, 1) if bits & p)


def saturate(y: torch.Tensor, out_dtype: torch.dtype, keep_inf: bool = False) -> torch.Tensor:
    """Clamp fp32 ``y`` to the finite range of the output (NaN passes), then round to it.

    The decoded grid may overshoot the input's max by up to half a step; the input itself
    was finite in its dtype, so clamping only moves ``y`` closer to it. ``keep_inf``: a
    value that is already +-Inf (carried verbatim, e.g. bf16 on the wire) stays Inf.
    """
    lim = FP16_MAX if out_dtype == torch.float16 else BF16_MAX
    c = y.clamp(-lim, lim)
    if keep_inf:
        c = torch.where(torch.isinf(y), y, c)
    return c.to(out_dtype)


def bf16_bytes(v: torch.Tensor) -> torch.Tensor:
    """fp32 values that are exact bf16 (or NaN) -> their bf16 bit patterns as bytes."""
    return v.to(torch.bfloat16).contiguous().view(torch.uint8)


def bf16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


def finite_only(err: torch.Tensor) -> torch.Tensor:
    """An error part with NaN/Inf replaced by 0: a non-finite group decodes to NaN, and
    feeding NaN forward would poison every later message, so it carries no compensation."""
    return torch.nan_to_num(err, nan=0.0, posinf=0.0, neginf=0.0)


# ----------------------------------------------------------------------------- Codec
class Codec(ABC):
    """One wire format (``encode`` accepts leading batch dims: every row is a chunk)."""

    name: str = ""
    group_size: int = 1
    bits_per_value: float = 16.0
    # Values travel verbatim (bf16), so a +-Inf survives the wire; a group code turns a
    # non-finite group into NaN instead.
    carries_inf: bool = False

    @property
    def spec(self) -> str:
        return self.name if self.group_size == 1 else f"{self.name}:{self.group_size}"

    @abstractmethod
    def encoded_nbytes(self, n: int) -> int:
        """Bytes of a chunk of ``n`` values."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n]`` floats -> ``[..., encoded_nbytes(n)]`` uint8."""

    @abstractmethod
    def decode(self, buf: torch.Tensor, n: int, out_dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        """Inverse of :meth:`encode`, saturated into ``out_dtype``."""

    @abstractmethod
    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound on ``|decode(encode(x), n, fp32) - x|`` (inf in non-finite
        groups)."""

    def kernel_codec(self) -> Optional[KernelCodec]:
        """How the Triton kernels see this wire format, or None where they have none."""
        return None

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise CodecError(f"{self.spec}: input must be a float tensor, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] % self.group_size:
            raise CodecError(f"{self.spec}: chunk length {x.shape[-1] if x.dim() else 0} is not "
                             f"a multiple of the group size {self.group_size}")
        return x.float()

    def _check_buf(self, buf: torch.Tensor, n: int) -> None:
        if buf.dtype != torch.uint8 or buf.shape[-1] != self.encoded_nbytes(n):
            raise CodecError(f"{self.spec}: expected {self.encoded_nbytes(n)} uint8 bytes for "
                             f"{n} values, got {tuple(buf.shape)} {buf.dtype}")

    def __repr__(self) -> str:
        return f"<codec {self.spec}: {self.bits_per_value:g} bits/value>"


# ----------------------------------------------------------------------------- Scheme
class Scheme(ABC):
    """How one codec (at one site, for calibrated codecs) all-reduces a message.

    Attributes: ``spec`` (canonical ``CODEC[:GROUP]``), ``name``, ``group_size``,
    ``bits_per_value`` (every byte on the wire counted, metadata included) and
    ``traits``. The stages are described in the module docstring; every tensor of bytes
    is uint8, every decoded value fp32 until ``ag_decode`` / ``finish`` round it.
    """

    spec: str
    name: str
    group_size: Optional[int]
    bits_per_value: float
    traits: Traits = Traits()

    # -- the algorithms' stages ------------------------------------------------------
    @abstractmethod
    def chunk(self, x: torch.Tensor, world_size: int) -> Tuple[torch.Tensor, Restore]:
        """``(chunks [P, c], restore)``: the message cut into the chunks the ranks reduce
        (zero-padded or permuted as the wire format needs); ``restore`` maps a ``[P, c]``
        result back to ``x``'s shape (and, where the scheme maps values, back to them)."""

    @abstractmethod
    def rs_encode(self, chunks: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s codes of its ``chunks``: ``[P, nb]``."""

    @abstractmethod
    def rs_decode(self, recv: torch.Tensor, chunk_id: int, c: int) -> torch.Tensor:
        """fp32 ``[W, c]``: row r decodes source r's code ``recv[r]`` of chunk ``chunk_id``
        (in the basis the sum runs in)."""

    def ag_encode(self, acc: torch.Tensor, chunk_id: int) -> torch.Tensor:
        """The reduced chunk ``acc`` [c] (fp32) requantized for the all-gather."""
        raise CodecError(f"{self.spec} has no all-gather stage: it needs algo=one-shot")

    def ag_decode(self, gathered: torch.Tensor, c: int, out_dtype: torch.dtype) -> torch.Tensor:
        """Every owner's requantized chunk ``gathered`` [W, nb] decoded: ``[W, c]``."""
        raise CodecError(f"{self.spec} has no all-gather stage: it needs algo=one-shot")

    @abstractmethod
    def finish(self, acc: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The one-shot output of the fp32 sums ``acc`` [P, c] (before ``restore``)."""

    def piece_quantum(self) -> Optional[int]:
        """The column step at which the ``[P, c]`` chunks may be cut into pieces that run
        the stages on their own and give the whole chunks' bits (the chunked algorithms,
        comm/algorithms.py): the group size of a scheme that codes every group from its
        own values; None (the default) where a code depends on a value's position in the
        chunk (static per-channel steps, per-rank transforms)."""
        return None

    # -- error feedback --------------------------------------------------------------
    @abstractmethod
    def own_error(self, chunks: torch.Tensor, acc: Optional[torch.Tensor],
                  rank: int) -> torch.Tensor:
        """This rank's part of the all-reduce's error, fp32 in chunk layout ``[P, c]``
        (before ``restore``): the reduce-scatter error of its own chunks plus the
        all-gather error of the chunk it reduced (``acc``; None for one-shot, which has no
        second quantization). Summed over the ranks the parts are the whole error.
        NaN/Inf positions carry 0 (:func:`finite_only`)."""

    # -- analytic bounds (tests) -----------------------------------------------------
    def rs_error_bound(self, chunks: torch.Tensor, src: int) -> torch.Tensor:
        raise CodecError(f"{self.spec} has no analytic error bound")

    def ag_error_bound(self, acc: torch.Tensor, chunk_id: int) -> torch.Tensor:
        raise CodecError(f"{self.spec} has no analytic error bound")

    # -- kernels ---------------------------------------------------------------------
    def kernel_plan(self, x: torch.Tensor) -> KernelPlan:
        """How the fused kernels run this scheme on message ``x``; raises NoKernelError
        (with the reason) where they cannot."""
        raise NoKernelError(f"no fused kernel for {self.spec}")

    def __repr__(self) -> str:
        return f"<codec {self.spec}: {self.bits_per_value:.4g} bits/value>"


def non_finite_bound(eb: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``eb`` where ``finite``, +inf elsewhere (a non-finite group has no bound)."""
    return torch.where(finite, eb, torch.full_like(eb, math.inf))
