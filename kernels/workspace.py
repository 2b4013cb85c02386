"""Symmetric workspaces for the fused all-reduce kernels.

A ``SymmWorkspace`` is one byte buffer per rank of a process group, allocated so that every
rank can load from and store to every peer's buffer with ordinary pointers:

* on CUDA it is a ``torch.distributed._symmetric_memory`` tensor (P2P over NVLink); the
  peer addresses come from the rendezvous handle's ``buffer_ptrs``;
* on CPU (tests only) it is a ``/dev/shm`` file per rank, mapped by every rank; the Triton
  interpreter (``TRITON_INTERPRET=1``) then runs the *same* kernels over it, spin-waits
  on flags written by other processes included.

Kernels never see absolute peer addresses. They get the local buffer as a tensor argument
and, for each peer r, the byte distance ``delta[r] = buffer_ptrs[r] - local_ptr`` as a
plain int argument. Triton specialises int arguments that are multiples of 16, so
``ws_ptr + delta[r]`` keeps the 16-byte alignment that an int-to-pointer cast would lose,
and stores to peers stay 16 bytes wide.

Layout of every rank's buffer (byte offsets, all 256-aligned)::

    flags    int32 [6][W][MAX_BLOCKS]   0/1: one-shot, epoch parity 0/1
                                        2: two-shot reduce-scatter, 3: two-shot all-gather
                                        4/5: all-reduce + add + RMSNorm, epoch parity 0/1
                                        flags[k][src][b] is written by rank src's block b
    oneshot  [2][W][oneshot_slot]       one-shot data, slot [parity][src]
    norm     [2][W][oneshot_slot]       all-reduce + add + RMSNorm data, slot [parity][src]
    recv     [W][slot]                  two-shot: rank src's quantized copy of my chunk
    gather   [W][slot]                  two-shot: rank owner's requantized reduced chunk

Per-call epochs live ON DEVICE, in ``counters`` (int32 [3][MAX_BLOCKS], ordinary local
memory; row k for kernel k: one-shot, two-shot, all-reduce + add + RMSNorm): block b of
a launch reads ``counters[k][b]``, uses ``epoch = value + 1`` for every
flag it writes or waits for, and writes ``epoch`` back when done. Nothing on the host
changes between calls, so a launch can be captured in a CUDA graph and replayed. All
ranks issue the same sequence of calls, so block b's epoch is the same on every rank
even when the grid size changes from call to call. ``status`` holds an error word that a
kernel sets when a flag wait times out (a dead peer), instead of hanging forever.
"""
from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

MAX_BLOCKS = 1024         # flags per (stage, source rank); the grid never exceeds it
# The one-shot bf16 kernel's grid (fused_allreduce.one_shot_grid): its blocks wait for
# their peers at a barrier, so all must be resident at once, and the CUDA kernel refuses a
# grid the device cannot hold (5 blocks of 256 threads per SM: 660 on 132 SMs). A block
# owns at most ONESHOT_BLOCK_ELEMS values, so a one-shot message holds at most
# ONESHOT_MAX_BLOCKS * ONESHOT_BLOCK_ELEMS bf16 values: ONESHOT_MAX_BYTES (8 MiB).
ONESHOT_MAX_BLOCKS = 512
ONESHOT_BLOCK_ELEMS = 8192
ONESHOT_MAX_BYTES = ONESHOT_MAX_BLOCKS * ONESHOT_BLOCK_ELEMS * 2
MAX_WORLD = 8             # kernels take up to 8 peer deltas as scalar arguments
FLAG_ROWS = 6             # flag rows (module docstring): 2 one-shot, 2 two-shot, 2 norm
NORM_FLAG_ROW = 4         # first of the all-reduce + add + RMSNorm kernel's two rows
_ALIGN = 256
TWO_SHOT_TILE_CAP = 4096  # largest two-shot tile (elements): chunks are padded to it
# Added to every peer delta passed to a kernel (and subtracted inside, sync.peer_base):
# Triton types an int argument i32 or i64 by its value, and a delta of 0 (the own rank)
# must not change the compiled signature. A multiple of 16 keeps the alignment facts.
DELTA_BIAS = 1 << 40


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class WorkspaceUnavailable(RuntimeError):
    """Symmetric memory cannot be set up here (no CUDA, no P2P, world too large...)."""


@dataclass(frozen=True)
class WorkspaceLayout:
    world: int
    max_elems: int            # largest message (elements) the two-shot kernel accepts
    oneshot_max_bytes: int    # largest one-shot message in bytes
    flag_off: int
    oneshot_off: int
    oneshot_slot: int
    norm_off: int             # all-reduce + add + RMSNorm slots (oneshot_slot bytes each)
    recv_off: int
    gather_off: int
    slot: int                 # bytes per rank slot in recv / gather
    total: int

    @staticmethod
    def make(world: int, max_bytes: int, oneshot_max_bytes: int) -> "WorkspaceLayout":
        if not 1 <= world <= MAX_WORLD:
            raise WorkspaceUnavailable(f"fused all-reduce supports 1..{MAX_WORLD} ranks, not {world}")
        if oneshot_max_bytes > ONESHOT_MAX_BYTES:
            raise ValueError(f"one-shot messages of up to {oneshot_max_bytes} B asked for: the "
                             f"one-shot kernel takes at most {ONESHOT_MAX_BYTES} B "
                             f"({ONESHOT_MAX_BYTES >> 20} MiB)")
        max_elems = max(max_bytes // 2, 1)          # sized for bf16/fp16 messages
        # A chunk is padded to whole tiles; its worst-case encoding is 2 bytes per value
        # (the bf16 pass-through codec); group codecs need less (checked at launch).
        chunk = _round_up(-(-max_elems // world), TWO_SHOT_TILE_CAP)
        slot = _round_up(chunk * 2, _ALIGN)
        oneshot_slot = _round_up(max(oneshot_max_bytes, 16), _ALIGN)
        flag_off = 0
        oneshot_off = _round_up(flag_off + FLAG_ROWS * world * MAX_BLOCKS * 4, _ALIGN)
        norm_off = oneshot_off + 2 * world * oneshot_slot
        recv_off = norm_off + 2 * world * oneshot_slot
        gather_off = recv_off + world * slot
        total = gather_off + world * slot
        if total >= 2 ** 31:
            # kernels address the buffer with int32 byte offsets
            raise WorkspaceUnavailable(f"workspace of {total} B exceeds 2 GiB: lower max_bytes")
        return WorkspaceLayout(world, max_elems, oneshot_max_bytes, flag_off, oneshot_off,
                               oneshot_slot, norm_off, recv_off, gather_off, slot, total)


class SymmWorkspace:
    """One rank's view of a symmetric buffer: local tensor, peer byte deltas, epochs."""

    def __init__(self, buffer: torch.Tensor, peer_ptrs: List[int], rank: int,
                 layout: WorkspaceLayout, keepalive=None):
        self.buffer = buffer
        self.rank = rank
        self.world = layout.world
        self.layout = layout
        base = buffer.data_ptr()
        self.deltas = [p - base for p in peer_ptrs] + [0] * (MAX_WORLD - len(peer_ptrs))
        if any(d % 16 for d in self.deltas):
            raise WorkspaceUnavailable("peer buffers are not 16-byte aligned")
        self.kernel_deltas = [d + DELTA_BIAS for d in self.deltas]
        self.counters = torch.zeros(3, MAX_BLOCKS, dtype=torch.int32, device=buffer.device)
        self.status = torch.zeros(4, dtype=torch.int32, device=buffer.device)
        # Made once, not per call: indexing ``counters[k]`` builds a new view (microseconds
        # on every eager all-reduce). ``counter_rows[k]`` for the Triton launches (views),
        # the ``*_ptr`` addresses for the CUDA C++ ones.
        self.counter_rows = tuple(self.counters.unbind(0))
        self.counter_ptrs = tuple(c.data_ptr() for c in self.counter_rows)
        self.buffer_ptr, self.status_ptr = buffer.data_ptr(), self.status.data_ptr()
        # Grid caps of the Triton two-shot launches on this workspace, by what picks the
        # compiled variant once the workspace is fixed (fused_allreduce._launch_key): a
        # lookup here is ~1 µs, the variant's full key (_resident_blocks) ~10 µs of host
        # time per eager call.
        self.two_shot_caps = {}
        self._keepalive = keepalive

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def check(self) -> None:
        """Raise if a kernel timed out waiting for a peer (host sync: tests and tools only)."""
        if int(self.status[0].item()) != 0:
            raise RuntimeError("fused all-reduce: a flag wait timed out (a peer did not arrive); "
                               "the ranks' call sequences differ or a peer died")


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def cuda_workspace(group, max_bytes: int, oneshot_max_bytes: int,
                   device: Optional[torch.device] = None) -> SymmWorkspace:
    """Allocate and rendezvous a symmetric buffer over ``group`` (collective)."""
    if not torch.cuda.is_available():
        raise WorkspaceUnavailable("CUDA is not available")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    layout = WorkspaceLayout.make(world, max_bytes, oneshot_max_bytes)
    device = device or torch.device("cuda", torch.cuda.current_device())
    for peer in range(torch.cuda.device_count()):
        if peer != device.index and not torch.cuda.can_device_access_peer(device.index, peer):
            raise WorkspaceUnavailable(f"GPU {device.index} cannot access GPU {peer} (no P2P)")
    try:
        import torch.distributed._symmetric_memory as symm_mem
        if group is None:
            group = dist.group.WORLD
        with warnings.catch_warnings():
            # Needed on older torch, a deprecated no-op on newer ones.
            warnings.simplefilter("ignore")
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(group.group_name)
        buf = symm_mem.empty(layout.total, dtype=torch.uint8, device=device)
        buf[: layout.oneshot_off].zero_()          # flags start at epoch 0
        handle = symm_mem.rendezvous(buf, group.group_name)
        ptrs = [int(p) for p in handle.buffer_ptrs]
    except Exception as e:  # noqa: BLE001 - any failure means "use another backend"
        raise WorkspaceUnavailable(f"symmetric memory rendezvous failed: {e}") from e
    torch.cuda.synchronize(device)
    _barrier(group)  # no peer may write flags before every rank has zeroed its own
    return SymmWorkspace(buf, ptrs, rank, layout, keepalive=handle)


def shm_workspace(group, max_bytes: int, oneshot_max_bytes: int) -> SymmWorkspace:
    """CPU stand-in for symmetric memory (tests): one ``/dev/shm`` file per rank, each
    mapped by all ranks, so Triton-interpreted kernels can read and write peers."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    layout = WorkspaceLayout.make(world, max_bytes, oneshot_max_bytes)
    obj = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(obj, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    root = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"
    names = [os.path.join(root, f"megatron_lite_ws_{obj[0]}_{r}") for r in range(world)]
    with open(names[rank], "wb") as f:
        f.truncate(layout.total)                     # a sparse file reads as zeros
    _barrier(group)
    maps = [torch.from_file(n, shared=True, size=layout.total, dtype=torch.uint8) for n in names]
    _barrier(group)
    os.unlink(names[rank])                           # mappings outlive the name
    return SymmWorkspace(maps[rank], [m.data_ptr() for m in maps], rank, layout, keepalive=maps)
