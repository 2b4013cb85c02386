"""KV cache layouts: ring buffers for sliding-window layers, decode reads of the live slots.

The ``live`` layout (ring buffers of the window's size on sliding layers, decode steps that
read only a power-of-two bucket of the written slots) must compute what the ``full``
layout (``max_seq`` slots on every layer, every step reads them all: the engine before ring
buffers) computes: the same greedy tokens and decode logits to fp32 rounding, on tiny
random models whose window (8) is far shorter than the prompts and generations, with
right-padded batches whose rows are shorter and longer than the window. The real
Gemma-3-270M check, TP 1 and 2, is in tests/test_kv_cache_real.py.
"""
from __future__ import annotations

import functools

import pytest
import torch

from megatron_lite.comm.communicator import DistCommunicator
from megatron_lite.inference.kv_cache import KVCache, read_buckets
from megatron_lite.models import decoder as decoder_mod
from megatron_lite.models.config import FULL, SLIDING, ModelConfig
from megatron_lite.models.decoder import attention_mask
from megatron_lite.parallel_state import TPGroup
from tests.tiny_configs import SLIDING_WINDOW, hf_config_dict, make_hf_model


@functools.lru_cache(maxsize=None)
def _hf(name):
    return make_hf_model(name)


def _engine(name, **kw):
    from megatron_lite.inference.engine import Engine
    return Engine.from_hf_state_dict(hf_config_dict(name), _hf(name).state_dict(),
                                     group=TPGroup(DistCommunicator(None)), device="cpu", **kw)


# --------------------------------------------------------------------- the ring mask
@pytest.mark.parametrize("window,ring", [(8, 8), (5, 8), (8, 12)])
def test_ring_mask_selects_the_positions_of_the_full_mask(window, ring):
    """Write positions 0..p in order into a ring of ``ring`` slots (slot = position mod
    ring); the ring mask must let the query at p read exactly the positions the one-slot-
    per-position mask lets it read, for every p (before, at and long after the wrap)."""
    held = torch.full((ring,), -1)
    for p in range(4 * ring):
        held[p % ring] = p
        pos = torch.tensor([[p]])
        got = attention_mask(pos, ring, window, ring=ring)[0, 0, 0]
        want = attention_mask(pos, 4 * ring, window)[0, 0, 0].nonzero().flatten()
        assert sorted(held[got].tolist()) == want.tolist(), p
        assert (held[got] >= 0).all()


# --------------------------------------------------------------------- sizes
def test_cache_sizes_and_read_buckets():
    cfg = ModelConfig.from_hf(hf_config_dict("gemma3_text"))   # window 8; sliding, full, s, s
    assert cfg.layer_types == (SLIDING, FULL, SLIDING, SLIDING)
    live = KVCache(cfg, 1, 3, 192, torch.float32, "cpu")
    full = KVCache(cfg, 1, 3, 192, torch.float32, "cpu", layout="full")
    assert live.slots == [8, 192, 8, 8] and full.slots == [192] * 4
    assert [t.shape[2] for t in live.k] == live.slots == [t.shape[2] for t in live.v]
    per_slot = 3 * cfg.local_kv_heads(1) * cfg.head_dim * 4 * 2          # B x kv x D x fp32, K+V
    assert live.nbytes == per_slot * (192 + 3 * 8) < full.nbytes == per_slot * 4 * 192
    assert live.buckets == read_buckets(192) == (64, 128, 192) and full.buckets == (192,)
    assert [live.read_len(n) for n in (1, 64, 65, 129, 192)] == [64, 64, 128, 192, 192]
    assert full.read_len(5) == 192
    assert live.read_bytes(64) == per_slot * (64 + 3 * 8)
    assert read_buckets(64) == (64,) and read_buckets(1000) == (64, 128, 256, 512, 1000)
    with pytest.raises(ValueError, match="do not fit"):
        live.read_len(193)
    with pytest.raises(ValueError, match="layout"):
        KVCache(cfg, 1, 1, 64, torch.float32, "cpu", layout="ring")
    # a window longer than the cache: one slot per position, like a full layer
    assert KVCache(cfg, 1, 1, 4, torch.float32, "cpu").slots == [4] * 4
    llama = ModelConfig.from_hf(hf_config_dict("llama"))
    assert KVCache(llama, 1, 2, 128, torch.float32, "cpu").nbytes == \
        KVCache(llama, 1, 2, 128, torch.float32, "cpu", layout="full").nbytes


# --------------------------------------------------------------------- live == full
PROMPTS = [[1, 17, 33, 99, 5, 61, 7, 8, 120, 4, 4, 9, 31, 77, 150, 12, 6, 90, 91, 45, 3, 33,
            18, 200, 11, 42, 8, 8, 19, 64],                 # 30 tokens: > window
           [1, 200, 3, 9, 14],                              # 5: < window
           [1, 50, 51, 52, 53, 54, 55, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]]  # 17
NEW = 100   # max_seq 192 (130 rounded up to 64): decode reads buckets 64, 128 and 192


def _teacher_forced(eng, ids, tokens):
    """Prefill ``ids`` (right-padded), then decode ``tokens`` [B, n] step by step the way
    ``generate`` does; logits [B, n + 1, V] (the prefill's last-token logits first)."""
    B, lengths = len(ids), [len(x) for x in ids]
    T = max(lengths)
    batch = torch.zeros(B, T, dtype=torch.long)
    for b, x in enumerate(ids):
        batch[b, :len(x)] = torch.tensor(x)
    out = [eng.prefill(batch, torch.tensor(lengths), eng.cache_len(T, tokens.shape[1] + 1))]
    pos = torch.tensor(lengths)
    for step in range(1, tokens.shape[1] + 1):
        out.append(eng._decode(tokens[:, step - 1], pos, T + step))
        pos = pos + 1
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "mistral", "qwen2_sliding", "llama"])
def test_live_layout_matches_full_layout(name, monkeypatch):
    live, full = _engine(name, max_batch_size=3), _engine(name, max_batch_size=3,
                                                          kv_layout="full")
    live.eos_token_ids = full.eos_token_ids = ()
    reads = []
    real = decoder_mod.attention
    monkeypatch.setattr(decoder_mod, "attention",
                        lambda q, k, *a: reads.append((q.shape[2], k.shape[2])) or
                        real(q, k, *a))
    got = [r.token_ids for r in live.generate(PROMPTS, max_new_tokens=NEW)]
    live_reads = reads[:]
    reads.clear()
    want = [r.token_ids for r in full.generate(PROMPTS, max_new_tokens=NEW)]
    assert got == want and all(len(t) == NEW for t in got)

    cfg, L = live.cfg, live.cfg.num_layers
    n_sliding = cfg.layer_types.count(SLIDING)
    # decode reads: full-attention layers the bucket of the live slots, sliding ones the ring
    decode_live = {k for _, k in live_reads[L:]}
    decode_full = {k for _, k in reads[L:]}
    assert decode_full == {192}
    assert decode_live == ({64, 128, 192} if n_sliding < L else set()) | \
        ({SLIDING_WINDOW} if n_sliding else set())
    assert live.cache.nbytes < full.cache.nbytes if n_sliding else \
        live.cache.nbytes == full.cache.nbytes
    assert live.cache.slots.count(SLIDING_WINDOW) == n_sliding

    # logits along the generated tokens, each layout through its own cache
    tokens = torch.tensor(want)[:, :-1]
    a = _teacher_forced(live, PROMPTS, tokens)
    b = _teacher_forced(full, PROMPTS, tokens)
    assert torch.isfinite(b).all() and b.abs().max() > 1
    if n_sliding == 0:          # no ring: only the read length changed, masked slots add 0
        assert torch.equal(a, b)
    else:                       # the ring orders keys differently: fp32 rounding only
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5 * b.abs().max().item())


def test_multi_token_call_into_a_wrapped_ring_is_refused():
    eng = _engine("gemma3_text")
    cache = KVCache(eng.cfg, 1, 1, 64, torch.float32, "cpu")
    ids = torch.tensor([[5, 6]])
    with pytest.raises(ValueError, match="must be a prefill from position 0"):
        eng.model(ids, torch.tensor([[20, 21]]), cache.k, cache.v, kv_len=64)
    # reading no further than the ring: slot == position, nothing can have wrapped
    out = eng.model(ids, torch.tensor([[3, 4]]), cache.k, cache.v, kv_len=SLIDING_WINDOW)
    assert out.shape[:2] == (1, 2) and torch.isfinite(out).all()


# --------------------------------------------------------------------- bench_generate
def _bench_layouts(rank, world, out_dir):
    import json
    import os

    from megatron_lite.parallel_state import destroy_model_parallel
    from tests.test_calibrate import load_tool
    bench = load_tool("bench_generate")
    out = {}
    for layout in ("live", "full"):
        path = os.path.join(out_dir, f"{layout}.json")
        try:
            bench.main(["--random-weights", "tiny-gemma2", "--comm", "native",
                        "--no-lower-bound", "--prefill", "16x1", "--decode-batches", "1,2",
                        "--context", "100", "--decode-steps", "2", "--repeats", "1",
                        "--check-tokens", "0", "--kv-layout", layout, "--json", path])
        finally:
            destroy_model_parallel()
        out[layout] = json.load(open(path))
    return out


def test_bench_generate_reports_kv_cache_bytes(tmp_path):
    """tiny-gemma2 (layer 0 slides over 64 tokens, layer 1 is global; 4 KV heads of 32,
    fp32 on the CPU) at a 100-token context: 128 slots, of which the sliding layer keeps
    and reads 64 with the live layout."""
    from tests._dist import run_distributed
    res = run_distributed(_bench_layouts, 1, str(tmp_path))[0]
    per_slot = 2 * 4 * 32 * 4                     # K and V, one layer, one sequence
    for layout, slots in (("live", 64 + 128), ("full", 128 + 128)):
        assert res[layout]["kv_layout"] == layout
        rows = [r for r in res[layout]["rows"] if r["phase"] == "decode"]
        assert [r["batch"] for r in rows] == [1, 2]
        for r in rows:
            assert r["kv_cache_bytes"] == r["kv_read_bytes"] == r["batch"] * per_slot * slots
            assert r["floor_ms"] > res[layout]["tpot_floor_ms"] > 0
