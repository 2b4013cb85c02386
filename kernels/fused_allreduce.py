"""Fused intra-node all-reduce kernels over a symmetric workspace (``workspace.py``).

one-shot (small messages, bf16/fp16/fp32 as given; on a GPU its CUDA C++ twin in
    kernels/csrc/two_shot.cu runs instead, same protocol and bits, launched through the
    extension rather than Triton's Python launcher: with the Triton kernel the whole
    eager call took 44 us of host time, docs/notebook/2026-12-05.md)
    One launch, one barrier. Block b stores its tile of the input into slot [parity][me] of
    every rank, release-signals flag [parity][me][b] on every rank, acquires the W flags
    [parity][*][b] of its own rank, and sums the W slots in fp32 in rank order 0..W-1.
    The parity (epoch & 1) double-buffers the slots: a fast rank can start call k+1 while
    a slow one still reads call k, but it cannot start call k+2 before the slow rank has
    written its call-k+1 data, which it does only after finishing call k.

two-shot quantized (every group codec, and bf16 pass-through) -- see ``two_shot``; for
    bf16 messages and the codecs of kernels/codec_cuda.py, its CUDA C++ twin
    (kernels/csrc/two_shot.cu: same protocol, same bits) runs instead.

Both kernels read only on-device epochs, take no host syncs, and can be captured in a
CUDA graph; every rank decodes the same bytes in the same order, so ranks agree bitwise.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from . import codec_cuda, maps, quant, sync
from .calls import BF16_MAX, geometry, out_limit
from .config import INTERPRET, KernelPlan, kernel_config, launch_opts
from .thresholds import blocks_per_sm
from .workspace import MAX_BLOCKS, ONESHOT_BLOCK_ELEMS, ONESHOT_MAX_BLOCKS, SymmWorkspace

# ~tens of seconds of polling on a GPU (a peer still compiling its first call must not
# trip it); far fewer polls under the (slow) interpreter (config.py).
SPIN_LIMIT = kernel_config().spin_limit

_TORCH_TO_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@functools.lru_cache(maxsize=None)   # on every eager call's path: a dict lookup, not a query
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


# Triton specialises int arguments equal to 1: ``rank`` must not be, or rank 1 would compile
# its own variant. N stays specialised: its divisibility by 16 is what lets masked loads
# and stores be 16 bytes wide (and every rank sees the same N).
@triton.jit(do_not_specialize=["rank"])
def _one_shot_kernel(x_ptr, out_ptr, ws_ptr, cnt_ptr, status_ptr,
                     d0, d1, d2, d3, d4, d5, d6, d7,
                     N, rank, flag_off, data_off, slot_bytes,
                     W: tl.constexpr, MAXB: tl.constexpr, BLOCK: tl.constexpr,
                     SPIN: tl.constexpr):
    b = tl.program_id(0)
    epoch = tl.load(cnt_ptr + b) + 1
    par = epoch & 1
    offs = b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)   # moved as raw bits: no rounding
    elt = x_ptr.dtype.element_ty
    my_slot = data_off + (par * W + rank) * slot_bytes
    for j in tl.static_range(W):
        dst = (sync.peer_base(ws_ptr, j, d0, d1, d2, d3, d4, d5, d6, d7) + my_slot)
        tl.store(dst.to(tl.pointer_type(elt), bitcast=True) + offs, x, mask=mask)
    sync.block_barrier(ws_ptr, d0, d1, d2, d3, d4, d5, d6, d7, flag_off, par, rank, b, epoch,
                       status_ptr, W, MAXB, SPIN)
    # Fixed summation order 0..W-1 in fp32: every rank computes the same bits.
    base = ws_ptr + data_off + (par * W) * slot_bytes
    acc = quant.load_f32(base.to(tl.pointer_type(elt), bitcast=True), offs, mask)
    for src in tl.static_range(1, W):
        p = (base + src * slot_bytes).to(tl.pointer_type(elt), bitcast=True)
        acc += quant.load_f32(p, offs, mask)
    tl.store(out_ptr + offs, quant.cast_out(acc, out_ptr.dtype.element_ty), mask=mask)
    tl.store(cnt_ptr + b, epoch)


def one_shot_block(n: int, device: torch.device) -> int:
    """Elements per block: enough blocks to spread the copy over the SMs, at least 512
    elements (1 KB bf16) and at most ONESHOT_BLOCK_ELEMS per block."""
    sms = _num_sms(device)
    block = 512
    while block < ONESHOT_BLOCK_ELEMS and -(-n // block) > sms:   # triton.cdiv: µs of host
        block *= 2
    return block


def one_shot_grid(ws: SymmWorkspace, device: torch.device) -> int:
    """The one-shot grid: the same for every message of a workspace, at least
    ``cdiv(n, one_shot_block(n))`` for any message it takes; blocks past the message only
    meet at the barrier. A fixed grid keeps every block's epoch, hence its parity, equal
    to the others': with a grid that grew from one call to the next, a new block starts
    at epoch 1 and may write the parity-1 slots a slow peer is still reading for the
    previous call, at offsets that another block size put elsewhere. At most
    ONESHOT_MAX_BLOCKS blocks (resident at once: they wait at a barrier), which cover
    every message the workspace takes (WorkspaceLayout.make checks its size)."""
    most = -(-(ws.layout.oneshot_max_bytes // 2) // ONESHOT_BLOCK_ELEMS)   # bf16, largest block
    return min(ONESHOT_MAX_BLOCKS, max(_num_sms(device), most))


def _check_one_shot_size(ws: SymmWorkspace, x: torch.Tensor) -> None:
    nbytes = x.numel() * x.element_size()
    if nbytes > ws.layout.oneshot_max_bytes:
        raise ValueError(f"one-shot all-reduce takes at most {ws.layout.oneshot_max_bytes} bytes, "
                         f"got {nbytes}")


def one_shot_all_reduce(ws: SymmWorkspace, x: torch.Tensor, out: torch.Tensor = None) -> torch.Tensor:
    """Sum ``x`` over the workspace's ranks with the one-shot kernel (one launch)."""
    x = x.contiguous()
    n = x.numel()
    _check_one_shot_size(ws, x)
    if out is None:
        out = torch.empty_like(x)
    block = one_shot_block(n, x.device)
    grid = one_shot_grid(ws, x.device)
    if codec_cuda.takes_one_shot(x) and out.is_contiguous():
        return codec_cuda.one_shot_all_reduce(ws, x, out, block, grid, SPIN_LIMIT)
    lay = ws.layout
    _one_shot_kernel[(grid,)](
        x, out, ws.buffer, ws.counter_rows[0], ws.status, *ws.kernel_deltas,
        n, ws.rank, lay.flag_off, lay.oneshot_off, lay.oneshot_slot,
        W=ws.world, MAXB=MAX_BLOCKS, BLOCK=block, SPIN=SPIN_LIMIT, num_warps=4)
    return out


Launcher = Callable[[torch.Tensor], torch.Tensor]


def one_shot_launcher(ws: SymmWorkspace, x: torch.Tensor) -> Launcher:
    """``one_shot_all_reduce(ws, ·)`` for messages of ``x``'s length and dtype on the
    workspace's device, with what depends on those alone (block, grid, the bound CUDA
    launch) worked out once: a call allocates its output and launches. The communicator's
    backends keep one per kind of message (comm/fused.py); an eager call's host time is
    what tools/bench_allreduce.py --host-overhead measures."""
    n = x.numel()
    _check_one_shot_size(ws, x)
    if not codec_cuda.takes_one_shot(x):
        return functools.partial(one_shot_all_reduce, ws)
    return codec_cuda.OneShotLaunch(ws, n, x.dtype, one_shot_block(n, x.device),
                                    one_shot_grid(ws, x.device), SPIN_LIMIT).fresh


# ----------------------------------------------------------------------------- two-shot
# A stored tile is [payload PAY B][meta0 NG x bf16][meta1 NG x bf16] (quant.encode_tile);
# for a code of two bit planes (int3 = 2 + 1, int5 = 4 + 1 bits) the high plane starts
# TILE * P0 / 8 bytes into the payload, P0 the low plane's width (BITS less its lowest set
# bit; unused by the one-plane codes).
@triton.jit
def put_tile(x, dst, gall, PAY: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
              KIND: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr, C2: tl.constexpr):
    """Encode the fp32 tile x [NG, G] into the stored tile at byte address ``dst``."""
    P1OFF: tl.constexpr = NG * G * (BITS - (BITS & -BITS)) // 8
    m0 = (dst + PAY).to(tl.pointer_type(tl.uint16), bitcast=True)
    quant.encode_tile(x, dst, P1OFF, m0, m0 + NG, gall, NG, G, KIND, BITS, QMAX, C2)


@triton.jit
def get_tile(src, gall, LIM: tl.constexpr, PAY: tl.constexpr, NG: tl.constexpr,
              G: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr, QMAX: tl.constexpr):
    """Decode the stored tile at byte address ``src`` into fp32 [NG, G]."""
    P1OFF: tl.constexpr = NG * G * (BITS - (BITS & -BITS)) // 8
    m0 = (src + PAY).to(tl.pointer_type(tl.uint16), bitcast=True)
    return quant.decode_tile(src, P1OFF, m0, m0 + NG, gall, LIM, NG, G, KIND, BITS, QMAX)


@triton.jit(do_not_specialize=["rank"])
def _two_shot_kernel(x_ptr, out_ptr, ws_ptr, cnt_ptr, status_ptr,
                     d0, d1, d2, d3, d4, d5, d6, d7,
                     N, rank, chunk, tiles, flag_off, recv_off, gather_off, slot,
                     W: tl.constexpr, MAXB: tl.constexpr, NG: tl.constexpr, G: tl.constexpr,
                     RKIND: tl.constexpr, RBITS: tl.constexpr, RQMAX: tl.constexpr,
                     RC2: tl.constexpr, AKIND: tl.constexpr, ABITS: tl.constexpr,
                     AQMAX: tl.constexpr, AC2: tl.constexpr, R_PAY: tl.constexpr,
                     R_TB: tl.constexpr, A_PAY: tl.constexpr, A_TB: tl.constexpr,
                     OUT_LIM: tl.constexpr, SPIN: tl.constexpr,
                     s_ptr, H, RSCALE, ROT: tl.constexpr, LOG2G: tl.constexpr,
                     HAS_S: tl.constexpr, LIM_ROT: tl.constexpr, FLIM: tl.constexpr):
    """Quantized two-shot all-reduce in one launch (see ``two_shot_all_reduce``)."""
    # Each stage's stored tiles (put_tile) take R_TB / A_TB bytes (from the host).
    TILE: tl.constexpr = NG * G
    BIG: tl.constexpr = 3.3895313892515355e38   # stage-1 decodes saturate at BF16_MAX, as the reference

    b = tl.program_id(0)
    nb = tl.num_programs(0)
    epoch = tl.load(cnt_ptr + b) + 1
    gi = tl.arange(0, NG)
    gall = gi < NG
    lane = gi[:, None] * G + tl.arange(0, G)[None, :]
    my_slot = rank * slot

    # 1. quantize chunk j's tiles of this block and store them in rank j's recv[me]
    for t in range(b, tiles, nb):
        for j in tl.static_range(W):
            offs = j * chunk + t * TILE + lane
            x = quant.load_f32(x_ptr, offs, offs < N)
            if HAS_S:                       # weighted-: fl32(x) * s, zeros past N stay 0
                x = x * tl.load(s_ptr + offs % H, mask=offs < N, other=1.0)
            if ROT:                         # hadamard-: a tile is NG whole groups
                x = maps.fwht_tile(x, NG, G, LOG2G, RSCALE)
            dst = (sync.peer_base(ws_ptr, j, d0, d1, d2, d3, d4, d5, d6, d7)
                   + recv_off + my_slot + t * R_TB)
            put_tile(x, dst, gall, R_PAY, NG, G, RKIND, RBITS, RQMAX, RC2)
    sync.block_barrier(ws_ptr, d0, d1, d2, d3, d4, d5, d6, d7, flag_off, 2, rank, b, epoch,
                       status_ptr, W, MAXB, SPIN)

    # 2. reduce my chunk: decode every rank's copy, sum in rank order, requantize, and
    #    store the result in every rank's gather[me] (mine included: all decode it)
    for t in range(b, tiles, nb):
        src0 = ws_ptr + recv_off + t * R_TB
        acc = get_tile(src0, gall, BIG, R_PAY, NG, G, RKIND, RBITS, RQMAX)
        for s in tl.static_range(1, W):
            acc += get_tile(src0 + s * slot, gall, BIG, R_PAY, NG, G, RKIND, RBITS, RQMAX)
        for j in tl.static_range(W):
            dst = (sync.peer_base(ws_ptr, j, d0, d1, d2, d3, d4, d5, d6, d7)
                   + gather_off + my_slot + t * A_TB)
            put_tile(acc, dst, gall, A_PAY, NG, G, AKIND, ABITS, AQMAX, AC2)
    sync.block_barrier(ws_ptr, d0, d1, d2, d3, d4, d5, d6, d7, flag_off, 3, rank, b, epoch,
                       status_ptr, W, MAXB, SPIN)

    # 3. decode every owner's reduced tiles into the output
    for t in range(b, tiles, nb):
        for o in tl.static_range(W):
            p = ws_ptr + gather_off + o * slot + t * A_TB
            y = get_tile(p, gall, OUT_LIM, A_PAY, NG, G, AKIND, ABITS, AQMAX)
            offs = o * chunk + t * TILE + lane
            if ROT:                         # back from the rotated basis (whole groups)
                y = maps.clamp(maps.fwht_tile(y, NG, G, LOG2G, RSCALE), LIM_ROT)
            if HAS_S:
                s = tl.load(s_ptr + offs % H, mask=offs < N, other=1.0)
                y = maps.clamp(tl.math.div_rn(y, s), FLIM)
            tl.store(out_ptr + offs, quant.cast_out(y, out_ptr.dtype.element_ty), mask=offs < N)
    tl.store(cnt_ptr + b, epoch)


TWO_SHOT_TILES = (4096, 2048, 1024, 512)


# Blocks per SM for the two-shot grid: the caller's override, else MEGATRON_LITE_BLOCKS_PER_SM
# (config.py), else by message size from the measured table (thresholds.py); the launch
# caps it at the blocks resident at once (_resident_blocks, codec_cuda's kernels alike).
# The grid does not change the bytes (every tile is coded alike whichever block owns it;
# tests/gpu/sweep_grid.py checks 1 to 8 blocks per SM bitwise).
@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=4096)     # a few µs of host time per eager call, once per shape
def two_shot_plan(n: int, world: int, group: int, device: torch.device, nbytes: int = 0,
                  mapped: bool = False, bpsm: Optional[int] = None,
                  tile_sizes=TWO_SHOT_TILES):
    """(tile, chunk, tiles, grid): the largest of ``tile_sizes`` that still gives every SM
    a tile; up to ``bpsm`` blocks per SM (default: the configured or measured figure for
    an ``nbytes`` message, with or without the maps of a ``hadamard-``/``weighted-``
    codec) share the tiles. Cached: every input is a value, and the figures it reads (SM
    count, measured tables, the kernel configuration) are fixed per process."""
    sms = min(_num_sms(device), MAX_BLOCKS)
    per_rank = -(-n // world)
    tile = tile_sizes[-1]
    for cand in tile_sizes:
        if cand >= group and -(-per_rank // cand) >= sms:
            tile = cand
            break
    tile = max(tile, group)
    chunk = -(-per_rank // tile) * tile
    tiles = chunk // tile
    bpsm = (bpsm or kernel_config().blocks_per_sm
            or blocks_per_sm(_device_name(device), world, nbytes, mapped))
    return tile, chunk, tiles, min(tiles, bpsm * _num_sms(device), MAX_BLOCKS)


def _cuda_geometry(ws: SymmWorkspace, x: torch.Tensor, plan: KernelPlan,
                   bpsm: Optional[int] = None):
    """``two_shot_plan`` of ``x`` over the CUDA two-shot kernel's tile sizes."""
    n = x.numel()
    return two_shot_plan(n, ws.world, plan.group, x.device, n * x.element_size(), plan.mapped,
                         bpsm, codec_cuda.TWO_SHOT_TILES)


# Blocks of _two_shot_kernel the device holds at once, per compiled variant: a block waits
# for the blocks of its index on the other ranks, which only a resident grid guarantees
# to have started (CUDA does not promise dispatch in index order: csrc/peers.cuh caps the
# CUDA kernels' grids alike). Keyed by what Triton compiles a variant for: the device, the
# constexprs and options by value, and of the runtime arguments their dtypes, an int's
# divisibility by 16 and equality to 1, a pointer's 16-byte alignment (``rank`` is not
# specialised). The grid does not change the bytes (see above); it must be the same on
# every rank, which it is: the ranks launch one variant (same constexprs, pointers aligned
# by two_shot_all_reduce) on devices of one kind.
_RESIDENT = {}


_DELTA_ARGS = tuple(f"d{j}" for j in range(8))


def _spec(a):
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return a
    if isinstance(a, int):
        return a % 16 == 0, a == 1
    return type(a)


def _resident_blocks(device: torch.device, run: dict, const: dict) -> Optional[int]:
    """The resident blocks of the variant that ``run`` and ``const`` launch, or None
    where it was not compiled here (a cache hook)."""
    key = (device.index, tuple(const.items()),
           tuple((k, _spec(v)) for k, v in run.items() if k != "rank"))
    cap = _RESIDENT.get(key)
    if cap is None:
        kernel = _two_shot_kernel.warmup(grid=(1,), **run, **const)
        if kernel is None:
            return None
        kernel._init_handles()
        cap = _RESIDENT[key] = _num_sms(device) * _occupancy(
            kernel.function, kernel.metadata.num_warps * 32, kernel.metadata.shared)
    return cap


def _launch_key(plan: KernelPlan, n: int, dtype: torch.dtype, out_dtype: torch.dtype):
    """What picks the variant of a Triton two-shot launch on one workspace, once x and
    out lie on 16-byte boundaries: the codecs and the rotation (constexprs), the message
    length (chunk and tile geometry), the dtypes, and of the channel scales only what
    Triton specialises on (their count, their pointer's alignment). Plain values only: a
    plan's tensors compare element-wise, which a dict lookup cannot take (dataclass
    ``__eq__`` compares field by field from Python 3.13)."""
    s = plan.scale
    return (plan.rs, plan.ag, plan.rot,
            None if s is None else (s.numel(), s.data_ptr() % 16 == 0), n, dtype, out_dtype)


def _grid_cap(ws: SymmWorkspace, key, run: dict, const: dict) -> int:
    """The most blocks of a two-shot launch that are resident at once (its flags spin,
    so a block that waits for one not yet scheduled would hang), looked up per workspace
    by ``key`` (``_launch_key``): the full variant key of ``_resident_blocks`` costs about
    10 us of host time per eager call, this lookup about 1 us."""
    cap = ws.two_shot_caps.get(key)
    if cap is None:
        cap = _resident_blocks(run["x_ptr"].device, run, const)
        if cap is None:   # not compiled here: one block per SM is resident
            return _num_sms(run["x_ptr"].device)
        if len(ws.two_shot_caps) >= 4096:   # bounded, as two_shot_plan's cache
            ws.two_shot_caps.clear()
        ws.two_shot_caps[key] = cap
    return cap


def _occupancy(function: int, threads: int, smem: int) -> int:
    """Blocks of a loaded kernel (``CUfunction``) resident per SM, from the driver's
    occupancy calculator (``cuOccupancyMaxActiveBlocksPerMultiprocessor``)."""
    import ctypes
    per_sm = ctypes.c_int(0)
    rc = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(per_sm), ctypes.c_void_p(function), ctypes.c_int(threads),
        ctypes.c_size_t(smem))
    if rc != 0 or per_sm.value < 1:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor: error {rc}, "
                           f"{per_sm.value} blocks of {threads} threads per SM")
    return per_sm.value


def two_shot_all_reduce(ws: SymmWorkspace, x: torch.Tensor, plan: KernelPlan,
                        out: torch.Tensor = None, _warmup_only: bool = False,
                        bpsm: Optional[int] = None) -> torch.Tensor:
    """Quantized sum over the workspace's ranks in ONE kernel launch.

    ``plan`` (config.KernelPlan, from the scheme's ``kernel_plan``): the wire codecs of
    the two stages and the maps around them. ``plan.rot`` / ``plan.scale`` (the
    ``hadamard-`` / ``weighted-`` codecs): stage 1 scales the loaded fp32 tile by
    ``scale`` (on the last dim, ``scale.numel()`` channels) and rotates each group of
    ``rot`` values; step 3 rotates back, saturates, divides by ``scale`` and saturates
    again, exactly as comm/codecs/hadamard.py and weighted.py do around the two-step
    path (kernels/maps.py; the CUDA kernel multiplies by ``plan.inv_scale`` where that
    rounds to the same bf16 value: csrc/codec_weighted.cuh's ``Unscale``). The sum in
    between runs in the mapped basis. ``bpsm`` overrides the grid's blocks per SM (sweeps
    and tests; same bytes at any grid).

    Block b of every rank owns tiles b, b+grid, ... of every chunk (chunk j = values
    ``[j*chunk, (j+1)*chunk)``, reduced by rank j):

    1. quantize the tiles of each chunk j with ``plan.rs`` and store them into rank j's
       ``recv[me]``; barrier, release flag (2, me, b) on every rank; acquire the W flags
       (2, *, b) of its own rank;
    2. decode ``recv[0..W-1]`` of its tiles, sum in fp32 in rank order, requantize with
       ``plan.ag`` and store into every rank's ``gather[me]``; flags (3, *, b) likewise;
    3. decode ``gather[0..W-1]`` into the output.

    Flags are per block, so no grid-wide barrier is needed: block b only ever waits for
    the blocks b of the other ranks. Group boundaries fall on the same global indices as
    in ``comm/algorithms.py``'s ``two_step_all_reduce`` (chunks are padded to whole tiles instead of
    whole groups, with zeros), so the result equals it bit for bit.
    """
    rs, ag, rot, scale = plan.rs, plan.ag, plan.rot, plan.scale
    group = plan.group
    x = x.contiguous()
    n = x.numel()
    if out is None:
        out = torch.empty_like(x)
    if n == 0:
        return out
    mapped = plan.mapped
    if codec_cuda.takes_two_shot(plan, x):   # the CUDA C++ kernel: same protocol and bits
        if _warmup_only:
            codec_cuda.build()
            return out
        geo = _cuda_geometry(ws, x, plan, bpsm)
        return codec_cuda.two_shot_all_reduce(ws, x, plan, out, *geo, SPIN_LIMIT)
    tile, chunk, tiles, grid = two_shot_plan(n, ws.world, group, x.device,
                                              n * x.element_size(), mapped, bpsm)
    need = tiles * max(rs.nbytes(tile), ag.nbytes(tile))
    if need > ws.layout.slot:
        raise ValueError(f"message of {n} values needs {need} B per rank slot, workspace has "
                         f"{ws.layout.slot} B")
    lay = ws.layout
    lim = out_limit(x.dtype)
    codec_cuda.check_scale(scale, x.device, n)
    log2g, rscale = geometry(rot)
    # pointers on 16-byte boundaries, whatever the caller's views: the variant Triton
    # compiles, and with it the grid (_resident_blocks), must not differ between ranks
    if x.data_ptr() % 16:
        x = x.clone()
    dst = out if out.data_ptr() % 16 == 0 else torch.empty_like(x)
    run = dict(x_ptr=x, out_ptr=dst, ws_ptr=ws.buffer, cnt_ptr=ws.counter_rows[1],
               status_ptr=ws.status, **dict(zip(_DELTA_ARGS, ws.kernel_deltas)),
               N=n, rank=ws.rank, chunk=chunk, tiles=tiles, flag_off=lay.flag_off,
               recv_off=lay.recv_off, gather_off=lay.gather_off, slot=lay.slot,
               s_ptr=scale if scale is not None else ws.status,
               H=scale.numel() if scale is not None else 1, RSCALE=rscale)
    const = dict(
        W=ws.world, MAXB=MAX_BLOCKS, NG=tile // group, G=group,
        **rs.constexprs("R"), **ag.constexprs("A"),
        R_PAY=rs.nbytes(tile) - 2 * rs.n_meta * (tile // group), R_TB=rs.nbytes(tile),
        A_PAY=ag.nbytes(tile) - 2 * ag.n_meta * (tile // group), A_TB=ag.nbytes(tile),
        # mapped: decode as the fp32 reference does (bf16-range saturation), then the maps
        OUT_LIM=BF16_MAX if mapped else lim, SPIN=SPIN_LIMIT, ROT=rot is not None,
        LOG2G=log2g, HAS_S=scale is not None,
        LIM_ROT=BF16_MAX if scale is not None else lim, FLIM=lim,
        num_warps=8 if tile >= 4096 else 4, **launch_opts())
    if _warmup_only:
        _two_shot_kernel.warmup(grid=(grid,), **run, **const)
        return out
    if not INTERPRET:   # interpreted, blocks run one at a time in index order: any grid
        grid = min(grid, _grid_cap(ws, _launch_key(plan, n, x.dtype, dst.dtype), run, const))
    _two_shot_kernel[(grid,)](**run, **const)
    if dst is not out:
        out.copy_(dst)
    return out


def two_shot_launcher(ws: SymmWorkspace, x: torch.Tensor, plan: KernelPlan) -> Launcher:
    """``two_shot_all_reduce(ws, ·, plan)`` for messages of ``x``'s length and dtype, set
    up once as ``one_shot_launcher``: on the CUDA kernel the geometry and every argument
    but the data pointers are bound (``codec_cuda.TwoShotLaunch``)."""
    n = x.numel()
    if n == 0 or not codec_cuda.takes_two_shot(plan, x):
        return lambda y: two_shot_all_reduce(ws, y, plan)
    return codec_cuda.TwoShotLaunch(ws, plan, n, x.dtype, *_cuda_geometry(ws, x, plan),
                                    SPIN_LIMIT).fresh


# ------------------------------------------------------------------ one-shot, quantized
def one_shot_q_geometry(ws: SymmWorkspace, n: int, plan: KernelPlan, device: torch.device):
    """(tile, tiles, grid) of csrc/one_shot_q.cu's kernel for a message
    of ``n`` values (the two-shot kernel's geometry for one chunk of the whole message:
    the largest tile that still gives every SM a tile), or None where the whole coded
    message does not fit a ``recv`` slot. The same on every rank."""
    tile, _, tiles, grid = two_shot_plan(n, 1, plan.group, device, 2 * n, plan.mapped,
                                         tile_sizes=codec_cuda.TWO_SHOT_TILES)
    if tiles * plan.rs.nbytes(tile) > ws.layout.slot:
        return None
    return tile, tiles, grid


def one_shot_q_launcher(ws: SymmWorkspace, x: torch.Tensor, plan: KernelPlan
                        ) -> Optional["codec_cuda.OneShotQLaunch"]:
    """The one-launch one-shot quantized all-reduce of messages like ``x`` with ``plan``
    (``codec_cuda.OneShotQLaunch``: ``launch(x, out[, err])``), or None where it does not
    run them: not a bf16 CUDA message of whole 8-value chunks with a codec of codec.cu
    (``codec_cuda.takes_two_shot``), or a coded message above a ``recv`` slot. Every
    rank decides alike."""
    if x.numel() == 0 or not codec_cuda.takes_two_shot(plan, x):
        return None
    geo = one_shot_q_geometry(ws, x.numel(), plan, x.device)
    if geo is None:
        return None
    return codec_cuda.OneShotQLaunch(ws, plan, x.numel(), *geo, SPIN_LIMIT)


def prewarm(ws: SymmWorkspace, plans, numels, dtype=torch.bfloat16, oneshot: bool = True) -> int:
    """Compile every kernel variant that ``numels`` x ``plans`` (KernelPlans) will launch,
    splitting the variants over the ranks (rank r compiles variants r, r+W, ...) so W
    processes do not all compile the same kernels; a ``dist.barrier`` afterwards lets every rank load the
    rest from Triton's on-disk cache. Returns how many variants this rank compiled."""
    import torch.distributed as dist
    x = torch.empty(max(numels), dtype=dtype, device=ws.device)
    jobs = {}
    for n in numels:
        if oneshot and n * x.element_size() <= ws.layout.oneshot_max_bytes:
            jobs[("oneshot", one_shot_block(n, x.device))] = ("oneshot", n, None)
        for plan in plans:
            tile = two_shot_plan(n, ws.world, plan.group, x.device)[0]
            jobs[(repr((plan.rs, plan.ag)), tile)] = ("two", n, plan)
    done = 0
    saved = ws.counters.clone()
    for i, (_, (kind, n, plan)) in enumerate(sorted(jobs.items(), key=lambda kv: str(kv[0]))):
        if i % ws.world != ws.rank:
            continue
        done += 1
        xs = x[:n]
        if kind == "oneshot" and codec_cuda.takes_one_shot(xs):
            codec_cuda.build()   # csrc/two_shot.cu's one-shot kernel runs instead
        elif kind == "oneshot":
            block = one_shot_block(n, x.device)
            _one_shot_kernel.warmup(
                xs, xs, ws.buffer, ws.counter_rows[0], ws.status, *ws.kernel_deltas,
                n, ws.rank, ws.layout.flag_off, ws.layout.oneshot_off, ws.layout.oneshot_slot,
                W=ws.world, MAXB=MAX_BLOCKS, BLOCK=block, SPIN=SPIN_LIMIT, num_warps=4,
                grid=(1,))
        else:
            two_shot_all_reduce(ws, xs, plan, out=xs, _warmup_only=True)
    ws.counters.copy_(saved)
    if dist.is_initialized():
        dist.barrier()
    return done
