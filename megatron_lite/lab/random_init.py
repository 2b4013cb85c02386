"""Random-weight models of real serving shapes, made directly on the device in our TP layout.

For speed benchmarks only (no checkpoint exists for a 70B shape on the GPU machine, and
reading one would dominate the run). The scheme is the one transformers applies to a fresh
model with ``initializer_range = 0.02`` (``PreTrainedModel._init_weights``): every matrix and
embedding ~ normal(0, 0.02), every bias 0, every norm weight at its identity value, i.e. 1
for the ``w * x`` norms of Llama and 0 for Gemma's ``(1 + w) * x`` norms (``norm_offset`` 1).

Each rank draws only its own shard, from generators seeded by (seed, parameter name, shard
unit), so a model is reproducible and no rank ever holds the full tensor:

* q rows of ``qkv_proj``, and every other split matrix: unit = the rank;
* k and v rows of ``qkv_proj``: unit = the global KV head, so a KV head replicated on
  several ranks (tp > num_kv_heads) gets the same values on each of them, as it would
  after sharding one global model;
* vocab-split tables: padded rows (global row >= vocab_size) are zero, as the shard
  format writes them (docs/architecture.md, "Vocab padding").

The global model this defines depends on the TP size; it is not meant to be compared
across TP sizes, only timed.
"""
from __future__ import annotations

import zlib
import torch

from megatron_lite.models.config import ModelConfig
from megatron_lite.models.decoder import Transformer
from megatron_lite.parallel_state import TPGroup

INIT_STD = 0.02   # transformers' default initializer_range for every family we support

# Tiny shapes for CPU smoke runs of the benchmark (same keys as models/shapes.py).
TEST_SHAPES: dict[str, dict] = {
    "tiny": dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=512,
                 num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                 max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
                 hidden_act="silu", tie_word_embeddings=False, bos_token_id=1,
                 eos_token_id=2),
    "tiny-gemma2": dict(model_type="gemma2", vocab_size=1000, hidden_size=256,
                        intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=32, query_pre_attn_scalar=32,
                        sliding_window=64, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0, max_position_embeddings=2048,
                        rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1,
                        pad_token_id=0),
}


def _generator(device: torch.device, seed: int, name: str, unit) -> torch.Generator:
    # crc32 is stable across processes and Python versions (hash() of str is salted).
    key = zlib.crc32(f"{seed}:{name}:{unit}".encode())
    return torch.Generator(device=device).manual_seed(key)


@torch.no_grad()
def init_random_(model: Transformer, seed: int = 0, std: float = INIT_STD) -> Transformer:
    """Fill ``model``'s parameters in place with this rank's shard of a random model."""
    cfg, group = model.cfg, model.group
    rank, tp = group.rank, group.world_size
    device = model.embed_tokens.weight.device
    norm_value = 0.0 if cfg.norm_offset else 1.0
    hd = cfg.head_dim
    for name, p in model.named_parameters():   # a tied lm_head appears once, as embed_tokens
        if name.endswith(".bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(norm_value)
        elif name.endswith("qkv_proj.weight"):
            nq = cfg.local_heads(tp) * hd
            p[:nq].normal_(0.0, std, generator=_generator(device, seed, name, f"q{rank}"))
            heads = cfg.kv_heads_of_rank(tp, rank)
            nkv = len(heads) * hd
            for part, off in (("k", nq), ("v", nq + nkv)):
                for i, h in enumerate(heads):
                    rows = p[off + i * hd: off + (i + 1) * hd]
                    rows.normal_(0.0, std, generator=_generator(device, seed, name, f"{part}{h}"))
        else:
            p.normal_(0.0, std, generator=_generator(device, seed, name, rank))
            if name in ("embed_tokens.weight", "lm_head.weight"):
                start = rank * p.shape[0]
                n_real = max(0, min(p.shape[0], cfg.vocab_size - start))
                p[n_real:].zero_()
    return model


def random_model(hf_config: dict, group: TPGroup, device=None,
                 dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Transformer:
    """This rank's shard of a random model of ``hf_config``, allocated on ``device``."""
    cfg = ModelConfig.from_hf(hf_config)
    cfg.validate_tp(group.world_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    model = Transformer(cfg, group, device=device, dtype=dtype)
    model.to(device)   # the rope / embed-scale buffers are built on the CPU
    return init_random_(model, seed).eval()


def streamed_weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step reads on this rank: every parameter except the input
    embedding table, of which a step reads only B rows (when the LM head is tied to it, the
    table is read once, as the LM head)."""
    skip = None if model.cfg.tie_word_embeddings else id(model.embed_tokens.weight)
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) != skip)


def total_weight_bytes(model: Transformer) -> int:
    """Bytes of every parameter this rank holds (tied tensors once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def resolve_shape(name_or_path: str) -> dict:
    """HF config dict of a named serving shape (models/shapes.py), a test shape, or a
    ``config.json`` path."""
    import copy
    import json
    import os
    from megatron_lite.lab.shapes import SHAPES
    if name_or_path in SHAPES:
        return copy.deepcopy(SHAPES[name_or_path])
    if name_or_path in TEST_SHAPES:
        return copy.deepcopy(TEST_SHAPES[name_or_path])
    if os.path.isfile(name_or_path):
        with open(name_or_path) as f:
            return json.load(f)
    raise ValueError(f"unknown shape {name_or_path!r}: choose one of "
                     f"{', '.join(list(SHAPES) + list(TEST_SHAPES))} or give a config.json path")


def shape_names() -> list[str]:
    from megatron_lite.lab.shapes import SHAPES
    return list(SHAPES) + list(TEST_SHAPES)


__all__ = ["INIT_STD", "TEST_SHAPES", "init_random_", "random_model", "streamed_weight_bytes",
           "total_weight_bytes", "resolve_shape", "shape_names"]
