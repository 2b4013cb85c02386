"""Tiny random-weight HF configs, one per model_type, that exercise every numeric feature.

All have 4 query heads (TP 1, 2, 4 all valid) and at most 2 KV heads (KV replication at
TP 4). ``make_hf_model`` builds the transformers model with a fixed seed and re-draws every
weight with a spread that keeps activations O(1): with HF's default init (std 0.02, norm
weights 0 or 1, biases 0) logits are ~1e-2 and a 1e-4 parity check would prove little,
Gemma's (1+w) norm offset would never be exercised, and a zero bias would hide a bias
sliced or added in the wrong place.
"""
from __future__ import annotations

import copy
import math

import torch

SLIDING_WINDOW = 8

_BASE = dict(vocab_size=250, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_dropout=0.0)

TINY_CONFIGS: dict[str, dict] = {
    # GQA (4 q heads on 2 kv heads) + llama3 rope scaling; original context 16 < sequence.
    "llama": dict(_BASE, model_type="llama", num_key_value_heads=2, hidden_act="silu",
                  tie_word_embeddings=False, rope_theta=10000.0,
                  rope_scaling=dict(rope_type="llama3", factor=4.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=16)),
    "llama_tied": dict(_BASE, model_type="llama", num_key_value_heads=4, hidden_act="silu",
                       tie_word_embeddings=True, rope_theta=500000.0, num_hidden_layers=2),
    # MQA and head_dim (24) != hidden / heads (16).
    "gemma": dict(_BASE, model_type="gemma", num_key_value_heads=1, head_dim=24,
                  hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, rope_theta=10000.0),
    # both softcaps (small enough that tanh bends), window 8 < 20-token prompts, alternating
    # sliding/global layers, query_pre_attn_scalar != head_dim.
    "gemma2": dict(_BASE, model_type="gemma2", num_key_value_heads=2, head_dim=16,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                   query_pre_attn_scalar=24, sliding_window=8, attn_logit_softcapping=2.0,
                   final_logit_softcapping=3.0, rope_theta=10000.0),
    # QK-norm, mixed layer_types, local/global theta, linear rope scaling on global layers.
    "gemma3_text": dict(_BASE, model_type="gemma3_text", num_key_value_heads=1, head_dim=32,
                        num_hidden_layers=4, hidden_activation="gelu_pytorch_tanh",
                        tie_word_embeddings=True, query_pre_attn_scalar=32, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention",
                                     "sliding_attention", "sliding_attention"],
                        rope_theta=100000.0, rope_local_base_freq=10000.0,
                        rope_scaling=dict(rope_type="linear", factor=2.0)),
    # attention_bias: bias on q, k, v (column-parallel, split with the heads) and on o_proj
    # (row-parallel: added once after the all-reduce).
    "llama_attn_bias": dict(_BASE, model_type="llama", num_key_value_heads=2,
                            hidden_act="silu", tie_word_embeddings=False, rope_theta=10000.0,
                            num_hidden_layers=2, attention_bias=True),
    # Qwen2.5 style: q/k/v bias (none on o_proj), GQA 4 on 2, rope theta 1e6, untied; the
    # sliding window is set but off (use_sliding_window=false), as in Qwen2.5 configs.
    "qwen2": dict(_BASE, model_type="qwen2", num_key_value_heads=2, hidden_act="silu",
                  tie_word_embeddings=False, rope_theta=1_000_000.0, use_sliding_window=False,
                  sliding_window=SLIDING_WINDOW, max_window_layers=1),
    # use_sliding_window=true: layers >= max_window_layers (1 and 2) slide; MQA, tied.
    "qwen2_sliding": dict(_BASE, model_type="qwen2", num_key_value_heads=1, hidden_act="silu",
                          tie_word_embeddings=True, rope_theta=10000.0,
                          use_sliding_window=True, sliding_window=SLIDING_WINDOW,
                          max_window_layers=1),
    # Qwen3: per-head QK-norm, no bias, explicit head_dim (24) != hidden / heads (16).
    "qwen3": dict(_BASE, model_type="qwen3", num_key_value_heads=2, head_dim=24,
                  hidden_act="silu", tie_word_embeddings=False, rope_theta=1_000_000.0,
                  attention_bias=False),
    # Mistral 7B v0.1 style: a sliding window on every layer (window 8 < 20-token prompts).
    "mistral": dict(_BASE, model_type="mistral", num_key_value_heads=2, hidden_act="silu",
                    tie_word_embeddings=False, rope_theta=10000.0,
                    sliding_window=SLIDING_WINDOW),
}



def hf_config(name: str):
    """A transformers config object (eager attention, so softcapping is applied)."""
    from transformers import AutoConfig
    d = copy.deepcopy(TINY_CONFIGS[name])
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    cfg._attn_implementation = "eager"
    return cfg


def hf_config_dict(name: str) -> dict:
    """What ``config.json`` would hold after ``save_pretrained`` (transformers-normalised)."""
    return hf_config(name).to_dict()


@torch.no_grad()
def make_hf_model(name: str, seed: int = 0, dtype=torch.float32):
    """A transformers CausalLM with deterministic random weights of O(1)-activation scale."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name), attn_implementation="eager")
    gen = torch.Generator().manual_seed(seed)
    gemma = TINY_CONFIGS[name]["model_type"].startswith("gemma")
    for pname, p in model.named_parameters():   # tied weights appear once
        if pname.endswith(".bias"):
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        elif p.dim() == 1:   # norms: around 1 for w * x (Llama, Qwen), around 0 for (1+w) * x
            base = 0.0 if gemma else 1.0
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return model.to(dtype).eval()
