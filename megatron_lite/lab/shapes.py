"""Serving shapes for random-weight benchmarks, copied from the published HF configs.

Only the fields that determine compute and communication are kept; everything else takes
the transformers default for the model_type. Sources: the ``config.json`` of
meta-llama/Meta-Llama-3-8B, meta-llama/Meta-Llama-3-70B, meta-llama/Llama-2-13b-hf and
google/gemma-2-27b on the Hugging Face hub.
"""
from __future__ import annotations

import copy

_LLAMA3_COMMON = dict(
    model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
    max_position_embeddings=8192, hidden_act="silu", tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
)

SHAPES: dict[str, dict] = {
    "llama3-8b": dict(_LLAMA3_COMMON, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(_LLAMA3_COMMON, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "llama2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120,
                       intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, rms_norm_eps=1e-5, rope_theta=10000.0,
                       max_position_embeddings=4096, hidden_act="silu",
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       torch_dtype="bfloat16"),
    "gemma2-27b": dict(model_type="gemma2", vocab_size=256000, hidden_size=4608,
                       intermediate_size=36864, num_hidden_layers=46, num_attention_heads=32,
                       num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144,
                       sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0, rms_norm_eps=1e-6, rope_theta=10000.0,
                       max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh",
                       hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
                       bos_token_id=2, eos_token_id=1, pad_token_id=0,
                       torch_dtype="bfloat16"),
}


def get_shape(name: str) -> dict:
    """HF-style config dict for a named serving shape (a fresh copy)."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return copy.deepcopy(SHAPES[name])
