"""The HF <-> TP-shard name map (layout_version 1), shared by the converter and the loader.

One table row per parameter: our name, the HF tensors it is made of, their shapes (in
symbolic dims resolved from the ModelConfig) and a split rule. ``shard_hf_state_dict`` and
``unshard_to_hf`` are the two directions; both are driven only by the table, so a new
parameter is one row. The split rules (docs/architecture.md, "Parameter names and TP layout"):

* ``replicated``   every rank holds the full tensor;
* ``vocab``        rows padded with zeros to ``padded_vocab_size(tp)``, split evenly;
* ``qkv``          rank r: cat(its q heads, its k heads, its v heads) along dim 0; KV heads
                   are replicated when tp > num_kv_heads (``ModelConfig.kv_heads_of_rank``).
                   The q/k/v biases (Qwen2, ``attention_bias``) take the same rows, so
                   ``qkv_proj.bias`` lines up with ``qkv_proj.weight`` on every rank;
* ``rows2``        rank r: cat(its rows of source 0, its rows of source 1) (gate_up_proj);
* ``columns``      dim 1 split evenly (o_proj, down_proj: RowParallelLinear inputs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from megatron_lite.errors import CheckpointError
from megatron_lite.models.config import ModelConfig

LAYOUT_VERSION = 1

# HF buffers that some older checkpoints saved; recomputed from the config, never loaded.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class LayoutError(CheckpointError):
    """HF tensors do not match the config / the layout table (missing, extra, bad shape)."""


@dataclass(frozen=True)
class Entry:
    name: str                           # ours; "{i}" is the layer index
    sources: tuple[str, ...]            # HF names
    shapes: tuple[tuple[str, ...], ...]  # symbolic HF shape of each source
    split: str                          # replicated | vocab | qkv | rows2 | columns
    when: Optional[Callable[[ModelConfig], bool]] = None   # row exists only if true


def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {"vocab": cfg.vocab_size, "hidden": cfg.hidden_size,
            "inter": cfg.intermediate_size, "head_dim": cfg.head_dim,
            "q": cfg.num_heads * cfg.head_dim, "kv": cfg.num_kv_heads * cfg.head_dim}


_L = "model.layers.{i}."
TABLE: tuple[Entry, ...] = (
    Entry("embed_tokens.weight", ("model.embed_tokens.weight",), (("vocab", "hidden"),),
          "vocab"),
    Entry("layers.{i}.input_layernorm.weight", (_L + "input_layernorm.weight",),
          (("hidden",),), "replicated"),
    Entry("layers.{i}.self_attn.qkv_proj.weight",
          (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight",
           _L + "self_attn.v_proj.weight"),
          (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")), "qkv"),
    Entry("layers.{i}.self_attn.qkv_proj.bias",
          (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias",
           _L + "self_attn.v_proj.bias"),
          (("q",), ("kv",), ("kv",)), "qkv", lambda c: c.qkv_bias),
    Entry("layers.{i}.self_attn.o_proj.weight", (_L + "self_attn.o_proj.weight",),
          (("hidden", "q"),), "columns"),
    # Added after the all-reduce, so every rank holds all of it (RowParallelLinear).
    Entry("layers.{i}.self_attn.o_proj.bias", (_L + "self_attn.o_proj.bias",),
          (("hidden",),), "replicated", lambda c: c.o_proj_bias),
    Entry("layers.{i}.self_attn.q_norm.weight", (_L + "self_attn.q_norm.weight",),
          (("head_dim",),), "replicated", lambda c: c.qk_norm),
    Entry("layers.{i}.self_attn.k_norm.weight", (_L + "self_attn.k_norm.weight",),
          (("head_dim",),), "replicated", lambda c: c.qk_norm),
    Entry("layers.{i}.post_attention_layernorm.weight",
          (_L + "post_attention_layernorm.weight",), (("hidden",),), "replicated"),
    Entry("layers.{i}.pre_feedforward_layernorm.weight",
          (_L + "pre_feedforward_layernorm.weight",), (("hidden",),), "replicated",
          lambda c: c.sandwich_norms),
    Entry("layers.{i}.post_feedforward_layernorm.weight",
          (_L + "post_feedforward_layernorm.weight",), (("hidden",),), "replicated",
          lambda c: c.sandwich_norms),
    Entry("layers.{i}.mlp.gate_up_proj.weight",
          (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
          (("inter", "hidden"), ("inter", "hidden")), "rows2"),
    Entry("layers.{i}.mlp.down_proj.weight", (_L + "mlp.down_proj.weight",),
          (("hidden", "inter"),), "columns"),
    Entry("norm.weight", ("model.norm.weight",), (("hidden",),), "replicated"),
    Entry("lm_head.weight", ("lm_head.weight",), (("vocab", "hidden"),), "vocab",
          lambda c: not c.tie_word_embeddings),
)


def expanded_table(cfg: ModelConfig):
    """Yield (our_name, hf_names, hf_shapes, split) for every tensor of this model."""
    dims = _dims(cfg)
    for e in TABLE:
        if e.when is not None and not e.when(cfg):
            continue
        layers = range(cfg.num_layers) if "{i}" in e.name else [None]
        for i in layers:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            yield (fmt(e.name), tuple(fmt(s) for s in e.sources),
                   tuple(tuple(dims[d] for d in shape) for shape in e.shapes), e.split)


# ----------------------------------------------------------------------- shard
def _split_vocab(t: torch.Tensor, cfg: ModelConfig, tp: int, rank: int) -> torch.Tensor:
    vp = cfg.padded_vocab_size(tp)
    per = vp // tp
    lo, hi = rank * per, (rank + 1) * per
    out = torch.zeros((per,) + tuple(t.shape[1:]), dtype=t.dtype)
    real_hi = min(hi, t.shape[0])
    if real_hi > lo:   # padded rows stay zero (docs/architecture.md)
        out[: real_hi - lo] = t[lo:real_hi]
    return out


def _head_rows(t: torch.Tensor, heads: Sequence[int], head_dim: int) -> torch.Tensor:
    return torch.cat([t[h * head_dim:(h + 1) * head_dim] for h in heads], dim=0)


def _even(t: torch.Tensor, tp: int, rank: int, dim: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank]


def _shard_one(split: str, srcs: list[torch.Tensor], cfg: ModelConfig, tp: int,
               rank: int) -> torch.Tensor:
    if split == "replicated":
        return srcs[0]
    if split == "vocab":
        return _split_vocab(srcs[0], cfg, tp, rank)
    if split == "qkv":
        q, k, v = srcs
        nq = cfg.local_heads(tp)
        q_heads = range(rank * nq, (rank + 1) * nq)
        kv_heads = cfg.kv_heads_of_rank(tp, rank)
        return torch.cat([_head_rows(q, q_heads, cfg.head_dim),
                          _head_rows(k, kv_heads, cfg.head_dim),
                          _head_rows(v, kv_heads, cfg.head_dim)], dim=0)
    if split == "rows2":
        return torch.cat([_even(s, tp, rank, 0) for s in srcs], dim=0)
    if split == "columns":
        return _even(srcs[0], tp, rank, 1)
    raise AssertionError(f"unknown split rule {split!r}")


def shard_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig, tp: int,
                        rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tensors (our names, contiguous, owning their memory) from an HF state dict.

    Every HF tensor must be consumed and match its expected shape; otherwise LayoutError
    names the offenders. With tied embeddings an ``lm_head.weight`` equal to the embedding
    (as ``model.state_dict()`` reports it) is accepted and dropped. ``hf_sd`` is only
    indexed, so a lazy mapping (e.g. over safetensors files) works.
    """
    cfg.validate_tp(tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} out of range for TP size {tp}")
    keys = set(hf_sd.keys())
    consumed = {k for k in keys if k.endswith(IGNORED_HF_SUFFIXES)}
    missing, bad_shape, out = [], [], {}
    for name, hf_names, shapes, split in expanded_table(cfg):
        absent = [n for n in hf_names if n not in keys]
        if absent:
            missing += absent
            continue
        srcs = [hf_sd[n] for n in hf_names]
        for n, s, shape in zip(hf_names, srcs, shapes):
            if tuple(s.shape) != shape:
                bad_shape.append(f"{n} {tuple(s.shape)} != expected {shape}")
        consumed.update(hf_names)
        if not bad_shape:
            out[name] = _shard_one(split, srcs, cfg, tp, rank).contiguous().clone()
    if cfg.tie_word_embeddings and "lm_head.weight" in keys:
        emb = hf_sd.get("model.embed_tokens.weight")
        lm = hf_sd["lm_head.weight"]
        if emb is None or lm.shape != emb.shape or not torch.equal(lm, emb):
            raise LayoutError("tie_word_embeddings is true but lm_head.weight differs from "
                              "model.embed_tokens.weight")
        consumed.add("lm_head.weight")
    if missing:
        raise LayoutError(f"missing HF tensors: {_short(missing)}")
    if bad_shape:
        raise LayoutError(f"HF tensor shapes do not match config.json: {_short(bad_shape)}")
    unused = sorted(keys - consumed)
    if unused:
        raise LayoutError(f"HF tensors not consumed by layout v{LAYOUT_VERSION}: "
                          f"{_short(unused)}")
    return out


def _short(items: list[str], n: int = 8) -> str:
    s = ", ".join(items[:n])
    return s + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------- unshard
def _unshard_one(split: str, parts: list[torch.Tensor], cfg: ModelConfig,
                 tp: int) -> list[torch.Tensor]:
    hd = cfg.head_dim
    if split == "replicated":
        return [parts[0]]
    if split == "vocab":
        return [torch.cat(parts, dim=0)[: cfg.vocab_size]]
    if split == "rows2":
        halves = [p.chunk(2, dim=0) for p in parts]
        return [torch.cat([h[j] for h in halves], dim=0) for j in range(2)]
    if split == "columns":
        return [torch.cat(parts, dim=1)]
    if split == "qkv":
        nq, nkv = cfg.local_heads(tp) * hd, cfg.local_kv_heads(tp) * hd
        qs, ks, vs = zip(*(p.split([nq, nkv, nkv], dim=0) for p in parts))
        k_heads, v_heads = {}, {}
        for rank in range(tp):   # each KV head from the first rank that holds it
            for j, h in enumerate(cfg.kv_heads_of_rank(tp, rank)):
                k_heads.setdefault(h, ks[rank][j * hd:(j + 1) * hd])
                v_heads.setdefault(h, vs[rank][j * hd:(j + 1) * hd])
        order = range(cfg.num_kv_heads)
        return [torch.cat(qs, dim=0), torch.cat([k_heads[h] for h in order], dim=0),
                torch.cat([v_heads[h] for h in order], dim=0)]
    raise AssertionError(f"unknown split rule {split!r}")


def unshard_to_hf(rank_sds: Sequence[Mapping[str, torch.Tensor]],
                  cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of ``shard_hf_state_dict``: the HF state dict, bitwise equal to the original.

    ``rank_sds[r]`` is rank r's dict; ``len(rank_sds)`` is the TP size. Tied models get no
    ``lm_head.weight`` (as ``save_pretrained`` writes them).
    """
    tp = len(rank_sds)
    cfg.validate_tp(tp)
    expected, out = set(), {}
    for name, hf_names, shapes, split in expanded_table(cfg):
        expected.add(name)
        absent = [r for r, sd in enumerate(rank_sds) if name not in sd]
        if absent:
            raise LayoutError(f"shard of rank {absent[0]} lacks {name}")
        tensors = _unshard_one(split, [sd[name] for sd in rank_sds], cfg, tp)
        for n, t, shape in zip(hf_names, tensors, shapes):
            if tuple(t.shape) != shape:
                raise LayoutError(f"{name}: rebuilt {n} has shape {tuple(t.shape)}, "
                                  f"expected {shape}")
            out[n] = t.contiguous().clone()
    extra = sorted(set().union(*(sd.keys() for sd in rank_sds)) - expected)
    if extra:
        raise LayoutError(f"unexpected tensors in shards: {_short(extra)}")
    return out


def rank_shapes(cfg: ModelConfig, tp: int) -> dict[str, tuple[int, ...]]:
    """Shape of every tensor of one rank (identical on all ranks), for verifying shards."""
    shapes = {}
    for name, _, hf_shapes, split in expanded_table(cfg):
        if split == "replicated":
            shapes[name] = hf_shapes[0]
        elif split == "vocab":
            shapes[name] = (cfg.padded_vocab_size(tp) // tp, cfg.hidden_size)
        elif split == "qkv":   # the weight [rows, hidden] or the bias [rows]
            rows = (cfg.local_heads(tp) + 2 * cfg.local_kv_heads(tp)) * cfg.head_dim
            shapes[name] = (rows,) + hf_shapes[0][1:]
        elif split == "rows2":
            shapes[name] = (2 * hf_shapes[0][0] // tp, hf_shapes[0][1])
        else:
            shapes[name] = (hf_shapes[0][0], hf_shapes[0][1] // tp)
    return shapes
