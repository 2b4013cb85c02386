"""GPU: CUDA-graph decode in the Engine, the causal prefill fast path, and graphs over
NCCL and the fused all-reduce at TP 2. Skips without CUDA.

Random-weight tiny models (lab/random_init.py); weights are scaled up so activations
and logits are O(1), so that a wrong mask or a stale cache address shows in the logits.
"""
import pytest
import torch

from tests.gpu._harness import gpu_count, import_kernels, needs_cuda, run_nccl

pytestmark = [pytest.mark.gpu, needs_cuda]


def _engine(tp_group=None, shape="tiny", cuda_graphs=None, seed=0, compile=False,
            kv_layout="live"):
    from megatron_lite import Engine
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.lab.random_init import random_model, resolve_shape
    from megatron_lite.parallel_state import TPGroup
    group = tp_group or TPGroup(DistCommunicator(None))
    model = random_model(resolve_shape(shape), group, device="cuda", dtype=torch.bfloat16,
                         seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(25.0)
    return Engine(model, None, max_batch_size=8, cuda_graphs=cuda_graphs, compile=compile,
                  kv_layout=kv_layout)


def _prompts(n, T, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, T), generator=g).tolist()


def test_graph_replay_is_bitwise_the_eager_step():
    from megatron_lite.inference.cuda_graphs import CUDAGraphDecoder
    eng = _engine(cuda_graphs=False)
    B = 4
    with torch.inference_mode():
        ids = torch.tensor(_prompts(B, 20, eng.cfg.vocab_size), device="cuda")
        eng.prefill(ids, torch.full((B,), 20, device="cuda"), 64)
        tok = torch.arange(B, device="cuda") + 5
        pos = torch.full((B,), 20, device="cuda")
        eager = eng.decode_step(tok, pos).clone()
        runner = CUDAGraphDecoder(eng.decode_step, "cuda", buckets=(B,))
        replay = runner(tok, pos).clone()
        again = runner(tok, pos).clone()
    assert runner.captures == 1
    assert torch.equal(eager, replay) and torch.equal(replay, again)
    assert torch.isfinite(eager).all() and eager.float().std() > 0.1


def test_padding_rows_do_not_change_real_rows():
    """A batch of 3 decodes in the 4-row bucket: rows 0..2 match an unpadded eager step."""
    eng = _engine(cuda_graphs=False)
    with torch.inference_mode():
        ids = torch.tensor(_prompts(3, 20, eng.cfg.vocab_size), device="cuda")
        eng.prefill(ids, torch.full((3,), 20, device="cuda"), 64)
        tok, pos = torch.tensor([5, 6, 7], device="cuda"), torch.full((3,), 20, device="cuda")
        ref = eng.decode_step(tok, pos).float()
        eng.cuda_graphs = True
        eng._ensure_cache(4, 64)
        eng.prefill(ids, torch.full((3,), 20, device="cuda"), 64)   # into rows 0..2 of 4
        assert eng.cache.batch_size == 4
        got = eng._decode(tok, pos).float()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_generate_with_graphs_matches_eager_and_reuses_graphs():
    eager = _engine(cuda_graphs=False)
    graphed = _engine(cuda_graphs=True)
    prompts = _prompts(2, 24, eager.cfg.vocab_size)
    want = [r.token_ids for r in eager.generate(prompts, max_new_tokens=12)]
    got = [r.token_ids for r in graphed.generate(prompts, max_new_tokens=12)]
    assert got == want and all(len(t) == 12 for t in got)
    assert graphed._graphs.captures == 1
    graphed.generate(prompts, max_new_tokens=12)       # same cache shape: replays only
    assert graphed._graphs.captures == 1
    graphed.generate(prompts, max_new_tokens=80)       # a longer cache: captured again,
    assert graphed._graphs.captures == 3               # once per read length (64, 128)
    odd = graphed.generate(prompts + prompts[:1], max_new_tokens=6)   # bucket 4, padded
    assert [len(r.token_ids) for r in odd] == [6, 6, 6]
    assert graphed.cache.batch_size == 4


def test_graphed_prefill_matches_eager_and_captures_per_bucket():
    """Prompts up to 2k tokens prefill from a graph per (cache rows, length bucket): the
    eager engine's tokens, one capture per bucket and cache, replays after that."""
    eager = _engine(cuda_graphs=False)
    graphed = _engine(cuda_graphs=True)
    captures = []
    for T in (24, 40, 100, 110):     # buckets 64, 64 (same 64-slot cache), 128, 128
        prompts = _prompts(2, T, eager.cfg.vocab_size, seed=T)
        want = [r.token_ids for r in eager.generate(prompts, max_new_tokens=8)]
        got = [r.token_ids for r in graphed.generate(prompts, max_new_tokens=8)]
        assert got == want, T
        captures.append(graphed._prefill_graphs.captures)
    assert captures == [1, 1, 2, 2], captures


def _forced(eng, prompts, tokens):
    """Prefill, then decode ``tokens`` [B, n] the way ``generate`` does; logits [B, n, V]."""
    B, T = len(prompts), len(prompts[0])
    ids = torch.tensor(prompts, device="cuda")
    eng.prefill(ids, torch.full((B,), T, device="cuda"), eng.cache_len(T, tokens.shape[1]))
    pos, out = torch.full((B,), T, device="cuda"), []
    for step in range(1, tokens.shape[1] + 1):
        out.append(eng._decode(tokens[:, step - 1], pos, T + step).float().clone())
        pos = pos + 1
    return torch.stack(out, dim=1)


def test_ring_cache_graphs_match_eager_and_the_full_layout():
    """tiny-gemma2 (window 64 on layer 0): 100-token prompts and 80 new tokens wrap the
    ring; graphs (one per read length: 128 and 192) give the eager tokens, and the decode
    logits match the full layout's (one slot per position, every step reads all) to bf16
    rounding (the ring sums the window's keys in another order)."""
    eager = _engine(shape="tiny-gemma2", cuda_graphs=False)
    graphed = _engine(shape="tiny-gemma2", cuda_graphs=True)
    full = _engine(shape="tiny-gemma2", cuda_graphs=True, kv_layout="full")
    prompts = _prompts(2, 100, eager.cfg.vocab_size)
    want = [r.token_ids for r in eager.generate(prompts, max_new_tokens=80)]
    got = [r.token_ids for r in graphed.generate(prompts, max_new_tokens=80)]
    assert got == want and graphed._graphs.captures == 2
    assert graphed.cache.slots == [64, 192] and full.cache is None
    tokens = torch.tensor(want, device="cuda")[:, :40]
    with torch.inference_mode():
        a, b = _forced(graphed, prompts, tokens), _forced(full, prompts, tokens)
    assert full.cache.slots == [192, 192] and graphed.cache.nbytes < full.cache.nbytes
    assert torch.isfinite(b).all() and b.std() > 0.1
    torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def test_compiled_decode_in_graphs_matches_eager():
    """Engine(compile=True): a compiled decode step replayed from a CUDA graph (compiled
    during the warm-up before capture) matches the eager step to bf16 rounding (inductor
    keeps fused intermediates in fp32, so bits may differ); generation replays its graph."""
    from megatron_lite.inference.cuda_graphs import CUDAGraphDecoder
    eager = _engine(cuda_graphs=False)
    compiled = _engine(cuda_graphs=False, compile=True)
    B = 4
    outs = []
    with torch.inference_mode():
        for eng in (eager, compiled):
            ids = torch.tensor(_prompts(B, 20, eng.cfg.vocab_size), device="cuda")
            eng.prefill(ids, torch.full((B,), 20, device="cuda"), 64)
            tok = torch.arange(B, device="cuda") + 5
            pos = torch.full((B,), 20, device="cuda")
            step = eng.decode_step if eng is eager else CUDAGraphDecoder(
                eng.decode_step, "cuda", buckets=(B,))
            outs.append(step(tok, pos).float().clone())
    ref = outs[0]
    torch.testing.assert_close(outs[1], ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] >= 1
    graphed = _engine(cuda_graphs=True, compile=True)
    prompts = _prompts(2, 24, graphed.cfg.vocab_size)
    first = [r.token_ids for r in graphed.generate(prompts, max_new_tokens=12)]
    again = [r.token_ids for r in graphed.generate(prompts, max_new_tokens=12)]
    assert first == again and graphed._graphs.captures == 1


def test_causal_prefill_matches_masked_at_1k_tokens():
    from megatron_lite.inference.kv_cache import KVCache
    eng = _engine(cuda_graphs=False)
    T = 1024
    ids = torch.tensor(_prompts(1, T, eng.cfg.vocab_size), device="cuda")
    pos = torch.arange(T, device="cuda").expand(1, T)
    outs = []
    with torch.inference_mode():
        for causal in (False, True):
            cache = KVCache(eng.cfg, 1, 1, T, torch.bfloat16, "cuda")
            outs.append(eng.model(ids, pos, cache.k, cache.v, kv_len=T,
                                  causal_prefill=causal).float())
    scale = outs[0].abs().max().item()
    torch.testing.assert_close(outs[1], outs[0], rtol=3e-2, atol=3e-2 * scale)


def _tp2_graphs(rank, world):
    from megatron_lite.comm.build import build_communicator
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.comm.fused import install_fused
    from megatron_lite.parallel_state import TPGroup
    import_kernels()
    base = DistCommunicator(None)
    group = TPGroup(base)
    eng = _engine(group, cuda_graphs=True)
    prompts = _prompts(2, 24, eng.cfg.vocab_size)
    out = {}
    comms = {"nccl": base}
    # auto as shipped (one-shot bf16 at these sizes), and int4 forced through the fused
    # two-shot kernel at every size, so that both kernels are captured and replayed.
    for name, spec, table in (("auto-bf16", "bf16", None),
                              ("int4-fused", "int4:128",
                               {"oneshot_max": 0, "fused_min": {"*": 0}})):
        c = build_communicator(base, spec)
        install_fused(c, table=table)          # replaces the kernel backends it had
        comms[name] = c
    # error feedback (portable two-step path, Python-side state) captured in graphs too
    comms["ef-int4"] = build_communicator(base, "ef+int4:128")
    comms["ef-int4"].set_post_norms(eng.model.post_reduce_norms())
    # the one-shot algorithm (Triton quantize / dequantize-sum around NCCL's all-gather),
    # with feedback
    comms["ef-int4-1shot"] = build_communicator(base, "ef+int4:128,algo=one-shot")
    comms["ef-int4-1shot"].set_post_norms(eng.model.post_reduce_norms())
    for name, comm in comms.items():
        group.communicator = comm
        eng._graphs = None
        eng.cuda_graphs = True
        graphed = [r.token_ids for r in eng.generate(prompts, max_new_tokens=10)]
        captured = eng._graphs.captures if eng._graphs is not None else 0
        eng.cuda_graphs = False
        eager = [r.token_ids for r in eng.generate(prompts, max_new_tokens=10)]
        explain = comm.explain(torch.empty(2, eng.cfg.hidden_size, device="cuda",
                                           dtype=torch.bfloat16), "layers.0.mlp.down_proj")
        out[name] = dict(graphed=graphed, eager=eager, captured=captured, explain=explain)
    return out


@pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")
def test_tp2_graphs_over_nccl_and_fused_allreduce():
    r0, r1 = run_nccl(_tp2_graphs, 2)
    for name in r0:
        a, b = r0[name], r1[name]
        assert a["graphed"] == b["graphed"], f"{name}: ranks disagree"
        assert a["graphed"] == a["eager"], f"{name}: graph replay != eager ({a['explain']})"
        assert a["captured"] == 1, name
    # the fused one-shot kernel sums in fp32, NCCL in bf16: tokens agree, bits need not
    assert r0["auto-bf16"]["graphed"] == r0["nccl"]["graphed"]
    assert r0["ef-int4"]["explain"].split("; transport ")[0] == "error feedback, portable two-step with int4:128"
    # on NCCL the one-shot kernels return each rank's error part: feedback runs on them
    assert r0["ef-int4-1shot"]["explain"].split("; transport ")[0] == "error feedback, one-shot-kernels with int4:128"
