"""Timing and checking helpers of the end-to-end benchmarks (tools/bench_generate.py,
tools/bench_hf_generate.py): clocks, prefill/decode timers, the HBM-bandwidth probe, the
decode-step kernel profile and the rank/reference agreement checks.

Every timer aligns the ranks with a barrier first and returns the slowest rank's median
(``max_over_ranks``), so a table row is what the whole TP group delivers.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import statistics
import time
from pathlib import Path


def write_json(path: Path, obj: dict) -> None:
    """Atomically (re)write a results file (eval/report.atomic_write)."""
    from megatron_lite.lab.eval.report import atomic_write
    atomic_write(str(path), (json.dumps(obj, indent=1) + "\n").encode())


def parse_size(text: str) -> int:
    """A benchmark's message size: ``16KB``, ``256MB``, ``1G``, ``65536`` (powers of 1024;
    ``KiB`` reads as ``KB``). Raises ValueError with a one-line reason."""
    t = text.strip().upper().replace("IB", "").replace("B", "")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    if not num.isdigit():
        raise ValueError(f"bad size {text!r}: expected e.g. 16KB, 256MB")
    return int(num) * mult


# ----------------------------------------------------------------------------- timing

class Clock:
    """CUDA events on a GPU, perf_counter (after a sync) on the CPU."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device.type == "cuda"

    def stamp(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def measure_hbm_GBps(device, gib: float, clock: Clock) -> float:
    """Device-to-device copy bandwidth, bytes read + written (median of 10 copies)."""
    import torch
    n = int(gib * 2 ** 30) if device.type == "cuda" else 64 * 2 ** 20
    src = torch.randn(n // 4, device=device)   # random data: zeros can run faster
    dst = torch.empty_like(src)
    return 2 * n / (_median_ms(lambda: dst.copy_(src), clock) * 1e-3) / 1e9


def _median_ms(fn, clock: Clock, repeats: int = 10) -> float:
    """Median milliseconds of ``repeats`` timed calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        a = clock.stamp()
        fn()
        b = clock.stamp()
        clock.sync()
        times.append(clock.ms(a, b))
    return statistics.median(times)


def measure_matmul_TFLOPs(device, dtype, clock: Clock, n: int = 8192,
                          repeats: int = 10) -> float:
    """Dense matmul throughput, TFLOP/s: median of ``repeats`` ``n x n @ n x n`` products
    of random values in ``dtype`` (the prefill compute floor's denominator; 512 on a CPU).
    Ten products take about 15 ms on an H100, too short for the board to reach its power
    limit; ``repeats=200`` (0.3 s) is the rate a long prefill can sustain."""
    import torch
    n = n if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    # the untimed first call lets cuBLAS pick its kernel
    return 2 * n ** 3 / (_median_ms(lambda: a @ b, clock, repeats) * 1e-3) / 1e12


def _attended_pairs(tokens: int, window) -> int:
    """(query, key) pairs of causal attention over ``tokens`` tokens: every earlier key and
    the query's own, at most ``window`` of them on a sliding layer."""
    if window is None or tokens <= window:
        return tokens * (tokens + 1) // 2
    return window * (window + 1) // 2 + (tokens - window) * window


def compute_ms(flops: float, tflops: float) -> float:
    """Milliseconds that ``flops`` take at ``tflops`` TFLOP/s: a prefill's compute floor at
    the run's matmul rate (burst or sustained)."""
    return flops / (tflops * 1e12) * 1e3


def prefill_flops(model, tokens: int, batch: int) -> float:
    """FLOPs this rank must do to prefill ``batch`` prompts of ``tokens`` tokens: 2 per
    multiply-add of every weight matrix it holds per token (the input embedding is a
    lookup; the LM head runs once per prompt, as the engine keeps only the last token's
    logits), and causal attention's QK^T and PV, 2 x head_dim multiply-adds per (query,
    key) pair of each of its heads (a sliding layer's pairs within the window)."""
    from megatron_lite.models.config import SLIDING
    cfg, tp = model.cfg, model.group.world_size
    skip = {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    mats = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in skip)
    head = model.lm_head.weight.numel()
    attn = sum(4 * cfg.head_dim * cfg.local_heads(tp)
               * _attended_pairs(tokens, cfg.sliding_window if t == SLIDING else None)
               for t in cfg.layer_types)
    return float(batch * (2 * mats * tokens + 2 * head + attn))


def nccl_version() -> str:
    import torch
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def max_over_ranks(value: float, device) -> float:
    import torch
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def time_prefill(engine, tokens, repeats: int, clock: Clock, sampler=None) -> float:
    """Median ms of a prefill of ``tokens`` after one untimed call (the cache, cuBLAS's
    heuristics, a compile). ``sampler`` (lab/gpu_clocks.py's ClockSampler, say) is entered
    around the timed calls alone."""
    import torch
    B, T = tokens.shape
    lengths = torch.full((B,), T, dtype=torch.long, device=engine.device)
    engine.prefill(tokens, lengths, T).argmax(-1)   # warm-up: cache, cuBLAS heuristics
    times = []
    with sampler or contextlib.nullcontext():
        for _ in range(repeats):
            engine.group.barrier()
            clock.sync()
            a = clock.stamp()
            engine.prefill(tokens, lengths, T).argmax(-1)
            b = clock.stamp()
            clock.sync()
            times.append(clock.ms(a, b))
    return max_over_ranks(statistics.median(times), engine.device)


_KERNEL_KINDS = (   # (kind, regex on the kernel name), first match wins
    # inductor's fused Triton kernels, whatever ops their names list (one that fuses around
    # the gemv custom op or SDPA is still elementwise work)
    ("elementwise", r"^triton_(poi|red|per)_"),
    # the codec kernels (CUDA quantize_kernel / dequantize_kernel / error_kernel, Triton
    # _quantize_kernel ...) run only inside the quantized all-reduce
    ("allreduce", r"nccl|one_shot|two_shot|allreduce|all_reduce|quantize_kernel|error_kernel"),
    ("attention", r"flash|fmha|attention|efficient_attention"),
    ("gemm", r"gemm|gemv|cutlass|nvjet|xmma|cublas|splitk"),
    ("copy", r"memcpy|memset"),
    # torch's eager elementwise / reduction kernels and inductor's fused Triton kernels
    ("elementwise", r"elementwise|reduce_kernel|triton_(poi|red|per)_"),
)


def kernel_kind(name: str) -> str:
    """The kind a decode-step profile files a kernel under (``other`` if none matches)."""
    import re
    return next((k for k, rx in _KERNEL_KINDS if re.search(rx, name, re.I)), "other")


def profile_kernels(run, steps: int = 5, top: int = 12) -> dict:
    """Kernels of ``steps`` calls of ``run()`` under the CUDA profiler (graph replays
    included): per-call kernel count, busy time by kind (``kernel_kind``), the span from
    first kernel start to last kernel end, the gaps between kernels (span - busy), and the
    ``top`` kernel names by busy time (name cut to 120 characters, kind, calls and ms per
    call of ``run``). A profiler failure is returned as ``error``, never raised: it must not
    lose the timing."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    try:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                run()
            torch.cuda.synchronize()
        evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as e:   # noqa: BLE001
        return dict(error=f"{type(e).__name__}: {e}")
    if not evs:
        return dict(error="the profiler saw no CUDA kernels")
    by_kind: dict = {}
    by_name: dict = {}
    for e in evs:
        kind = kernel_kind(e.name)
        n, us = by_kind.get(kind, (0, 0.0))
        by_kind[kind] = (n + 1, us + e.time_range.elapsed_us())
        n, us = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, us + e.time_range.elapsed_us())
    names = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    span = max(e.time_range.end for e in evs) - min(e.time_range.start for e in evs)
    busy = sum(us for _, us in by_kind.values())
    return dict(kernels_per_step=len(evs) / steps,
                busy_ms_per_step=busy / steps / 1e3,
                span_ms_per_step=span / steps / 1e3,
                gap_ms_per_step=max(0.0, span - busy) / steps / 1e3,
                by_kind={k: dict(kernels=n / steps, ms=us / steps / 1e3)
                         for k, (n, us) in sorted(by_kind.items())},
                top=[dict(name=name[:120], kind=kernel_kind(name), calls=n / steps,
                          ms=us / steps / 1e3) for name, (n, us) in names])


def profile_prefill(engine, tokens, steps: int = 2) -> dict:
    """``profile_kernels`` of a prefill of ``tokens`` [B, T] (graphed where the engine
    graphs it), per prefill."""
    import torch
    B, T = tokens.shape
    lengths = torch.full((B,), T, dtype=torch.long, device=engine.device)
    return profile_kernels(lambda: engine.prefill(tokens, lengths, T).argmax(-1), steps)


def time_decode(engine, batch: int, context: int, steps: int, clock: Clock,
                graph: bool, profile: bool = False, sampler=None):
    """Median ms of one decode step (+ greedy pick) at ``context`` cached tokens, reading
    the slots ``generate`` would read there (``KVCache.read_len``), and the step's kernel
    profile if asked (else None). ``engine.cache`` is the cache it ran on; ``sampler`` is
    entered around the timed steps alone (not the capture or a compile)."""
    import torch
    from megatron_lite.inference.cuda_graphs import CUDAGraphDecoder
    max_seq = -(-(context + 1) // 64) * 64
    cache = engine._ensure_cache(batch, max_seq)
    kv_len = cache.read_len(context + 1)
    gen = torch.Generator(device=engine.device).manual_seed(1234 + engine.group.rank)
    for t in cache.k + cache.v:
        t.normal_(0.0, 1.0, generator=gen)
    vocab = engine.cfg.vocab_size
    tok = torch.randint(0, vocab, (batch,), device=engine.device,
                        generator=torch.Generator(device=engine.device).manual_seed(7))
    pos = torch.full((batch,), context, dtype=torch.long, device=engine.device)
    runner = engine.decode_step
    if graph:
        runner = CUDAGraphDecoder(engine.decode_step, engine.device, buckets=(batch,))
        runner.capture(batch, tok, pos, kv_len)
    step = functools.partial(runner, kv_len=kv_len)
    for _ in range(3):
        tok = step(tok, pos).argmax(-1)
    engine.group.barrier()
    clock.sync()
    with sampler or contextlib.nullcontext():
        stamps = [clock.stamp()]
        for _ in range(steps):
            tok = step(tok, pos).argmax(-1)
            stamps.append(clock.stamp())
        clock.sync()
    ms = statistics.median(clock.ms(a, b) for a, b in zip(stamps, stamps[1:]))
    prof = None
    if profile:
        state = {"tok": tok}

        def one_step(step=step):   # bound now: the function deletes its name below
            state["tok"] = step(state["tok"], pos).argmax(-1)
        prof = profile_kernels(one_step)
        prof.update(kv_cache_bytes=cache.nbytes, kv_read_bytes_per_step=cache.read_bytes(kv_len))
    del step, runner
    return max_over_ranks(ms, engine.device), prof


# ----------------------------------------------------------------------------- checks
def _digest(*tensors) -> bytes:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(-1).view(dtype=_u8()).numpy().tobytes())
    return h.digest()


def _u8():
    import torch
    return torch.uint8


def check_mode(engine, prompts, n_new: int, reference, long_prompt=None) -> tuple[dict, dict]:
    """Greedy tokens + prefill logits of ``prompts`` (short: decode-sized messages), and the
    last-token logits of ``long_prompt`` [1, L] (its TP sums are large enough for the
    quantized kernels); rank agreement of all of it, and agreement with ``reference``
    (native's output). Returns (report, this mode's output)."""
    import torch
    B, T = prompts.shape
    lengths = torch.full((B,), T, dtype=torch.long, device=engine.device)
    logits = engine.prefill(prompts, lengths, T + n_new).float()
    results = engine.generate([row.tolist() for row in prompts.cpu()], max_new_tokens=n_new)
    tokens = torch.tensor([r.token_ids for r in results], dtype=torch.long)
    if long_prompt is not None:
        L = long_prompt.shape[1]
        long_logits = engine.prefill(long_prompt, torch.full((1,), L, device=engine.device),
                                     L).float()
    else:
        long_logits = torch.zeros(1, device=engine.device)
    digest = torch.frombuffer(bytearray(_digest(tokens, logits, long_logits)),
                              dtype=torch.uint8)
    gathered = engine.group.all_gather(digest.to(engine.device), dim=0).view(
        engine.group.world_size, -1).cpu()
    report = dict(ranks_identical=bool((gathered == gathered[0]).all()),
                  logits_finite=bool(torch.isfinite(logits).all()),
                  finish=[r.finish_reason for r in results])
    mine = dict(tokens=tokens, logits=logits.cpu(), long_logits=long_logits.cpu())
    if long_prompt is not None:
        report["long_prompt_tokens"] = int(long_prompt.shape[1])
        report["long_logits_finite"] = bool(torch.isfinite(long_logits).all())
    if reference is not None and long_prompt is not None:
        ref = reference["long_logits"]
        report["long_logits_rel_err_vs_nccl"] = float(
            (mine["long_logits"] - ref).norm() / ref.norm().clamp_min(1e-30))
        report["long_argmax_equal_to_nccl"] = bool(
            torch.equal(mine["long_logits"].argmax(-1), ref.argmax(-1)))
    if reference is not None:
        same = (tokens == reference["tokens"])
        report["tokens_equal_to_nccl"] = bool(same.all())
        report["token_agreement_with_nccl"] = float(same.float().mean())
        report["logits_bitwise_equal_to_nccl"] = bool(torch.equal(mine["logits"],
                                                                  reference["logits"]))
        report["logits_max_abs_diff_vs_nccl"] = float(
            (mine["logits"] - reference["logits"]).abs().max())
        report["logits_scale"] = float(reference["logits"].abs().max())
    return report, mine


def graph_matches_eager(engine, batch: int = 2) -> dict:
    """One decode step replayed from a graph vs the same step run eagerly."""
    import torch
    from megatron_lite.inference.cuda_graphs import CUDAGraphDecoder
    engine._ensure_cache(batch, 128)
    tok = torch.arange(batch, device=engine.device) + 3
    pos = torch.full((batch,), 5, dtype=torch.long, device=engine.device)
    eager = engine.decode_step(tok, pos).clone()
    runner = CUDAGraphDecoder(engine.decode_step, engine.device, buckets=(batch,))
    replay = runner(tok, pos).clone()
    return dict(graph_bitwise_equal_to_eager=bool(torch.equal(eager, replay)),
                graph_max_abs_diff=float((eager.float() - replay.float()).abs().max()))


# ----------------------------------------------------------------------------- comparison
def _row_key(r: dict) -> tuple:
    return (r["phase"], r["batch"], r["tokens"], r["comm"], bool(r.get("graph", True)))


def compare_runs(now: dict, before: dict) -> dict:
    """This run against an earlier ``tools/bench_generate.py`` JSON: for every row both
    measured (same phase, batch, tokens, comm and graph mode), both times and now/before
    (below 1: faster now); for every comm both profiled, the decode-step profile's kernels,
    busy and span per step and each kind's ms, now and before (keyed by comm), and the
    same of the prefill profile where both profiled the same case (keyed "prefill COMM")."""
    old = {_row_key(r): r["ms"] for r in before.get("rows", [])}
    rows = []
    for r in now["rows"]:
        b = old.get(_row_key(r))
        if b:
            rows.append(dict(phase=r["phase"], batch=r["batch"], tokens=r["tokens"],
                             comm=r["comm"], graph=bool(r.get("graph", True)), ms=r["ms"],
                             before_ms=b, ratio=r["ms"] / b))
    profiles = {}
    for key, what in (("decode_profile_b1", "decode b1"), ("prefill_profile", "prefill")):
        for comm, p in now.get(key, {}).items():
            q = before.get(key, {}).get(comm)
            if not q or "error" in p or "error" in q or (
                    (p.get("tokens"), p.get("batch")) != (q.get("tokens"), q.get("batch"))):
                continue
            entry = {k: dict(now=p[k], before=q[k]) for k in
                     ("kernels_per_step", "busy_ms_per_step", "span_ms_per_step")}
            for kind in sorted(set(p["by_kind"]) | set(q["by_kind"])):
                entry[f"{kind}_ms"] = dict(now=p["by_kind"].get(kind, {}).get("ms", 0.0),
                                           before=q["by_kind"].get(kind, {}).get("ms", 0.0))
            profiles[comm if key == "decode_profile_b1" else f"{what} {comm}"] = entry
    return dict(before_date=before.get("date"), before_device=before.get("device"),
                rows=rows, profiles=profiles)


def format_comparison(cmp: dict) -> str:
    """The table ``compare_runs`` describes."""
    lines = [f"against the run of {cmp['before_date']} on {cmp['before_device']} "
             "(ratio = now / before; below 1 is faster now)"]
    if not cmp["rows"]:
        lines.append("  no row of this run was measured there (phase, batch, tokens, comm)")
    for r in cmp["rows"]:
        case = f"{r['batch']}x{r['tokens']}" + ("" if r["graph"] else " eager")
        lines.append(f"  {r['phase']:8s} {case:>12s} {r['comm']:>24s}: {r['ms']:10.3f} ms "
                     f"vs {r['before_ms']:10.3f} ms  {r['ratio']:6.3f}x")
    for comm, entry in cmp["profiles"].items():
        what = comm if comm.startswith("prefill ") else f"decode b1 {comm}"
        lines.append(f"  {what} profile: " + ", ".join(
            f"{k} {v['now']:.3g} vs {v['before']:.3g}" for k, v in entry.items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- transports
# How NCCL reaches the other GPUs of the host, as the benchmarks emulate it: its own choice
# (NVLink / P2P where the GPUs have it), host shared memory (NCCL_P2P_DISABLE=1: the path of
# PCIe GPUs without peer access), or sockets (and no shared memory either: a cross-node
# Ethernet link). NCCL reads these variables when it creates a communicator, so they are
# set before the process group exists.
TRANSPORTS = {"nvlink": {}, "host-memory": {"NCCL_P2P_DISABLE": "1"},
              "socket": {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"}}


def apply_transport(name, environ=None) -> None:
    """Set the NCCL variables of transport ``name`` (a key of ``TRANSPORTS``; None: leave
    the environment as it is). Call before the process group is created."""
    import os
    env = os.environ if environ is None else environ
    if name is None:
        return
    for key in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE"):
        env.pop(key, None)
    env.update(TRANSPORTS[name])


def transport_label(backend: str, environ=None) -> str:
    """The transport a run's JSON records: ``gloo`` for a gloo group, else the emulated one
    the NCCL variables select (``socket``, ``host-memory``), else ``nvlink`` (NCCL's own
    choice: on the machines measured here, NVLink)."""
    import os
    env = os.environ if environ is None else environ
    if backend != "nccl":
        return backend
    if env.get("NCCL_P2P_DISABLE") == "1":
        return "socket" if env.get("NCCL_SHM_DISABLE") == "1" else "host-memory"
    return "nvlink"
