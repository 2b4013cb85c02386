"""TP parity against transformers: tiny random models, TP 1/2/4 on real gloo ranks, fp32.

For every tiny config (tests/tiny_configs.py) and TP size, our engine prefills a prompt of
2.5x the sliding window and then decodes 8 tokens through the static KV cache (teacher
forced with fixed tokens); every logit must match transformers' own forward over the full
sequence to 1e-4. A batch of two prompts of different lengths must match HF run on each
prompt alone, and every rank must hold bitwise-identical logits.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from tests._dist import run_distributed
from tests.tiny_configs import SLIDING_WINDOW, TINY_CONFIGS, hf_config_dict, make_hf_model

NAMES = list(TINY_CONFIGS)
TP_SIZES = [1, 2, 4]
PROMPT, DECODE = int(2.5 * SLIDING_WINDOW), 8        # 20 prompt tokens, 8 decode steps
SHORT = 13                                           # second prompt of the batch
TOL = 1e-4


def _token_ids(seed: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=g)


@functools.lru_cache(maxsize=None)
def _reference(name: str):
    """HF model state dict + HF logits on the full sequences (computed once per config)."""
    model = make_hf_model(name)
    a = _token_ids(1, PROMPT + DECODE)
    b = _token_ids(2, SHORT + DECODE)
    with torch.no_grad():
        ref_a = model(a[None]).logits[0]
        ref_b = model(b[None]).logits[0]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return hf_config_dict(name), sd, a, b, ref_a, ref_b


def _engine(hf_cfg, sd):
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import initialize_model_parallel
    return Engine.from_hf_state_dict(hf_cfg, sd, group=initialize_model_parallel(),
                                     dtype=torch.float32, device="cpu")


def _run_case(engine, a, b):
    """Our logits for (single prompt + decode) and (batch of 2 + decode), teacher forced."""
    # single sequence: prefill PROMPT tokens, then DECODE steps
    pre = engine.prefill(a[None, :PROMPT], torch.tensor([PROMPT]), max_seq=64,
                         all_logits=True)[0]
    dec = [engine.decode_step(a[t:t + 1], torch.tensor([t]))[0]
           for t in range(PROMPT, PROMPT + DECODE)]
    single = torch.cat([pre, torch.stack(dec)])
    # batch: right-padded [2, PROMPT], lengths (PROMPT, SHORT), then each at its own position
    tokens = torch.zeros(2, PROMPT, dtype=torch.long)
    tokens[0], tokens[1, :SHORT] = a[:PROMPT], b[:SHORT]
    pre = engine.prefill(tokens, torch.tensor([PROMPT, SHORT]), max_seq=64, all_logits=True)
    pos = torch.tensor([PROMPT, SHORT])
    dec = []
    for k in range(DECODE):
        dec.append(engine.decode_step(torch.stack([a[PROMPT + k], b[SHORT + k]]), pos))
        pos = pos + 1
    dec = torch.stack(dec, dim=1)
    batch_a = torch.cat([pre[0], dec[0]])
    batch_b = torch.cat([pre[1, :SHORT], dec[1]])
    return single, batch_a, batch_b


def _worker(rank, world_size, cases):
    from megatron_lite.parallel_state import destroy_model_parallel
    out = {}
    try:
        for name, (hf_cfg, sd, a, b) in cases.items():
            out[name] = _run_case(_engine(hf_cfg, sd), a, b)
    finally:
        destroy_model_parallel()
    return out


@functools.lru_cache(maxsize=None)
def _ours(tp: int):
    """Per-rank outputs for every config at TP ``tp`` (one spawn for all configs)."""
    cases = {n: _reference(n)[:4] for n in NAMES}
    if tp == 1:
        return [_worker(0, 1, cases)]
    return run_distributed(_worker, tp, cases)


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_prefill_and_decode_match_hf(name, tp):
    *_, ref_a, _ = _reference(name)
    single, _, _ = _ours(tp)[0][name]
    assert single.shape == ref_a.shape
    assert ref_a.abs().max() > 1.0           # logits are O(1): the tolerance means something
    err_prefill = (single[:PROMPT] - ref_a[:PROMPT]).abs().max().item()
    err_decode = (single[PROMPT:] - ref_a[PROMPT:]).abs().max().item()
    assert err_prefill <= TOL, f"{name} TP{tp} prefill max abs diff {err_prefill:.3g}"
    assert err_decode <= TOL, f"{name} TP{tp} decode max abs diff {err_decode:.3g}"


@pytest.mark.parametrize("tp", TP_SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_batch_of_different_lengths_matches_hf_per_prompt(name, tp):
    *_, ref_a, ref_b = _reference(name)
    _, batch_a, batch_b = _ours(tp)[0][name]
    assert (batch_a - ref_a).abs().max().item() <= TOL
    assert (batch_b - ref_b).abs().max().item() <= TOL


@pytest.mark.parametrize("tp", [2, 4])
def test_all_ranks_hold_bitwise_identical_logits(tp):
    per_rank = _ours(tp)
    for name in NAMES:
        for r in range(1, tp):
            for ours, theirs in zip(per_rank[0][name], per_rank[r][name]):
                assert torch.equal(ours, theirs), f"{name}: rank {r} differs from rank 0"


# A config feature must change the logits, or the parity test above would not notice a
# bug in it. Each mutation switches one feature off in *our* config only.
MUTATIONS = {
    "llama: llama3 rope scaling": ("llama", dict(rope_scaling=None, rope_parameters=None)),
    "gemma2: sliding window": ("gemma2", dict(layer_types=["full_attention"] * 3)),
    "gemma2: attention softcap": ("gemma2", dict(attn_logit_softcapping=None)),
    "gemma2: final softcap": ("gemma2", dict(final_logit_softcapping=None)),
    "gemma2: query_pre_attn_scalar": ("gemma2", dict(query_pre_attn_scalar=16)),
    "gemma3: local rope theta": ("gemma3_text", dict(
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": 100000.0}})),
    "gemma3: global rope scaling": ("gemma3_text", dict(
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": 10000.0}})),
    "gemma3: sliding window": ("gemma3_text", dict(layer_types=["full_attention"] * 4)),
    "qwen2: rope theta": ("qwen2", dict(rope_parameters={"rope_type": "default",
                                                         "rope_theta": 10000.0})),
    "qwen2: use_sliding_window": ("qwen2_sliding", dict(use_sliding_window=False,
                                                        layer_types=None)),
    "qwen2: max_window_layers": ("qwen2_sliding", dict(max_window_layers=2, layer_types=None)),
    "mistral: sliding window": ("mistral", dict(sliding_window=None)),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_feature_is_exercised(mutation):
    from megatron_lite.parallel_state import destroy_model_parallel
    name, change = MUTATIONS[mutation]
    hf_cfg, sd, a, b, ref_a, _ = _reference(name)
    hf_cfg = copy.deepcopy(hf_cfg)
    hf_cfg.update(change)
    try:
        single, _, _ = _run_case(_engine(hf_cfg, sd), a, b)
    finally:
        destroy_model_parallel()
    assert (single - ref_a).abs().max().item() > 1e-2


# Biases drawn non-zero must matter: zeroing them in the state dict (the layout is the same)
# must move the logits, so the parity tests above really check how they are sliced/added.
BIASES = {
    "qwen2: q/k/v bias": ("qwen2", ("q_proj.bias", "k_proj.bias", "v_proj.bias")),
    "llama: k bias": ("llama_attn_bias", ("k_proj.bias",)),
    "llama: o_proj bias": ("llama_attn_bias", ("o_proj.bias",)),
}


@pytest.mark.parametrize("which", list(BIASES))
def test_each_bias_is_exercised(which):
    from megatron_lite.parallel_state import destroy_model_parallel
    name, suffixes = BIASES[which]
    hf_cfg, sd, a, b, ref_a, _ = _reference(name)
    zeroed = {k: torch.zeros_like(v) if k.endswith(suffixes) else v for k, v in sd.items()}
    assert sum(k.endswith(suffixes) for k in sd) > 0
    try:
        single, _, _ = _run_case(_engine(hf_cfg, zeroed), a, b)
    finally:
        destroy_model_parallel()
    assert (single - ref_a).abs().max().item() > 1e-2
