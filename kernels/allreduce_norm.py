"""One-shot all-reduce fused with the residual add and RMSNorm (TP decode), over the
symmetric workspace (workspace.py). comm/norm.py defines the arithmetic; this kernel
computes, for every row (token) of ``x [rows, H]``::

    y         = allreduce(x)                       one-shot: fixed rank order, fp32
    y         = y + bias                           (optional: a row-parallel bias)
    y         = rmsnorm(y, w_post)                 (sandwich layout: Gemma 2/3)
    residual' = residual + y                       -> written
    normed    = rmsnorm(residual', w)              -> written (unless w is None)

Every intermediate is rounded to the model's dtype where the torch ops round it.

The sum, two kinds, both as the unfused path sums:

* raw (``plan`` None; the ``oneshot`` choice of comm/fused.py's AutoBackend): the
  partials travel as their own bits and are summed in fp32, rank order 0..W-1, rounded
  once; the arithmetic of fused_allreduce.py's one-shot kernel;
* quantized (``plan``: a one-stage codec of the one-shot algorithm, comm/algorithms.py,
  with its ``hadamard-`` rotation and ``weighted-`` scales, the codecs the one-shot codec
  kernels take): every rank encodes each group of its row with ``plan.rs`` (quant.py's
  tile coder), stores the codes in every peer, and every rank decodes the W codes and
  sums them in fp32 in rank order, then rotates back / saturates / unscales as the
  scheme's ``finish`` and ``restore`` do. The hidden size must be a multiple of the
  group size, so the groups of a row are the groups the reference cuts from the
  flattened message, and the codes are the same.

Exactness against the unfused path (all-reduce through the communicator, then
comm/norm.py's torch ops):

* the reduced sum, the bias add and, for the pre-norm layout, ``residual'`` are
  **bit-exact** (same operations in the same order, each rounded to the dtype);
* the RMSNorm outputs (``normed``; in the sandwich layout also ``residual'``, which
  passes through the post-norm) are **not** bit-exact: the sum of squares over the row
  is a tree reduction here and torch's own order there; ``1/sqrt`` is correctly rounded
  (``div_rn(1, sqrt_rn(.))``) and every product and cast follows comm/norm.py. They
  differ from the torch result by fp32 rounding of the statistics only, which after the
  cast to bf16/fp16 is at most a couple of units in the last place of the output
  (tests/test_allreduce_norm.py states the tolerance it checks). For quantized codecs
  that is far inside the codec's own error; the codec error itself is identical.

Ranks are bitwise identical: every rank decodes the same bytes and runs the same
operations in the same order.

Synchronisation. A fixed grid per workspace (one block per SM, at most MAX_BLOCKS);
block b takes rows b, b + grid, ... Block b stores its rows into slot ``[parity][me]``
of every rank, release-signals flag ``(NORM_FLAG_ROW + parity, me, b)`` on every rank
and acquires the W flags of its own rank (sync.block_barrier), then reads the W slots.
Its epoch comes from ``counters[2][b]``: every block, with rows or not, bumps it on
every call, so a parity is the call count's on every block. That makes the
double-buffering safe whatever the row count from call to call: a rank that starts call
k+2 has finished call k+1, in which some block met its peers, so every peer has started
call k+1 and finished reading call k's slots (the ones call k+2 writes). A block without
rows skips the barrier. Kernels of one stream run in order, so the other kernels of the
workspace (own flags, own counters, own slots) never interleave with it.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import maps, quant, sync
from .calls import BF16_MAX, geometry, out_limit
from .config import KIND_BF16, KernelPlan, launch_opts
from .fused_allreduce import SPIN_LIMIT, _num_sms, get_tile, put_tile
from .workspace import MAX_BLOCKS, NORM_FLAG_ROW, SymmWorkspace

MAX_HIDDEN = 16384          # one block holds a whole row (next power of two) in registers
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _round(v, DT: tl.constexpr):
    """fp32 -> the nearest DT value (round to nearest even), as fp32: where a torch op
    with a DT output rounds (bf16 through its bits, see quant.py)."""
    if DT == tl.bfloat16:
        r = quant.bits_to_f32(quant.bf16_bits(v))
    elif DT == tl.float16:
        r = v.to(tl.float16).to(tl.float32)
    else:
        r = v
    return r


@triton.jit
def _rms_norm(v, offs, mask, w_ptr, HF, eps, offset, DT: tl.constexpr,
              SCALE_FP32: tl.constexpr, OFFSET_W: tl.constexpr):
    """comm/norm.py's ``rms_norm`` of the row ``v`` (fp32 holding DT values), as fp32
    holding the DT result."""
    sq = tl.where(mask, v * v, 0.0)
    ms = tl.math.div_rn(tl.sum(sq, axis=0), HF)
    inv = tl.math.div_rn(tl.full(ms.shape, 1.0, tl.float32), tl.math.sqrt_rn(ms + eps))
    yn = v * inv
    w = quant.load_f32(w_ptr, offs, mask)
    if SCALE_FP32:                     # Gemma: (offset + w) in fp32, one cast at the end
        out = yn * (offset + w)
    else:                              # Llama: cast, then w (+ offset, in DT) times it
        if OFFSET_W:
            w = _round(w + offset, DT)
        out = w * _round(yn, DT)
    return _round(out, DT)


@triton.jit(do_not_specialize=["rank", "rows"])
def _all_reduce_add_rmsnorm_kernel(
        x_ptr, res_ptr, bias_ptr, pw_ptr, w_ptr, s_ptr, res_out_ptr, out_ptr,
        ws_ptr, cnt_ptr, status_ptr, d0, d1, d2, d3, d4, d5, d6, d7,
        rows, H, HF, rank, flag_off, data_off, slot_bytes, row_bytes, eps, offset, RSCALE,
        W: tl.constexpr, MAXB: tl.constexpr, BLOCK: tl.constexpr, NG: tl.constexpr,
        G: tl.constexpr, RAW: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
        QMAX: tl.constexpr, C2: tl.constexpr, PAY: tl.constexpr, KEEP_INF: tl.constexpr,
        ROT: tl.constexpr, LOG2G: tl.constexpr, HAS_S: tl.constexpr, LIM_PRE: tl.constexpr,
        OUT_LIM: tl.constexpr, HAS_BIAS: tl.constexpr, SANDWICH: tl.constexpr,
        HAS_NORM: tl.constexpr, SCALE_FP32: tl.constexpr, OFFSET_W: tl.constexpr,
        FLAG_ROW: tl.constexpr, SPIN: tl.constexpr):
    """See the module docstring (host side: ``all_reduce_add_rmsnorm``)."""
    b = tl.program_id(0)
    nb = tl.num_programs(0)
    epoch = tl.load(cnt_ptr + b) + 1
    par = epoch & 1
    elt = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    gi = tl.arange(0, NG)
    gall = gi * G < H
    lane = gi[:, None] * G + tl.arange(0, G)[None, :]
    my_slot = data_off + (par * W + rank) * slot_bytes

    # 1. my rows into slot [par][me] of every rank
    for row in range(b, rows, nb):
        xrow = x_ptr + row * H          # < 2^31: the rows fit a workspace slot
        if RAW:                           # moved as raw bits: no rounding
            v = tl.load(xrow + offs, mask=mask, other=0.0)
            for j in tl.static_range(W):
                dst = (sync.peer_base(ws_ptr, j, d0, d1, d2, d3, d4, d5, d6, d7) + my_slot
                       + row * row_bytes)
                tl.store(dst.to(tl.pointer_type(elt), bitcast=True) + offs, v, mask=mask)
        else:
            xt = quant.load_f32(xrow, lane, gall[:, None])
            if HAS_S:                     # weighted-: fl32(x) * s per channel
                xt = xt * tl.load(s_ptr + lane, mask=gall[:, None], other=1.0)
            if ROT:                       # hadamard-: a row is whole groups
                xt = maps.fwht_tile(xt, NG, G, LOG2G, RSCALE)
            for j in tl.static_range(W):
                dst = (sync.peer_base(ws_ptr, j, d0, d1, d2, d3, d4, d5, d6, d7) + my_slot
                       + row * row_bytes)
                put_tile(xt, dst, gall, PAY, NG, G, KIND, BITS, QMAX, C2)
    if b < rows:
        sync.block_barrier(ws_ptr, d0, d1, d2, d3, d4, d5, d6, d7, flag_off, FLAG_ROW + par,
                           rank, b, epoch, status_ptr, W, MAXB, SPIN)

    # 2. sum the W copies in rank order, then the residual add and the norms
    for row in range(b, rows, nb):
        src0 = ws_ptr + data_off + (par * W) * slot_bytes + row * row_bytes
        if RAW:
            acc = quant.load_f32(src0.to(tl.pointer_type(elt), bitcast=True), offs, mask)
            for src in tl.static_range(1, W):
                acc += quant.load_f32((src0 + src * slot_bytes).to(tl.pointer_type(elt),
                                                                 bitcast=True), offs, mask)
            y = _round(acc, elt)
        else:
            # decode as the reference's fp32 decode (bf16-range saturation), sum, finish
            acc = get_tile(src0, gall, 3.3895313892515355e38, PAY, NG, G, KIND, BITS, QMAX)
            for src in tl.static_range(1, W):
                acc += get_tile(src0 + src * slot_bytes, gall, 3.3895313892515355e38, PAY, NG,
                                G, KIND, BITS, QMAX)
            if ROT:
                acc = maps.fwht_tile(acc, NG, G, LOG2G, RSCALE)
            yc = maps.clamp(acc, LIM_PRE)
            if KEEP_INF:                  # the bf16 codec carries an Inf verbatim
                yc = tl.where(tl.abs(acc) == float("inf"), acc, yc)
            y = tl.reshape(yc, (BLOCK,))
            if HAS_S:
                sc = tl.load(s_ptr + offs, mask=mask, other=1.0)
                y = maps.clamp(tl.math.div_rn(y, sc), OUT_LIM)
            y = _round(y, elt)
        rbase = row * H
        if HAS_BIAS:
            y = _round(y + quant.load_f32(bias_ptr, offs, mask), elt)
        if SANDWICH:
            y = _rms_norm(y, offs, mask, pw_ptr, HF, eps, offset, elt, SCALE_FP32, OFFSET_W)
        r = _round(quant.load_f32(res_ptr + rbase, offs, mask) + y, elt)
        tl.store(res_out_ptr + rbase + offs, quant.cast_out(r, elt), mask=mask)
        if HAS_NORM:
            n = _rms_norm(r, offs, mask, w_ptr, HF, eps, offset, elt, SCALE_FP32, OFFSET_W)
            tl.store(out_ptr + rbase + offs, quant.cast_out(n, elt), mask=mask)
    tl.store(cnt_ptr + b, epoch)


@functools.lru_cache(maxsize=None)
def grid_size(device: torch.device) -> int:
    """The kernel's fixed grid on ``device`` (module docstring: it must not change from
    call to call)."""
    return min(_num_sms(device), MAX_BLOCKS)


def _row_bytes(h: int, elt_size: int, plan: Optional[KernelPlan]) -> int:
    """Bytes of one row's copy in a slot: the raw row, or its coded tile of
    next_power_of_2(h) values (quant.py layout), 16-byte aligned."""
    n = h * elt_size if plan is None else plan.rs.nbytes(triton.next_power_of_2(h))
    return -(-n // 16) * 16


def unsupported(ws: SymmWorkspace, x: torch.Tensor, plan: Optional[KernelPlan] = None
                ) -> Optional[str]:
    """None if the kernel takes the message ``x`` [..., H] (with ``plan``'s codec, or raw),
    else why not. The workspace's device and the other arguments are the caller's to
    check (``check_args``)."""
    if x.dtype not in _FLOATS:
        return f"dtype {x.dtype} is not bf16/fp16/fp32"
    if x.dim() == 0 or x.numel() == 0:
        return "empty message"
    h = x.shape[-1]
    if h > MAX_HIDDEN:
        return f"hidden size {h} > {MAX_HIDDEN}"
    if plan is not None:
        if plan.ag != plan.rs:
            return "a two-stage codec (one-shot has one stage)"
        if plan.rs.kind != KIND_BF16 and h % plan.rs.group:
            return f"hidden size {h} is not a multiple of the group size {plan.rs.group}"
    need = (x.numel() // h) * _row_bytes(h, x.element_size(), plan)
    if need > ws.layout.oneshot_slot:
        return f"{need} B of rows > the {ws.layout.oneshot_slot} B slot"
    return None


def check_args(x: torch.Tensor, residual: torch.Tensor, *weights) -> Optional[str]:
    """None if ``residual`` and the per-channel ``weights`` (norm weights, bias; None
    skipped) fit ``x`` as the kernel reads them (same dtype and device, ``[H]``)."""
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        return (f"residual {tuple(residual.shape)} {residual.dtype} does not match the "
                f"message {tuple(x.shape)} {x.dtype}")
    for w in weights:
        if w is not None and (w.shape != x.shape[-1:] or w.dtype != x.dtype
                              or w.device != x.device):
            return f"a weight {tuple(w.shape)} {w.dtype} does not match [{x.shape[-1]}] {x.dtype}"
    return None


def all_reduce_add_rmsnorm(ws: SymmWorkspace, x: torch.Tensor, residual: torch.Tensor,
                           norm_weight: Optional[torch.Tensor], eps: float, *,
                           offset: float = 0.0, scale_in_fp32: bool = False,
                           sandwich: bool = False,
                           post_norm_weight: Optional[torch.Tensor] = None,
                           bias: Optional[torch.Tensor] = None,
                           plan: Optional[KernelPlan] = None
                           ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(residual', normed)`` over the workspace's ranks in one launch (module
    docstring); ``normed`` None without ``norm_weight``. ``plan`` None: the raw one-shot
    sum; else the one-shot quantized sum with ``plan.rs`` (and its maps)."""
    why = unsupported(ws, x, plan) or check_args(x, residual, norm_weight, post_norm_weight,
                                                 bias)
    if why is None and sandwich != (post_norm_weight is not None):
        why = "the sandwich layout takes a post_norm_weight, the pre-norm layout none"
    if why is None and x.device != ws.device:
        why = f"tensor on {x.device}, workspace on {ws.device}"
    if why is not None:
        raise ValueError(f"fused all-reduce + add + RMSNorm: {why}")
    x, residual = x.contiguous(), residual.contiguous()
    h = x.shape[-1]
    rows = x.numel() // h
    res_out = torch.empty_like(residual)
    normed = torch.empty_like(residual) if norm_weight is not None else None
    block = triton.next_power_of_2(h)
    lay = ws.layout
    if plan is None:
        kc, ng, g = None, 1, block
        codec = dict(KIND=0, BITS=16, QMAX=0, C2=0.0, PAY=0)
        rot, scale = None, None
    else:
        kc, rot, scale = plan.rs, plan.rot, plan.scale
        g = kc.group if kc.kind != KIND_BF16 else block
        ng = block // g
        codec = dict(**kc.constexprs(), PAY=kc.nbytes(block) - 2 * kc.n_meta * ng)
        if scale is not None and (scale.dtype != torch.float32 or scale.device != x.device
                                  or scale.numel() != h):
            raise ValueError("scale must be fp32 [H] on the message's device")
    log2g, rscale = geometry(rot)
    lim = out_limit(x.dtype)
    dummy = res_out                      # never read where its flag is off
    opts = launch_opts()
    _all_reduce_add_rmsnorm_kernel[(grid_size(x.device),)](
        x, residual, bias if bias is not None else dummy,
        post_norm_weight if post_norm_weight is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        scale if scale is not None else ws.status, res_out,
        normed if normed is not None else dummy,
        ws.buffer, ws.counter_rows[2], ws.status, *ws.kernel_deltas,
        rows, h, float(h), ws.rank, lay.flag_off, lay.norm_off, lay.oneshot_slot,
        _row_bytes(h, x.element_size(), plan), float(eps), float(offset), rscale,
        W=ws.world, MAXB=MAX_BLOCKS, BLOCK=block, NG=ng, G=g, RAW=plan is None, **codec,
        KEEP_INF=kc is not None and kc.kind == KIND_BF16 and rot is None,
        ROT=rot is not None, LOG2G=log2g, HAS_S=scale is not None,
        LIM_PRE=BF16_MAX if scale is not None else lim, OUT_LIM=lim,
        HAS_BIAS=bias is not None, SANDWICH=sandwich, HAS_NORM=norm_weight is not None,
        SCALE_FP32=bool(scale_in_fp32), OFFSET_W=not scale_in_fp32 and offset != 0,
        FLAG_ROW=NORM_FLAG_ROW, SPIN=SPIN_LIMIT,
        num_warps=4 if block <= 2048 else (8 if block <= 8192 else 16), **opts)
    return res_out, normed
