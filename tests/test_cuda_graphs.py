"""CPU-runnable parts of the generation benchmarks: graph buckets, the Engine hook's CPU
behaviour, the causal prefill fast path, random-weight models, and tools/bench_generate.py
end to end on gloo.

The CUDA-graph capture/replay itself is tested in tests/gpu/test_generate_gpu.py.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_lite.comm.communicator import Communicator, DistCommunicator
from megatron_lite.inference.cuda_graphs import CUDAGraphDecoder, bucket_for
from megatron_lite.inference.engine import Engine
from megatron_lite.models import decoder as decoder_mod
from megatron_lite.lab.random_init import (INIT_STD, random_model,
                                              resolve_shape, streamed_weight_bytes,
                                              total_weight_bytes)
from megatron_lite.parallel_state import TPGroup
from tests._dist import run_distributed

from tests.test_calibrate import load_tool

bench = load_tool("bench_generate")


def _group(rank=0, world=1) -> TPGroup:
    """A TP group handle of the given rank/size: model construction makes no collective
    calls, so a bare Communicator suffices to build one rank's shard."""
    return TPGroup(DistCommunicator(None) if world == 1 else Communicator(rank, world))


# ----------------------------------------------------------------------------- buckets
def test_bucket_is_the_smallest_that_fits():
    buckets = (1, 2, 4, 8, 16)
    assert [bucket_for(b, buckets) for b in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    assert bucket_for(17, buckets) is None
    with pytest.raises(ValueError):
        bucket_for(0, buckets)


def test_graph_decoder_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphDecoder(lambda t, p: t, "cpu")


def test_engine_on_cpu_decodes_eagerly_and_refuses_forced_graphs():
    from megatron_lite import Engine
    model = random_model(resolve_shape("tiny"), _group(), device="cpu", dtype=torch.float32)
    engine = Engine(model)
    assert engine.cuda_graphs is False
    assert engine._cache_rows(3) == 3   # no bucket padding without graphs
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, cuda_graphs=True)


def test_pad_prompts_and_prefill_graphs_need_cuda():
    from megatron_lite.inference.cuda_graphs import CUDAGraphPrefill, pad_prompts
    tok, lens = pad_prompts(torch.tensor([[5, 6, 7], [8, 0, 0]]), torch.tensor([3, 1]), 3, 4)
    assert tok.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]]
    assert lens.tolist() == [3, 1, 1]
    with pytest.raises(ValueError):
        pad_prompts(tok, lens, 2, 4)
    with pytest.raises(ValueError, match="CUDA"):
        CUDAGraphPrefill(lambda t, n: t, "cpu")


@pytest.mark.parametrize("shape", ["tiny", "tiny-gemma2"])
def test_bucket_padded_prefill_is_the_prefill(shape):
    """What graphed prefill captures (``Engine.prefill_rows`` on prompts padded to the
    length bucket and the cache rows) gives the eager prefill's logits and leaves a cache
    from which decoding picks the same tokens; tiny-gemma2 has sliding-window layers
    whose ring the padded prompt overruns."""
    from megatron_lite import Engine
    from megatron_lite.inference.cuda_graphs import pad_prompts
    model = random_model(resolve_shape(shape), _group(), device="cpu", dtype=torch.float32)
    engine = Engine(model)
    g = torch.Generator().manual_seed(0)
    B, T, rows, L, steps = 3, 21, 4, 64, 5
    ids = torch.randint(3, engine.cfg.vocab_size, (B, T), generator=g)
    lengths = torch.tensor([21, 9, 14])
    for b in range(B):
        ids[b, lengths[b]:] = 0

    def run(padded):
        with torch.inference_mode():
            engine._ensure_cache(rows, 128)
            if padded:
                logits = engine.prefill_rows(*pad_prompts(ids, lengths, rows, L))[:B]
            else:
                logits = engine.prefill(ids, lengths, 128)
            out, tok, pos = [logits.clone()], logits.argmax(-1), lengths.clone()
            for step in range(steps):
                step_logits = engine._decode(tok, pos, int(pos.max()) + 1)
                out.append(step_logits.clone())
                tok, pos = step_logits.argmax(-1), pos + 1
            return torch.stack(out, 1)

    want, got = run(False), run(True)
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ----------------------------------------------------------------------------- random init
@pytest.mark.parametrize("shape,norm_value", [("tiny", 1.0), ("tiny-gemma2", 0.0)])
def test_random_weights_follow_the_hf_scheme(shape, norm_value):
    model = random_model(resolve_shape(shape), _group(), device="cpu", dtype=torch.float32)
    cfg = model.cfg
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.all(p == norm_value), name
        else:
            real = p[:cfg.vocab_size] if "embed" in name or "lm_head" in name else p
            assert abs(real.std().item() - INIT_STD) < 0.05 * INIT_STD, name
            assert abs(real.mean().item()) < 0.05 * INIT_STD, name
    pad = model.embed_tokens.weight[cfg.vocab_size:]
    assert pad.shape[0] > 0 and torch.all(pad == 0)   # padded vocab rows are zero


def test_random_weights_are_reproducible_and_seeded():
    hf = resolve_shape("tiny")
    a = random_model(hf, _group(), device="cpu", dtype=torch.float32, seed=1)
    b = random_model(hf, _group(), device="cpu", dtype=torch.float32, seed=1)
    c = random_model(hf, _group(), device="cpu", dtype=torch.float32, seed=2)
    name = "layers.1.mlp.down_proj.weight"
    pa, pb, pc = (dict(m.named_parameters())[name] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_replicated_kv_heads_match_across_ranks():
    hf = dict(resolve_shape("tiny"), num_key_value_heads=2)   # tp 4 > 2 KV heads
    ranks = [random_model(hf, _group(r, 4), device="cpu", dtype=torch.float32)
             for r in range(4)]
    cfg = ranks[0].cfg
    nq, hd = cfg.local_heads(4) * cfg.head_dim, cfg.head_dim
    qkv = [dict(m.named_parameters())["layers.0.self_attn.qkv_proj.weight"] for m in ranks]
    assert [cfg.kv_heads_of_rank(4, r) for r in range(4)] == [[0], [0], [1], [1]]
    assert torch.equal(qkv[0][nq:], qkv[1][nq:])          # same KV head 0, k and v rows
    assert torch.equal(qkv[2][nq:], qkv[3][nq:])
    assert not torch.equal(qkv[0][nq:nq + hd], qkv[2][nq:nq + hd])
    assert not torch.equal(qkv[0][:nq], qkv[1][:nq])       # q heads are each rank's own


def test_streamed_bytes_skip_the_untied_input_embedding():
    untied = random_model(resolve_shape("tiny"), _group(), device="cpu", dtype=torch.bfloat16)
    emb = untied.embed_tokens.weight
    assert streamed_weight_bytes(untied) == total_weight_bytes(untied) - emb.numel() * 2
    tied = random_model(resolve_shape("tiny-gemma2"), _group(), device="cpu",
                        dtype=torch.bfloat16)
    assert streamed_weight_bytes(tied) == total_weight_bytes(tied)


@pytest.mark.parametrize("shape", ["tiny", "tiny-gemma2"])
def test_prefill_flops_count_the_matmuls_torch_counts(shape):
    """The compute floor's FLOPs: the weight matmuls are exactly what torch's flop counter
    sees in a real prefill (aten.mm: the layers and the LM head on the last tokens only);
    attention adds causal pairs, a sliding layer's within its window (tiny-gemma2: layer 0
    slides over 64 tokens), which the counter does not see in the fused SDPA call (tiny)
    or counts in full, unmasked (tiny-gemma2's soft-capped bmm)."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_lite.lab.benchmark import prefill_flops
    model = random_model(resolve_shape(shape), _group(), device="cpu", dtype=torch.float32)
    T, B, cfg = 100, 2, model.cfg
    with FlopCounterMode(display=False) as fc:
        Engine(model, None).prefill(torch.randint(0, cfg.vocab_size, (B, T)),
                                    torch.full((B,), T), T)
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    pairs = {"tiny": [5050, 5050], "tiny-gemma2": [64 * 65 // 2 + 36 * 64, 5050]}[shape]
    attn = B * sum(4 * cfg.head_dim * cfg.num_heads * p for p in pairs)
    assert prefill_flops(model, T, B) == counts["aten.mm"] + attn
    if "aten.bmm" in counts:                      # unmasked: every (query, key) pair
        assert counts["aten.bmm"] == B * 2 * 4 * cfg.head_dim * cfg.num_heads * T * T


def test_unknown_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown shape 'llama9'"):
        resolve_shape("llama9")


# ----------------------------------------------------------------------------- causal prefill
def _prefill(model, T, causal, B=2):
    from megatron_lite.inference.kv_cache import KVCache
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    pos = torch.arange(T).expand(B, T)
    cache = KVCache(model.cfg, 1, B, T, torch.float32, "cpu")
    return model(ids, pos, cache.k, cache.v, kv_len=T, causal_prefill=causal)


@pytest.mark.parametrize("shape,T,fast", [
    ("tiny", 48, True),              # no window, no softcap: is_causal path
    ("tiny-gemma2", 48, False),      # attention soft-cap: must keep the explicit mask
])
def test_causal_prefill_fast_path(monkeypatch, shape, T, fast):
    model = random_model(resolve_shape(shape), _group(), device="cpu", dtype=torch.float32)
    for p in model.parameters():     # O(1) activations so a wrong mask shows in the logits
        if p.dim() > 1:
            p.mul_(25.0)
    masked = _prefill(model, T, causal=False)
    calls = []
    real = decoder_mod.attention_mask
    monkeypatch.setattr(decoder_mod, "attention_mask",
                        lambda *a: calls.append(a) or real(*a))
    fast_out = _prefill(model, T, causal=True)
    assert (len(calls) == 0) == fast
    torch.testing.assert_close(fast_out, masked, rtol=1e-5, atol=1e-5)
    if not fast:
        assert torch.equal(fast_out, masked)


def test_sliding_window_shorter_than_prompt_keeps_the_mask(monkeypatch):
    hf = dict(resolve_shape("tiny-gemma2"), attn_logit_softcapping=None)   # window 64
    model = random_model(hf, _group(), device="cpu", dtype=torch.float32)
    kinds = []
    real = decoder_mod.attention_mask
    monkeypatch.setattr(decoder_mod, "attention_mask",
                        lambda pos, kv, w: kinds.append(w) or real(pos, kv, w))
    _prefill(model, 32, causal=True, B=1)
    assert kinds == []                       # window 64 >= 32 tokens: plain causal
    _prefill(model, 96, causal=True, B=1)
    assert kinds == [64]                     # sliding layers need the window mask


# ----------------------------------------------------------------------------- bench tool
def test_skip_reduce_returns_its_input_and_gathers_for_real():
    comm = bench._skip_reduce_communicator(DistCommunicator(None))
    x = torch.randn(3, 4)
    assert comm.all_reduce(x, "layers.0.mlp.down_proj") is x
    assert torch.equal(comm.all_gather(x), x)


def test_comm_removed_ratio():
    rows = [dict(phase="prefill", batch=1, tokens=8192, comm=c, ms=ms)
            for c, ms in (("native", 100.0), ("int4", 70.0), ("skip-reduce", 60.0),
                          ("int8", 110.0))]
    rows.append(dict(phase="decode", batch=1, tokens=1024, comm="int4", ms=1.0))
    got = {r["comm"]: r["ratio"] for r in bench.comm_removed(rows)}
    assert got == pytest.approx({"int4": 0.75, "int8": -0.25})


@pytest.mark.parametrize("argv,msg", [
    (["--random-weights", "tiny", "--comm", "int7"], "--comm 'int7': unknown codec"),
    (["--random-weights", "tiny", "--comm", "weighted-int8"], "needs a calibration file"),
    (["--random-weights", "tiny", "--prefill", "8k"], "bad prefill case"),
    (["--random-weights", "nope"], "unknown shape 'nope'"),
    (["--decode-batches", "1"], "give --ckpt DIR or --random-weights"),
    (["--from-json", "x.json"], "--from-json needs --plot"),
    (["--random-weights", "tiny", "--transport", "host-memory"], "--transport needs NCCL"),
])
def test_bad_arguments_fail_with_one_line(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and msg in err and "\n" not in err


def _bench_rank(rank, world, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    from megatron_lite import parallel_state
    path = os.path.join(out_dir, "r.json")
    try:
        bench.main(["--random-weights", "tiny", "--prefill", "32x1,16x2", "--comm", "auto",
                    "--comm", "int8:128", "--comm", "int4:128",
                    "--decode-batches", "1,3", "--context", "40", "--decode-steps", "3",
                    "--repeats", "2", "--check-tokens", "4", "--check-long-mib", "0.1",
                    "--json", path, "--compare-to", os.path.join(out_dir, "before.json")])
    finally:
        parallel_state.destroy_model_parallel()
    return json.load(open(path)) if rank == 0 else None


def test_bench_end_to_end_on_gloo(tmp_path):
    # an earlier run that measured one of this run's rows (eager decode on CPU) and another
    before = dict(date="2026-01-01", device="cpu", rows=[
        dict(phase="decode", batch=1, tokens=40, comm="native", ms=1000.0, graph=False),
        dict(phase="decode", batch=7, tokens=40, comm="native", ms=5.0, graph=False)])
    (tmp_path / "before.json").write_text(json.dumps(before))
    res = run_distributed(_bench_rank, 2, str(tmp_path))[0]
    cmp = res["compared_to"]
    assert cmp["before_date"] == "2026-01-01" and cmp["file"].endswith("before.json")
    (row,) = cmp["rows"]
    now = next(r["ms"] for r in res["rows"] if (r["phase"], r["batch"], r["comm"])
               == ("decode", 1, "native"))
    assert row["before_ms"] == 1000.0 and row["ms"] == now and row["ratio"] == now / 1000.0
    assert res["tp"] == 2 and res["shape"] == "tiny" and res["device"] == "cpu"
    assert res["transport"] == "gloo"
    assert not res["skipped"]
    modes = ["native", "auto", "int8:128", "int4:128", "skip-reduce"]
    want = {(ph, b, t, c) for c in modes for ph, b, t in
            [("prefill", 1, 32), ("prefill", 2, 16), ("decode", 1, 40), ("decode", 3, 40)]}
    got = {(r["phase"], r["batch"], r["tokens"], r["comm"]) for r in res["rows"]}
    assert got == want
    assert all(r["ms"] > 0 for r in res["rows"])
    for mode in ("native", "auto", "int8:128", "int4:128"):
        assert res["checks"][mode]["ranks_identical"] is True
        assert res["checks"][mode]["logits_finite"] is True
    # int8 is close to the bf16 sum; int4 further, but still far below the logits' scale
    c8, c4 = res["checks"]["int8:128"], res["checks"]["int4:128"]
    assert c8["logits_max_abs_diff_vs_nccl"] < c4["logits_max_abs_diff_vs_nccl"]
    assert c4["logits_max_abs_diff_vs_nccl"] < 0.5 * c4["logits_scale"]
    # the long check prompt: 0.1 MiB / (2 B x 256 hidden) = 204 tokens, every rank equal
    assert c8["long_prompt_tokens"] == 204 and c8["long_logits_finite"]
    assert 0 < c8["long_logits_rel_err_vs_nccl"] < c4["long_logits_rel_err_vs_nccl"] < 0.5
    # an 8k-token prefill's sum (fp32 on CPU, 8 MiB) runs in the default 4 MiB pieces
    assert res["backends"]["int4:128"]["prefill_8k"].split("; transport ")[0] == \
        "two-step in pieces of 4194304 B with int4:128"
    assert res["backends"]["auto"]["prefill_8k"].startswith("auto -> native; transport socket")
    assert res["backends"]["native"]["prefill_8k"].startswith("native")
    assert {r["comm"] for r in res["ttft_comm_removed"]} <= {"auto", "int8:128", "int4:128"}
    assert res["tpot_floor_ms"] > 0 and res["matmul_TFLOPs"] > 0
    for r in res["rows"]:
        if r["phase"] == "prefill":   # CPU: never graphed; the floor from the same run
            assert r["graph"] is False and r["flops"] > 0
            assert r["floor_ms"] == pytest.approx(r["flops"] / res["matmul_TFLOPs"] / 1e9)


@pytest.mark.parametrize("name,kind", [
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "allreduce"),
    ("void (anonymous namespace)::quantize_kernel<Bf16Bits, 1, 4, 128, true, false>", "allreduce"),
    ("_dequantize_kernel", "allreduce"),
    ("flash_fwd_splitkv_kernel", "attention"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "gemm"),
    ("triton_poi_fused_add_mul_rsqrt_0", "elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("Memcpy DtoD (Device -> Device)", "copy"),
    ("some_custom_kernel", "other"),
])
def test_profile_kernel_kinds(name, kind):
    from megatron_lite.lab.benchmark import kernel_kind
    assert kernel_kind(name) == kind


def test_compare_runs_matches_rows_and_profiles():
    from megatron_lite.lab.benchmark import compare_runs, format_comparison
    prof = lambda k, g: dict(kernels_per_step=k, busy_ms_per_step=1.0, span_ms_per_step=2.0,
                             by_kind={"gemm": dict(kernels=k, ms=g)})
    now = dict(rows=[dict(phase="prefill", batch=1, tokens=512, comm="auto", ms=3.0),
                     dict(phase="decode", batch=1, tokens=1024, comm="auto", ms=2.0, graph=True),
                     dict(phase="decode", batch=1, tokens=1024, comm="auto", ms=9.0, graph=False)],
               decode_profile_b1={"auto": prof(400, 1.5)},
               prefill_profile={"auto": dict(tokens=8192, batch=1, **prof(90, 60.0)),
                                "native": dict(tokens=8192, batch=1, **prof(90, 50.0))})
    before = dict(date="d", device="x",
                  rows=[dict(phase="prefill", batch=1, tokens=512, comm="auto", ms=6.0),
                        dict(phase="decode", batch=1, tokens=1024, comm="auto", ms=4.0),
                        dict(phase="decode", batch=1, tokens=1024, comm="int4:128", ms=1.0)],
                  decode_profile_b1={"auto": prof(1000, 2.0)},
                  prefill_profile={"auto": dict(tokens=8192, batch=1, **prof(100, 70.0)),
                                   "native": dict(tokens=2048, batch=1, **prof(90, 9.0))})
    cmp = compare_runs(now, before)
    # a prefill profile of another case is not compared
    assert cmp["profiles"]["prefill auto"]["gemm_ms"] == dict(now=60.0, before=70.0)
    assert "prefill native" not in cmp["profiles"]
    assert [(r["phase"], r["graph"], r["ratio"]) for r in cmp["rows"]] == [
        ("prefill", True, 0.5), ("decode", True, 0.5)]     # eager decode: not measured there
    assert cmp["profiles"]["auto"]["kernels_per_step"] == dict(now=400, before=1000)
    assert cmp["profiles"]["auto"]["gemm_ms"] == dict(now=1.5, before=2.0)
    text = format_comparison(cmp)
    assert "0.500x" in text and "kernels_per_step 400 vs 1e+03" in text
    assert "prefill auto profile: kernels_per_step 90 vs 100" in text


@pytest.mark.parametrize("content,msg", [(None, "cannot read it"),
                                         ('{"a": 1}', "not a tools/bench_generate.py")])
def test_compare_to_bad_file_fails_before_the_run(tmp_path, capsys, content, msg):
    path = tmp_path / "old.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as e:
        bench.main(["--random-weights", "tiny", "--compare-to", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --compare-to") and msg in err and "\n" not in err


def test_plot_from_json(tmp_path):
    rows = [dict(phase=ph, batch=b, tokens=t, comm=c, ms=ms)
            for ph, b, t in (("prefill", 1, 512), ("decode", 1, 1024))
            for c, ms in (("native", 2.0), ("int4", 1.5))]
    ours = dict(device="x", tp=2, shape="tiny", context=1024, rows=rows)
    hf = dict(device="x", tp=2, shape="tiny", rows=[dict(rows[0], comm="hf-tp", ms=9.0)])
    paths = []
    for name, obj in (("a.json", ours), ("b.json", hf)):
        paths.append(tmp_path / name)
        paths[-1].write_text(json.dumps(obj))
    out = tmp_path / "p.png"
    assert bench.main(["--plot", str(out), "--from-json", *map(str, paths)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
