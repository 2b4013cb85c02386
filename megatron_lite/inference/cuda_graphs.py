"""CUDA-graph decode: capture ``Engine.decode_step`` once per (batch-size bucket, KV read
length), then replay; and graphed short prefill (``CUDAGraphPrefill``: one graph per
cache rows and prompt-length bucket up to 2k tokens, the prompts right-padded to it).

A decode step of a TP model is hundreds of small kernels (norms, RoPE, cache writes, one
GEMV per projection, two all-reduces per layer). Launched one by one from Python, the host
needs tens of microseconds per layer and the GPU idles between kernels; a replayed graph
launches them all at once. ``decode_step`` was written for this: static shapes, fixed
KV-cache addresses and no host syncs (megatron_lite/inference/engine.py).

Recipe (the one in the PyTorch CUDA-graphs notes, also used by gpt-fast and vLLM):

1. static input buffers ``tokens[Bb]`` / ``positions[Bb]`` for a bucket ``Bb >= B``; a
   batch of B is copied into the first B rows, the padding rows decode token 0 at
   position 0 of their own (unused) cache rows and their logits are dropped;
2. warm-up calls on a side stream (lazy inits, NCCL communicator set-up, Triton
   autotuning and allocator growth must not happen during capture);
3. capture with ``capture_error_mode="thread_local"``, so that a CUDA call from another
   thread (ProcessGroupNCCL's watchdog polls its events) cannot invalidate the capture;
4. replay: copy the inputs in, ``graph.replay()``, read the static logits.

The KV read length (how many cache slots attention reads; inference/kv_cache.py buckets
it by powers of two) is a shape, so each one the host asks for is its own graph: a step
early in a long generation replays a graph that reads a short prefix of the cache instead
of all ``max_seq`` slots. The host picks it per step from the step count (no sync).

All buckets share one memory pool. A graph bakes in the addresses of the KV cache, so the
runner is bound to one cache (``bind``) and drops its graphs when the cache changes.
Collectives inside the graph (NCCL, or the fused symmetric-memory kernels, whose per-call
epochs live on the device) replay in the same order on every rank, like eager calls.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

DEFAULT_BUCKETS: Tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Prompt-length buckets of graphed prefill: up to 2k tokens a prefill is short enough for
# its kernel launches to matter (the 512-token TTFT of an 8B model is launch-bound), and
# padding to the next power of two at most doubles its GEMM work.
PREFILL_BUCKETS: Tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)

StepFn = Callable[[torch.Tensor, torch.Tensor, Optional[int]], torch.Tensor]
PrefillFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def bucket_for(batch: int, buckets: Sequence[int]) -> Optional[int]:
    """Smallest bucket that holds ``batch`` rows (None when the batch is larger than all)."""
    if batch < 1:
        raise ValueError(f"batch size must be >= 1, got {batch}")
    fits = [b for b in buckets if b >= batch]
    return min(fits) if fits else None


class _Graph:
    """One captured decode step at a fixed batch size and KV read length."""

    def __init__(self, graph: "torch.cuda.CUDAGraph", tokens: torch.Tensor,
                 positions: torch.Tensor, logits: torch.Tensor):
        self.graph, self.tokens, self.positions, self.logits = graph, tokens, positions, logits


class CUDAGraphDecoder:
    """Replays ``step_fn(tokens[Bb], positions[Bb], kv_len) -> logits[Bb, V]`` from CUDA
    graphs, one per (batch bucket Bb, ``kv_len``).

    ``step_fn`` must run on ``device`` with static shapes for a given ``kv_len`` and no host
    syncs. Call ``reset()`` when the state the step reads, the KV cache, is reallocated (a
    graph bakes in its buffers' addresses). ``__call__(tokens[B], positions[B], kv_len)``
    returns logits [B, V]: a view into the graph's static output, valid until the next
    replay of any graph.
    """

    def __init__(self, step_fn: StepFn, device, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 warmup: int = 2):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if warmup < 1:
            raise ValueError("at least one warm-up call must precede the capture")
        self.step_fn, self.device = step_fn, device
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.warmup = warmup
        self.graphs: Dict[Tuple[int, Optional[int]], _Graph] = {}
        self.pool = None
        self.captures = 0   # total captures so far (tests and logs look at it)

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None

    def bucket(self, batch: int) -> Optional[int]:
        return bucket_for(batch, self.buckets)

    def capture(self, batch: int, tokens: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None,
                kv_len: Optional[int] = None) -> _Graph:
        """Capture the bucket of ``batch`` at read length ``kv_len`` (inputs for the warm-up
        calls are optional: the warm-up runs the real step, so pass the step's real inputs
        when the step writes state, e.g. the KV cache, that must hold the right values
        afterwards)."""
        bb = self.bucket(batch)
        if bb is None:
            raise ValueError(f"batch {batch} exceeds the largest CUDA-graph bucket "
                             f"{self.buckets[-1]}")
        static_tok = torch.zeros(bb, dtype=torch.long, device=self.device)
        static_pos = torch.zeros(bb, dtype=torch.long, device=self.device)
        if tokens is not None:
            static_tok[:tokens.shape[0]].copy_(tokens)
            static_pos[:positions.shape[0]].copy_(positions)
        graph, logits = _record(self, self.step_fn, static_tok, static_pos, kv_len)
        entry = _Graph(graph, static_tok, static_pos, logits)
        self.graphs[bb, kv_len] = entry
        log.debug("captured decode graph for bucket %d, kv_len %s", bb, kv_len)
        return entry

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor,
                 kv_len: Optional[int] = None) -> torch.Tensor:
        b = tokens.shape[0]
        entry = self.graphs.get((self.bucket(b), kv_len))
        if entry is None:
            entry = self.capture(b, tokens, positions, kv_len)
        entry.tokens[:b].copy_(tokens)
        entry.positions[:b].copy_(positions)
        entry.graph.replay()
        return entry.logits[:b]


def _record(cache, fn, *args):
    """(graph, output) of ``fn(*args)`` captured in ``cache``'s memory pool after
    ``cache.warmup`` eager calls on a side stream (the recipe of torch.cuda.graphs' docs:
    the warm-up lets lazy initialisation and allocator growth happen outside the capture);
    counts the capture in ``cache.captures``."""
    if cache.pool is None:
        cache.pool = torch.cuda.graph_pool_handle()
    current = torch.cuda.current_stream(cache.device)
    side = torch.cuda.Stream(cache.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(cache.warmup):
            fn(*args)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=cache.pool, capture_error_mode="thread_local"):
        out = fn(*args)
    cache.captures += 1
    return graph, out


def pad_prompts(tokens: torch.Tensor, lengths: torch.Tensor, rows: int,
                length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded prompts [B, T] (true lengths [B]) as ``rows`` x ``length``: token 0
    past each prompt, and rows past B one-token prompts of token 0 (their cache rows and
    logits are unused, as the padding rows of a decode bucket)."""
    B, T = tokens.shape
    if rows < B or length < T:
        raise ValueError(f"cannot pad {B} x {T} prompts to {rows} x {length}")
    out = tokens.new_zeros(rows, length)
    out[:B, :T] = tokens
    lens = lengths.new_ones(rows)
    lens[:B] = lengths
    return out, lens


class _PrefillGraph:
    def __init__(self, graph, tokens: torch.Tensor, lengths: torch.Tensor,
                 logits: torch.Tensor):
        self.graph, self.tokens, self.lengths, self.logits = graph, tokens, lengths, logits


class CUDAGraphPrefill:
    """Replays ``prefill_fn(tokens[R, L], lengths[R]) -> last-token logits [R, V]`` from
    CUDA graphs, one per (rows R, length bucket L of ``PREFILL_BUCKETS``): a short prompt's
    prefill without its hundreds of kernel launches. ``prefill_fn`` writes the KV cache
    (its addresses are baked in: ``reset()`` when it is reallocated) and must be
    capturable, as the decode step is. ``__call__(tokens[B, T], lengths[B], rows)`` pads the
    prompts to ``rows`` (the KV cache's rows, B when omitted) by the bucket
    (``pad_prompts``; ``bucket(T)`` says whether one holds T) and returns a view into the
    graph's static logits [rows, V], valid until its next replay."""

    def __init__(self, prefill_fn: PrefillFn, device, buckets: Sequence[int] = PREFILL_BUCKETS,
                 warmup: int = 2):
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        if warmup < 1:
            raise ValueError("at least one warm-up call must precede the capture")
        self.prefill_fn, self.device, self.warmup = prefill_fn, device, warmup
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.graphs: Dict[Tuple[int, int], _PrefillGraph] = {}
        self.pool = None
        self.captures = 0

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None

    def bucket(self, length: int) -> Optional[int]:
        return bucket_for(length, self.buckets)

    def _capture(self, tokens: torch.Tensor, lengths: torch.Tensor) -> _PrefillGraph:
        static_tok, static_len = tokens.clone(), lengths.clone()
        graph, logits = _record(self, self.prefill_fn, static_tok, static_len)
        entry = _PrefillGraph(graph, static_tok, static_len, logits)
        self.graphs[tuple(tokens.shape)] = entry
        log.debug("captured prefill graph for %d rows x %d tokens", *tokens.shape)
        return entry

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor,
                 rows: Optional[int] = None) -> torch.Tensor:
        # rows: a batch padded to its decode bucket has a cache of more rows than prompts,
        # and prefill_fn writes every cache row
        B, T = tokens.shape
        rows = B if rows is None else rows
        length = self.bucket(T)
        if length is None:
            raise ValueError(f"prompt of {T} tokens exceeds the largest prefill bucket "
                             f"{self.buckets[-1]}")
        tokens, lengths = pad_prompts(tokens, lengths, rows, length)
        entry = self.graphs.get((rows, length))
        if entry is None:   # a capture records without running: replay it below
            entry = self._capture(tokens, lengths)
        entry.tokens.copy_(tokens)
        entry.lengths.copy_(lengths)
        entry.graph.replay()
        return entry.logits
