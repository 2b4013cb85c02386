"""Attention of one decode step with the KV slots split over blocks (flash-decoding).

A decode step's query is one token. SDPA on ``q [B, Hq, 1, D]`` against a
``kv_len``-slot cache bucket under a mask (cuDNN, the backend it picks there) took 12.1 µs
a layer for llama3-8b's 32 q / 8 KV heads over 1024 slots on an H100, where the 4.2 MB
it reads stream in 1.4 µs (docs/notebook/2026-12-06.md). Here each (row, KV head) is cut
into ``splits`` ranges of slots, one program each, which computes the softmax-weighted
sum of its range for all the q heads that read this KV head at once (GQA: ``Hq / Hkv``
rows of one ``tl.dot``), and the last range to finish combines the ranges by their
log-sum-exp, in the same launch (Dao et al., "Flash-Decoding for long-context
inference", 2023, combine in a second kernel instead).

The mask is the model's (``decoder.attention_mask``: causal, sliding window, ring
buffer), read as one byte per slot, so every cache layout runs the same kernel. Scores
and the softmax are fp32; the probabilities are rounded to the value dtype before the
product with V, as flash attention does; so the output differs from SDPA's by rounding.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .config import INTERPRET

BLOCK_N = 64                     # slots per step of a range


def takes(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` runs this query: one CUDA token in bf16 or fp16,
    a power-of-two head size from 16 to 256, whole groups of q heads per KV head."""
    D = q.shape[-1]
    return (q.is_cuda and q.shape[2] == 1 and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == q.dtype and 16 <= D <= 256 and D & (D - 1) == 0
            and q.shape[1] % k.shape[1] == 0)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_geometry(rows_heads: int, slots: int, sms: int):
    """(splits, slots per split): about two programs per SM over the ``rows_heads``
    (row, KV head) pairs, each range a whole number of BLOCK_N steps."""
    steps = triton.cdiv(slots, BLOCK_N)
    splits = max(1, min(steps, triton.cdiv(2 * sms, rows_heads)))
    per = triton.cdiv(steps, splits) * BLOCK_N
    return triton.cdiv(slots, per), per


@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr):
    """a @ b in fp32. F32_DOT (under TRITON_INTERPRET=1, whose bf16/fp16 tl.dot returns
    wrong values with triton 3.9 on the CPU): both operands widened first, exactly, and
    multiplied in IEEE fp32, so the products are the tensor cores' (exact) ones."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, m_ptr, o_ptr, lse_ptr, cnt_ptr, out_ptr,
                   sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sm_b, sm_s,
                   S, per_split, HKV, splits, scale_log2e,
                   G: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                   F32_DOT: tl.constexpr):
    bh = tl.program_id(0)            # row b, KV head h
    sp = tl.program_id(1)            # range of slots
    b = bh // HKV
    h = bh - b * HKV
    g = tl.arange(0, BG)
    d = tl.arange(0, D)
    live_g = g < G
    q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :],
                mask=live_g[:, None], other=0.0)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], tl.float32)
    acc = tl.zeros([BG, D], tl.float32)
    start = sp * per_split
    end = tl.minimum(start + per_split, S)
    for s0 in range(start, end, BN):
        n = s0 + tl.arange(0, BN)
        inb = n < end
        ok = tl.load(m_ptr + b * sm_b + n * sm_s, mask=inb, other=0) != 0
        k = tl.load(k_ptr + b * sk_b + h * sk_h + n[:, None] * sk_s + d[None, :],
                    mask=inb[:, None], other=0.0)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + n[:, None] * sv_s + d[None, :],
                    mask=inb[:, None], other=0.0)
        s = _dot(q, tl.trans(k), F32_DOT) * scale_log2e
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a range whose slots are all masked so far keeps m = -inf: no exp2(-inf - -inf)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - safe)
        p = tl.exp2(s - safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32_DOT)
        m_i = m_new
    row = (b * HKV + h) * G + g                       # the q heads' rows of [B * Hq]
    if splits == 1:
        y = acc / l_i[:, None]                        # the query's own slot is live
        tl.store(out_ptr + row[:, None] * D + d[None, :],
                 y.to(out_ptr.dtype.element_ty), mask=live_g[:, None])
    else:
        # this range's normalised output and its log2-sum-exp2 (-inf where none is live)
        has = l_i > 0
        tl.store(o_ptr + (row * splits + sp)[:, None] * D + d[None, :],
                 acc / tl.where(has, l_i, 1.0)[:, None], mask=live_g[:, None])
        tl.store(lse_ptr + row * splits + sp,
                 tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")),
                 mask=live_g)
        # The range that finishes last combines them (the threadfence-reduction pattern):
        # the barrier orders this program's stores before its release increment; the last
        # one's acquire comes after every other range's release, and it reads their
        # stores from L2 (.cg: not from a stale L1). It puts the counter back to 0 for
        # the next call.
        tl.debug_barrier()
        done = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel", scope="gpu")
        if done == splits - 1:
            tl.atomic_xchg(cnt_ptr + bh, 0, sem="relaxed", scope="gpu")
            top = tl.full([BG], float("-inf"), tl.float32)
            for j in range(0, splits):
                top = tl.maximum(top, tl.load(lse_ptr + row * splits + j, mask=live_g,
                                              other=0.0, cache_modifier=".cg"))
            y = tl.zeros([BG, D], tl.float32)
            w_sum = tl.zeros([BG], tl.float32)
            for j in range(0, splits):
                w = tl.exp2(tl.load(lse_ptr + row * splits + j, mask=live_g, other=0.0,
                                    cache_modifier=".cg") - top)
                o = tl.load(o_ptr + (row * splits + j)[:, None] * D + d[None, :],
                            mask=live_g[:, None], other=0.0, cache_modifier=".cg")
                y += o * w[:, None]
                w_sum += w
            tl.store(out_ptr + row[:, None] * D + d[None, :],
                     (y / tl.where(live_g, w_sum, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=live_g[:, None])


_COUNTERS = {}   # device index -> int32 zeros: a combine counter per (row, KV head)
_COUNTER_SLOTS = 1 << 16


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed counters for ``n`` (row, KV head) pairs; each call leaves them zero. One
    buffer per device, made outside any CUDA-graph capture (a graph bakes its address in);
    a call that needs one first during a capture, or more than it holds, gets its own
    zeros (captured as a memset)."""
    buf = _COUNTERS.get(device.index)
    if buf is not None and buf.numel() >= n:
        return buf
    if n > _COUNTER_SLOTS or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(n, dtype=torch.int32, device=device)
    _COUNTERS[device.index] = buf = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32,
                                                device=device)
    return buf


def decode_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor, scale: float, sms: int) -> torch.Tensor:
    """softmax(scale * q k^T, masked) v for ``q [B, Hq, 1, D]``, ``k``/``v`` ``[B, Hkv,
    S, D]`` (any strides with a unit last one), ``mask`` bool ``[B, 1, 1, S]`` (True:
    attend; may be broadcast); q head h reads KV head h // (Hq / Hkv). Returns a
    contiguous ``[B, Hq, 1, D]`` in q's dtype, in one launch. ``sms``: the split targets
    two programs per SM. Every row must have a live slot (its own)."""
    B, HQ, _, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    G = HQ // HKV
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention: the head dimension must be contiguous")
    m = mask.expand(B, 1, 1, S)[:, 0, 0, :].view(torch.uint8)
    splits, per = split_geometry(B * HKV, S, sms)
    o = torch.empty((B * HQ * splits, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((B * HQ * splits,), dtype=torch.float32, device=q.device)
    out = torch.empty((B, HQ, 1, D), dtype=q.dtype, device=q.device)
    _decode_kernel[(B * HKV, splits)](
        q, k, v, m, o, lse, _counters(q.device, B * HKV), out, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        m.stride(0), m.stride(1), S, per, HKV, splits, scale * math.log2(math.e), G=G,
        BG=max(16, triton.next_power_of_2(G)), D=D, BN=BLOCK_N, F32_DOT=INTERPRET)
    return out


@torch.library.custom_op("megatron_lite::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """:func:`decode_attention_impl` on q's GPU, as one op that torch.compile keeps whole
    (the decode step's graph calls it between the fused elementwise kernels)."""
    return decode_attention_impl(q, k, v, mask, scale, _num_sms(q.device.index or 0))


@decode_attention.register_fake
def _(q, k, v, mask, scale):
    return q.new_empty(q.shape).contiguous()
