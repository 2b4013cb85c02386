"""Gemma-3-270M (real weights, fp32) with its sliding window set to 32 tokens, so that the
ring buffers of the ``live`` KV-cache layout wrap: a 70-token prompt (prefill longer than
twice the window) batched with a 14-token one (shorter than the window, right-padded), 32
greedy tokens each (decode crosses the wrap). At TP 1 and TP 2 (gloo, KV head replicated):

* the ``live`` layout generates the ``full`` layout's tokens (the engine before ring
  buffers: one slot per position on every layer, every step reads all of them), and the
  long prompt's tokens are transformers' for the same config;
* the logits of every generation step agree to fp32 rounding;
* every rank holds bitwise-identical tokens and logits;
* the sliding layers' buffers hold 32 slots instead of ``max_seq``, and the cache's bytes
  shrink accordingly.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests._dist import run_distributed

pytestmark = pytest.mark.slow

WINDOW, NEW = 32, 32
PROMPTS = ["The history of the Roman Empire began with the founding of the city of Rome, "
           "which according to legend took place in 753 BC. Over the following centuries "
           "the small settlement on the Tiber grew into a republic that controlled the "
           "whole of Italy, and later the lands around the Mediterranean Sea. Its army, "
           "its roads and its laws outlived the republic itself, and",
           "Tensor parallelism splits each weight matrix of a transformer across"]


def _config(hf_dir) -> dict:
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["sliding_window"] > 4 * WINDOW      # the override is what makes it wrap
    return dict(cfg, sliding_window=WINDOW)


def _worker(rank, world_size, hf_dir, n):
    from megatron_lite.checkpoint.shards import load_hf_state_dict
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import destroy_model_parallel, initialize_model_parallel
    try:
        eng = Engine.from_hf_state_dict(_config(hf_dir), load_hf_state_dict(hf_dir),
                                        tokenizer=hf_dir, group=initialize_model_parallel(),
                                        dtype=torch.float32, device="cpu", max_batch_size=2)
        eng.eos_token_ids = ()
        ids = [eng.encode(p) for p in PROMPTS]
        out = dict(lengths=[len(x) for x in ids])
        # the logits of generate's own prefill and decode steps
        record, prefill, decode = [], eng.prefill, eng._decode
        eng.prefill = lambda *a, **k: record.append(prefill(*a, **k)) or record[-1]
        eng._decode = lambda *a, **k: record.append(decode(*a, **k)) or record[-1]
        for layout in ("full", "live"):
            eng.kv_layout = layout
            record.clear()
            out[layout] = [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=n)]
            out[f"{layout}_logits"] = torch.stack(record, dim=1)
            out[f"{layout}_slots"] = list(eng.cache.slots)
            out[f"{layout}_bytes"] = eng.cache.nbytes
            out[f"{layout}_max_seq"] = eng.cache.max_seq
        return out
    finally:
        destroy_model_parallel()


def _hf_greedy(hf_dir, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    threads = torch.get_num_threads()
    torch.set_num_threads(2)      # restored below
    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                     sliding_window=WINDOW).eval()
        assert model.config.sliding_window == WINDOW
        ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, temperature=None, top_p=None, top_k=None)
        return gen[0, ids.shape[1]:].tolist()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hf_tokens(gemma3_hf_dir):
    return _hf_greedy(gemma3_hf_dir, NEW)


@pytest.mark.parametrize("tp", [1, 2])
def test_gemma3_ring_cache_matches_full_cache(gemma3_hf_dir, hf_tokens, tp):
    per_rank = run_distributed(_worker, tp, gemma3_hf_dir, NEW)
    for other in per_rank[1:]:      # contract: ranks bitwise identical
        for key, value in per_rank[0].items():
            same = torch.equal(value, other[key]) if torch.is_tensor(value) \
                else value == other[key]
            assert same, key
    r = per_rank[0]
    long, short = r["lengths"]
    assert long > 2 * WINDOW and short < WINDOW
    assert r["live"] == r["full"] and all(len(t) == NEW for t in r["live"])
    # transformers, same config, the long prompt alone (it may stop at EOS)
    assert len(hf_tokens) >= NEW // 2 and r["full"][0][:len(hf_tokens)] == hf_tokens
    a, b = r["live_logits"], r["full_logits"]
    assert torch.isfinite(b).all() and b.abs().max() > 1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())

    # memory: 15 sliding layers of 32 slots instead of max_seq, 3 full layers unchanged
    max_seq = r["live_max_seq"]
    assert r["full_slots"] == [max_seq] * 18 and max_seq == r["full_max_seq"] > WINDOW
    assert sorted(r["live_slots"]) == [WINDOW] * 15 + [max_seq] * 3
    assert r["live_bytes"] * (18 * max_seq) == r["full_bytes"] * (15 * WINDOW + 3 * max_seq)
    print(f"\nTP{tp}: KV cache {r['live_bytes']} B (ring) vs {r['full_bytes']} B (full), "
          f"max_seq {max_seq}; decode logits max |diff| {(a - b).abs().max().item():.2e} "
          f"(scale {b.abs().max().item():.1f})")
