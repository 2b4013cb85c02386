"""One tensor-parallel decoder for llama, gemma, gemma2, gemma3_text, qwen2, qwen3, mistral.

Every difference between the families is a ModelConfig field; parameter names follow
docs/architecture.md (HF names without ``model.``, fused ``qkv_proj`` and ``gate_up_proj``).
Numerics follow transformers 5.x ``modeling_{llama,gemma,gemma2,gemma3,qwen2,qwen3,mistral}.py``
operation by operation, so fp32 logits match HF to ~1e-6 and bf16 runs round where HF rounds.

Attention reads and writes a static KV cache (megatron_lite/inference/kv_cache.py): layer i
gets ``k_cache``/``v_cache`` of shape [B, n_kv_local, slots_i, head_dim]. On a full-attention
layer token t of sequence b sits in slot ``positions[b, t]`` (slot == RoPE position), so
batches of prompts of different lengths need no per-sequence offsets: a query at position p
sees slots j <= p. A sliding-window layer's cache is a ring buffer: position p sits in slot
``p % slots_i`` (RoPE still uses p), and the mask maps each slot back to the position it
holds (``attention_mask``), so a query sees exactly the positions (p - window, p] it saw
with one slot per position. Slots beyond a sequence's current position may hold stale
values (right padding); the mask never lets a query read them.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.comm.norm import rms_norm
from megatron_lite.models.config import SLIDING, ModelConfig, RopeConfig
from megatron_lite.parallel_state import TPGroup
from megatron_lite.tensor_parallel import (ColumnParallelLinear, ParallelLMHead,
                                           RowParallelLinear, VocabParallelEmbedding)

_ACTS = {
    "silu": F.silu,
    # Gemma's GeGLU uses the tanh approximation (transformers ACT2FN["gelu_pytorch_tanh"]).
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * (offset + w), statistics in fp32 (comm/norm.py's
    ``rms_norm``, the one definition the fused all-reduce kernel follows too).

    Llama (offset 0): normalise in fp32, cast back to the input dtype, *then* multiply by w
    (LlamaRMSNorm). Gemma (offset 1, ``scale_in_fp32``): the checkpoint stores w - 1 and the
    multiply by (1 + w) also happens in fp32 before the single cast (GemmaRMSNorm; the
    Gemma reference implementation does the same to avoid a bf16 round trip).
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0, scale_in_fp32: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.dim, self.eps, self.offset, self.scale_in_fp32 = dim, eps, offset, scale_in_fp32
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.offset, self.scale_in_fp32)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies (fp32, [head_dim/2]) as transformers' modeling_rope_utils computes them."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        # Linear position interpolation: positions / factor == inv_freq / factor.
        return inv / rope.factor
    if rope.rope_type == "llama3":
        # Llama 3.1 (transformers _compute_llama3_parameters): wavelengths longer than
        # original_ctx / low_freq_factor are slowed down by `factor`, shorter than
        # original_ctx / high_freq_factor are kept, and the band between is interpolated.
        ctx = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = ctx / rope.low_freq_factor, ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor -
                                                           rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin [B, T, head_dim] for integer positions [B, T]; angles in fp32 (as HF)."""
    freqs = positions.unsqueeze(-1).float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]: HF's rotate-half convention (pairs (i, i + D/2))."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def attention_mask(positions: torch.Tensor, kv_len: int, window: Optional[int],
                   ring: Optional[int] = None) -> torch.Tensor:
    """Bool [B, 1, T, kv_len]: query at position p may read cache slot j.

    Slot j holds position q = j; in a ring buffer of ``ring`` slots, written in position
    order up to the query's own position, it holds the latest q == j (mod ring) with q <= p,
    i.e. q = p - ((p - j) mod ring), and q < 0 means not written yet.
    Causal: 0 <= q <= p. Sliding window W: also q > p - W, i.e. W tokens *including* the
    current one (transformers masking_utils.sliding_window_overlay: ``kv_idx > q_idx - W``).
    """
    j = torch.arange(kv_len, device=positions.device)
    p = positions.unsqueeze(-1)
    if ring is None:
        q, allowed = j, j <= p
    else:
        q = p - torch.remainder(p - j, ring)
        allowed = q >= 0
    if window is not None:
        allowed = allowed & (q > p - window)
    return allowed.unsqueeze(1)


class KVPlan(NamedTuple):
    """How every layer of one type uses its cache in one forward call.

    ``slot`` [B, n]: the cache slots this call writes, from this call's tokens ``src``
    [B, n] (None: all T tokens, in order). With ``src`` set (a prefill longer than the ring)
    attention reads this call's own K/V, ``read`` = T of them; otherwise the first ``read``
    cache slots, after the write. ``mask``: ``attention_mask`` over what is read (None:
    plain causal)."""
    mask: Optional[torch.Tensor]
    read: int
    slot: torch.Tensor
    src: Optional[torch.Tensor]


def kv_plan(positions: torch.Tensor, slots: int, kv_len: int, window: Optional[int],
            causal_prefill: bool, plain: bool,
            lengths: Optional[torch.Tensor] = None) -> KVPlan:
    """The ``KVPlan`` of layers whose caches have ``slots`` slots; a window makes the cache
    a ring buffer (slot = position mod slots). ``plain``: causal attention needs no mask
    unless the window is shorter than the call. ``lengths`` [B]: real tokens per
    right-padded row of a prefill (None: all)."""
    B, T = positions.shape
    if window is None or slots >= kv_len:   # slot == position: no wrap can happen
        if kv_len > slots:
            raise ValueError(f"cannot read {kv_len} slots of a {slots}-slot KV cache")
        mask = None if plain and (window is None or window >= T) else \
            attention_mask(positions, kv_len, window)
        return KVPlan(mask, kv_len, positions, None)
    if T == 1:   # decode: write the ring slot, then read the whole ring
        return KVPlan(attention_mask(positions, slots, window, ring=slots), slots,
                      torch.remainder(positions, slots), None)
    if not causal_prefill:
        raise ValueError(f"a {T}-token call that reads {kv_len} positions through a "
                         f"{slots}-slot ring buffer must be a prefill from position 0 "
                         "(causal_prefill): its earlier tokens would read slots that its "
                         "later ones overwrote")
    # Longer than the ring: attention reads the call's own K/V; the ring keeps, per row, the
    # `slots` tokens that end at its last real token (or tokens 0 .. slots-1 when the row is
    # shorter: the padding among them sits beyond the row's position, masked until a decode
    # step overwrites it). Consecutive positions fill every slot exactly once.
    last = torch.full((B,), T, device=positions.device) if lengths is None else lengths
    src = (last.clamp(min=slots) - slots).unsqueeze(1) + torch.arange(slots,
                                                                       device=positions.device)
    return KVPlan(attention_mask(positions, T, window), T, torch.remainder(src, slots), src)


def attention(q, k, v, mask, scale: float, softcap: Optional[float]) -> torch.Tensor:
    """softmax(scale * q k^T (+ softcap), masked) v for q [B, Hq, T, D], k/v [B, Hkv, S, D].

    q head h reads KV head h // (Hq / Hkv) (HF repeat_kv). Without soft-capping this is
    SDPA; Gemma 2's ``cap * tanh(scores / cap)`` sits between the scaling and the softmax,
    which SDPA cannot express, so that path is written out (softmax in fp32, as HF eager).
    """
    B, hq, T, D = q.shape
    hkv, S = k.shape[1], k.shape[2]
    if mask is None:   # plain causal prefill from position 0 (see Transformer.forward)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=hq != hkv)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=hq != hkv)
    g = hq // hkv
    scores = torch.matmul(q.reshape(B, hkv, g * T, D), k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, hkv, g, T, S).masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs.view(B, hkv, g * T, S), v).view(B, hq, T, D)


class ParallelAttention(nn.Module):
    """Self-attention with heads split over TP ranks.

    qkv_proj is column-parallel: rank r computes its q heads and its KV heads (an even
    share, or one replicated KV head when tp > num_kv_heads). o_proj is row-parallel over
    the same q heads and its all-reduce is the attention block's one TP sum. Biases
    (``qkv_bias``: Qwen2, ``attention_bias``) follow the rows of the fused projection;
    ``o_proj_bias`` is added once, after the all-reduce.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, group: TPGroup, device=None,
                 dtype=None):
        super().__init__()
        tp = group.world_size
        self.hd, self.nq, self.nkv = cfg.head_dim, cfg.local_heads(tp), cfg.local_kv_heads(tp)
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_logit_softcap
        self.qkv_proj = ColumnParallelLinear(
            cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * self.hd, group=group,
            output_size_per_partition=(self.nq + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias,
            device=device, dtype=dtype)
        self.o_proj = RowParallelLinear(cfg.num_heads * self.hd, cfg.hidden_size, group=group,
                                        site=f"layers.{layer_idx}.self_attn.o_proj",
                                        bias=cfg.o_proj_bias, device=device, dtype=dtype)
        if cfg.qk_norm:
            # Gemma 3 and Qwen 3 normalise q and k per head, after the projection (and its
            # bias) and before RoPE (Gemma3Attention.forward, Qwen3Attention.forward).
            norm = dict(eps=cfg.rms_norm_eps, offset=cfg.norm_offset,
                        scale_in_fp32=cfg.norm_scale_fp32, device=device, dtype=dtype)
            self.q_norm, self.k_norm = RMSNorm(self.hd, **norm), RMSNorm(self.hd, **norm)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, plan: KVPlan, k_cache, v_cache):
        return self.o_proj(self.context(x, cos, sin, plan, k_cache, v_cache))

    def context(self, x, cos, sin, plan: KVPlan, k_cache, v_cache):
        """The attention output of this rank's heads [B, T, nq * hd]: o_proj's input."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.nq * self.hd, self.nkv * self.hd,
                                          self.nkv * self.hd], dim=-1)
        q = q.view(B, T, self.nq, self.hd).transpose(1, 2)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rows = torch.arange(B, device=x.device).unsqueeze(1)
        if plan.src is None:
            # Write this call's K/V into their slots (per sequence), then read the cache.
            k_cache[rows, :, plan.slot] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, plan.slot] = v.view(B, T, self.nkv, self.hd).to(v_cache.dtype)
            keys, values = k_cache[:, :, :plan.read], v_cache[:, :, :plan.read]
        else:
            # A prefill longer than the ring: keep the planned tokens, attend over all.
            v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
            keys, values = k.to(k_cache.dtype), v.to(v_cache.dtype)
            idx = plan.src[:, None, :, None].expand(B, self.nkv, plan.src.shape[1], self.hd)
            k_cache[rows, :, plan.slot] = keys.gather(2, idx).transpose(1, 2)
            v_cache[rows, :, plan.slot] = values.gather(2, idx).transpose(1, 2)
        out = attention(q, keys, values, plan.mask, self.scale, self.softcap)
        return out.transpose(1, 2).reshape(B, T, self.nq * self.hd)


class ParallelMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate/up fused and column-parallel, down row-parallel."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, group: TPGroup, device=None,
                 dtype=None):
        super().__init__()
        self.act = _ACTS[cfg.hidden_act]
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.intermediate_size,
                                                 group=group, device=device, dtype=dtype)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, group=group,
                                           site=f"layers.{layer_idx}.mlp.down_proj",
                                           device=device, dtype=dtype)

    def forward(self, x):
        return self.down_proj(self.hidden(x))

    def hidden(self, x):
        """act(gate(x)) * up(x) of this rank's columns: down_proj's input."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.act(gate) * up


class DecoderLayer(nn.Module):
    """Pre-norm block; with ``sandwich_norms`` (Gemma 2/3) attention and MLP outputs are
    normalised again before the residual add, and ``post_attention_layernorm`` is that
    post-attention norm (in Llama/Gemma it is the pre-MLP norm).

    ``forward(x, normed, next_norm, ...)`` takes the residual stream ``x`` and its
    input norm ``normed = input_layernorm(x)``, and returns ``(x', next_norm(x'))``
    (``None`` for the second when ``next_norm`` is None: the last layer). Each of the two
    row-parallel reduces hands its residual add and the norm after it to the comm layer
    in one call (``RowParallelLinear.forward_add_rmsnorm``), so the norm of the next
    layer's input is computed by this layer's last reduce: a communicator with the fused
    kernel does the sum, the add and the norm in one launch; every other one computes
    exactly ``x + h`` and the norms as torch ops."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, group: TPGroup, device=None,
                 dtype=None):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset,  # noqa: E731
                               cfg.norm_scale_fp32, device=device, dtype=dtype)
        self.layer_type = cfg.layer_types[layer_idx]
        self.sandwich = cfg.sandwich_norms
        self.layout = cfg.residual_layout
        self.eps, self.offset, self.scale_in_fp32 = (cfg.rms_norm_eps, cfg.norm_offset,
                                                      cfg.norm_scale_fp32)
        self.input_layernorm = norm()
        self.self_attn = ParallelAttention(cfg, layer_idx, group, device, dtype)
        self.post_attention_layernorm = norm()
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = ParallelMLP(cfg, layer_idx, group, device, dtype)

    def _reduce(self, proj: RowParallelLinear, h, x, norm: Optional[RMSNorm],
                post: Optional[RMSNorm]):
        """``(x + post(proj(h)), norm(...))`` through one comm call (post: sandwich)."""
        return proj.forward_add_rmsnorm(
            h, x, norm.weight if norm is not None else None, self.eps, layout=self.layout,
            post_norm_weight=post.weight if post is not None else None, offset=self.offset,
            scale_in_fp32=self.scale_in_fp32)

    def forward(self, x, normed, next_norm: Optional[RMSNorm], cos, sin, plan: KVPlan,
                k_cache, v_cache):
        h = self.self_attn.context(normed, cos, sin, plan, k_cache, v_cache)
        if self.sandwich:
            x, normed = self._reduce(self.self_attn.o_proj, h, x,
                                     self.pre_feedforward_layernorm,
                                     self.post_attention_layernorm)
            return self._reduce(self.mlp.down_proj, self.mlp.hidden(normed), x, next_norm,
                                self.post_feedforward_layernorm)
        x, normed = self._reduce(self.self_attn.o_proj, h, x, self.post_attention_layernorm,
                                 None)
        return self._reduce(self.mlp.down_proj, self.mlp.hidden(normed), x, next_norm, None)


class Transformer(nn.Module):
    """Embedding -> decoder layers -> final norm -> vocab-parallel LM head.

    ``forward(tokens, positions, k_caches, v_caches, kv_len, logits_index)``:
    tokens/positions [B, T] (device tensors), caches per layer, ``kv_len`` a Python int
    (how many cache slots attention reads, the static shape: every position a query may see
    must be below it; a ring buffer shorter than that is read whole). Returns logits
    [B, T, vocab] or, with ``logits_index`` [B], only those positions' logits [B, vocab].
    No host syncs, no data-dependent Python branches.
    """

    def __init__(self, cfg: ModelConfig, group: TPGroup, device=None, dtype=None):
        super().__init__()
        self.cfg, self.group = cfg, group
        cfg.validate_tp(group.world_size)
        vp = cfg.padded_vocab_size(group.world_size)
        self.embed_tokens = VocabParallelEmbedding(vp, cfg.hidden_size, group=group,
                                                   device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, group, device, dtype)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset,
                            cfg.norm_scale_fp32, device=device, dtype=dtype)
        self.lm_head = ParallelLMHead(cfg.vocab_size, vp, cfg.hidden_size, group=group,
                                      logit_softcap=cfg.final_logit_softcap, device=device,
                                      dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # Buffers are built on the CPU explicitly (even when the parameters are on "meta").
        for layer_type, rope in cfg.rope.items():
            self.register_buffer(f"inv_freq_{layer_type}", rope_inv_freq(rope, cfg.head_dim),
                                 persistent=False)
        # Gemma: embeddings * sqrt(hidden), where the factor is first rounded to the model
        # dtype (HF keeps it as a tensor and multiplies by embed_scale.to(weight.dtype); in
        # bf16 sqrt(3072)=55.43 becomes 55.5).
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size ** 0.5,
                                                         dtype=torch.float32, device="cpu"),
                             persistent=False)
        self.windows = {t: (cfg.sliding_window if t == SLIDING else None)
                        for t in set(cfg.layer_types)}

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor], kv_len: int,
                logits_index: Optional[torch.Tensor] = None,
                causal_prefill: bool = False,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``causal_prefill``: the caller promises positions[b] == arange(T) for every row
        and kv_len == T. Attention is then plain causal wherever no sliding window is
        shorter than T and no soft-cap applies, and SDPA gets ``is_causal`` instead of a
        boolean mask: with an explicit mask it cannot use flash attention, which at 8k
        tokens costs several times the attention time. Only such a prefill may be longer
        than a sliding layer's ring buffer; ``lengths`` [B] (real tokens of right-padded
        rows, default T) then says which tokens each row's ring keeps."""
        h = self.embed_tokens(tokens)
        if self.cfg.scale_embeddings:
            h = h * self.embed_scale.to(h.dtype)
        rope = {t: rope_cos_sin(getattr(self, f"inv_freq_{t}"), positions, h.dtype)
                for t in self.windows}
        T = tokens.shape[1]
        plain = (causal_prefill and kv_len == T and self.cfg.attn_logit_softcap is None)
        slots = {}
        for layer, kc in zip(self.layers, k_caches):   # every layer of a type: same slots
            slots.setdefault(layer.layer_type, kc.shape[2])
        plans = {t: kv_plan(positions, slots[t], kv_len, w, causal_prefill, plain, lengths)
                 for t, w in self.windows.items()}
        n = len(self.layers)
        normed = self.layers[0].input_layernorm(h) if n else None
        for i, (layer, kc, vc) in enumerate(zip(self.layers, k_caches, v_caches)):
            t = layer.layer_type
            # the last reduce of layer i also computes layer i+1's input norm; the final
            # norm stays below, after the row selection
            nxt = self.layers[i + 1].input_layernorm if i + 1 < n else None
            h, normed = layer(h, normed, nxt, *rope[t], plans[t], kc, vc)
        if logits_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), logits_index]
        return self.lm_head(self.norm(h))

    def post_reduce_norms(self) -> dict:
        """``{site: (gain [H] fp32, eps)}`` for every row-parallel reduce whose sum is
        normalised before the residual add (``sandwich_norms``: Gemma 2/3), with
        ``gain = offset + w``; empty for pre-norm models. Norm-aware error feedback
        (comm/feedback.py) needs them to move an error from one site's norm to the next."""
        if not self.cfg.sandwich_norms:
            return {}
        out = {}
        for i, layer in enumerate(self.layers):
            for site, norm in (("self_attn.o_proj", layer.post_attention_layernorm),
                               ("mlp.down_proj", layer.post_feedforward_layernorm)):
                out[f"layers.{i}.{site}"] = (norm.offset + norm.weight.detach().float(), norm.eps)
        return out

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_rank_state_dict(cls, cfg: ModelConfig, group: TPGroup,
                             state: dict[str, torch.Tensor], device=None,
                             dtype: torch.dtype = torch.float32) -> "Transformer":
        """Build on the meta device and adopt ``state`` (this rank's shard) without copies
        beyond the dtype/device cast. Shapes are checked against the layout first."""
        from megatron_lite.checkpoint.layout import LayoutError, rank_shapes
        expected = rank_shapes(cfg, group.world_size)
        problems = [f"{k} missing" for k in expected if k not in state]
        problems += [f"{k} unexpected" for k in state if k not in expected]
        problems += [f"{k} has shape {tuple(state[k].shape)}, expected {s}"
                     for k, s in expected.items() if k in state and tuple(state[k].shape) != s]
        if problems:
            raise LayoutError(f"rank {group.rank} shard does not fit the model: "
                              + "; ".join(problems[:6]))
        device = torch.device(device or "cpu")
        model = cls(cfg, group, device="meta", dtype=dtype)
        sd = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        if cfg.tie_word_embeddings:
            sd["lm_head.weight"] = sd["embed_tokens.weight"]
        model.load_state_dict(sd, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model.to(device).eval()
