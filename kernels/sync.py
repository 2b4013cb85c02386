"""Flag primitives shared by the fused all-reduce kernels.

Memory-model recipe (PTX ISA, "Memory Consistency Model"): a block's ordinary stores to a
peer become visible to that peer's loads when

1. every thread of the block has issued its stores and the block meets at a barrier
   (``tl.debug_barrier`` = ``bar.sync``), which makes them observed by the flag thread;
2. one thread then writes the flag with a *release* atomic at *system* scope (cumulative:
   it orders the stores that thread observed, i.e. the whole block's);
3. the reader polls the flag with an *acquire* atomic at system scope, and the block meets
   at a barrier before any thread loads the data.

Triton executes an atomic on a scalar pointer once per program and broadcasts the result,
so ``signal``/``wait`` below run on one thread and the barriers fan the order out.
"""
import triton
import triton.language as tl


@triton.jit
def peer_base(ws_ptr, j: tl.constexpr, d0, d1, d2, d3, d4, d5, d6, d7):
    """``ws_ptr`` shifted to rank j's buffer (j is static, so this is one add).

    The deltas arrive biased by DELTA_BIAS (workspace.py) so that they are always int64
    arguments, whatever their value: every rank then compiles the same kernel."""
    if j == 0:
        d = d0
    elif j == 1:
        d = d1
    elif j == 2:
        d = d2
    elif j == 3:
        d = d3
    elif j == 4:
        d = d4
    elif j == 5:
        d = d5
    elif j == 6:
        d = d6
    else:
        d = d7
    return ws_ptr + (d - 1099511627776)


@triton.jit
def signal(flag_byte_ptr, epoch):
    """Release-store ``epoch`` into a (possibly remote) int32 flag, system scope."""
    tl.atomic_xchg(flag_byte_ptr.to(tl.pointer_type(tl.int32), bitcast=True), epoch,
                   sem="release", scope="sys")


@triton.jit
def wait(flag_byte_ptr, epoch, status_ptr, SPIN: tl.constexpr):
    """Acquire-poll a local int32 flag until it equals ``epoch``.

    Gives up after SPIN polls and raises the workspace's error word instead of hanging
    (a peer that died or a call sequence that differs between ranks)."""
    p = flag_byte_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    v = tl.atomic_add(p, 0, sem="acquire", scope="sys")
    n = 0
    while (v != epoch) & (n < SPIN):
        v = tl.atomic_add(p, 0, sem="acquire", scope="sys")
        n += 1
    if v != epoch:
        tl.atomic_xchg(status_ptr, 1)



@triton.jit
def block_barrier(ws_ptr, d0, d1, d2, d3, d4, d5, d6, d7, flag_off, row, rank, b, epoch,
                  status_ptr, W: tl.constexpr, MAXB: tl.constexpr, SPIN: tl.constexpr):
    """Block b of every rank meets here (steps 1-3 of the recipe above).

    Flags are int32 at ``flag_off + ((row * W + src) * MAXB + b) * 4`` of each rank's
    buffer: this block release-writes ``epoch`` into slot (row, rank, b) of every rank,
    then acquires the W slots (row, *, b) of its own rank. ``row`` separates the barriers
    of one call (and the parities of the one-shot kernel)."""
    tl.debug_barrier()
    mine = flag_off + ((row * W + rank) * MAXB + b) * 4
    for j in tl.static_range(W):
        signal(peer_base(ws_ptr, j, d0, d1, d2, d3, d4, d5, d6, d7) + mine, epoch)
    for src in tl.static_range(W):
        wait(ws_ptr + flag_off + ((row * W + src) * MAXB + b) * 4, epoch, status_ptr, SPIN)
    tl.debug_barrier()
