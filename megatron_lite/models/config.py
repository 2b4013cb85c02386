"""ModelConfig: everything the one decoder needs, read from an HF ``config.json`` dict.

Model families differ only in the fields below; the decoder never branches on a model name.
``from_hf`` is the single place where a ``model_type`` is turned into fields, using the
transformers defaults for keys a config leaves out (source: ``configuration_<type>.py`` of
transformers 5.x). It understands both config generations:

* transformers >= 5: ``rope_parameters`` (one dict, or for gemma3 a dict keyed by layer type);
* older files: ``rope_theta`` + ``rope_scaling`` (+ gemma3's ``rope_local_base_freq`` and
  ``sliding_window_pattern``).

Which layers use a sliding window follows one of three transformers rules (``window_rule``):
``pattern`` (``layer_types``, or gemma's every-``sliding_window_pattern``-th layer global),
``max_window_layers`` (qwen2/qwen3: with ``use_sliding_window`` the layers from
``max_window_layers`` on) or ``all`` (mistral: every layer when ``sliding_window`` is set).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from megatron_lite.errors import ConfigError

if TYPE_CHECKING:   # a config (which the tools' --help reads) imports no comm module
    from megatron_lite.comm.layout import Layout

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedModelError(ConfigError):
    """The config describes an architecture (or a feature of one) we do not implement."""


class TPSizeError(ConfigError):
    """The tensor-parallel size does not split this model's heads / MLP evenly."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer type.

    ``rope_type``: "default", "linear" (inv_freq / factor) or "llama3" (piecewise scaling of
    low frequencies; see ``megatron_lite.models.decoder.rope_inv_freq``).
    """
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


# transformers defaults per model_type for keys a config.json may omit, plus the numeric
# conventions of each family (sources: transformers/models/<type>/modeling_<type>.py).
_LLAMA = dict(
    act_keys=("hidden_act",), act="silu", theta={FULL: 10000.0}, tie=False,
    norm_offset=0.0, norm_scale_fp32=False, scale_embeddings=False, sandwich_norms=False,
    qk_norm=False, query_pre_attn_scalar=None, sliding_window=None, layer_pattern=None,
    attn_softcap=None, final_softcap=None, eps=1e-6, head_dim=None, window_rule="pattern",
    bias="attention_bias")
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": _LLAMA,
    "gemma": dict(
        act_keys=("hidden_activation", "hidden_act"), act="gelu_pytorch_tanh",
        theta={FULL: 10000.0}, tie=True, norm_offset=1.0, norm_scale_fp32=True,
        scale_embeddings=True, sandwich_norms=False, qk_norm=False, query_pre_attn_scalar=None,
        sliding_window=None, layer_pattern=None, attn_softcap=None, final_softcap=None,
        eps=1e-6, head_dim=None, window_rule="pattern", bias="attention_bias"),
    "gemma2": dict(
        act_keys=("hidden_activation", "hidden_act"), act="gelu_pytorch_tanh",
        theta={FULL: 10000.0}, tie=True, norm_offset=1.0, norm_scale_fp32=True,
        scale_embeddings=True, sandwich_norms=True, qk_norm=False, query_pre_attn_scalar=256,
        sliding_window=4096, layer_pattern=2, attn_softcap=50.0, final_softcap=30.0, eps=1e-6,
        head_dim=None, window_rule="pattern", bias="attention_bias"),
    "gemma3_text": dict(
        act_keys=("hidden_activation", "hidden_act"), act="gelu_pytorch_tanh",
        theta={FULL: 1_000_000.0, SLIDING: 10_000.0}, tie=True, norm_offset=1.0,
        norm_scale_fp32=True, scale_embeddings=True, sandwich_norms=True, qk_norm=True,
        query_pre_attn_scalar=256, sliding_window=4096, layer_pattern=6, attn_softcap=None,
        final_softcap=None, eps=1e-6, head_dim=None, window_rule="pattern",
        bias="attention_bias"),
    # Qwen2 / Qwen2.5: Llama plus a bias on q, k and v only, always (Qwen2Attention builds
    # q/k/v_proj with bias=True and o_proj with bias=False; it reads no attention_bias).
    "qwen2": dict(_LLAMA, sliding_window=4096, window_rule="max_window_layers", bias="qkv"),
    # Qwen3: Llama plus a per-head RMSNorm (Llama-style: weight applied after the cast back)
    # on q and k before RoPE (Qwen3Attention.forward); Qwen3Config.head_dim defaults to 128,
    # not hidden / heads.
    "qwen3": dict(_LLAMA, qk_norm=True, head_dim=128, sliding_window=4096,
                  window_rule="max_window_layers"),
    # Mistral: Llama with bias=False hard-coded (MistralAttention); MistralConfig's
    # sliding_window defaults to 4096, and when set, *every* layer uses it
    # (MistralModel.forward builds one create_sliding_window_causal_mask for all layers).
    "mistral": dict(_LLAMA, sliding_window=4096, window_rule="all", bias=None),
}
SUPPORTED_MODEL_TYPES = tuple(_FAMILIES)
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's view of a model. All sizes are global (before the TP split)."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str                      # "silu" | "gelu_pytorch_tanh" | "gelu"
    norm_offset: float                   # RMSNorm multiplies by (offset + w): Gemma stores w-1
    norm_scale_fp32: bool                # Gemma scales by (1+w) in fp32 before the cast back
    scale_embeddings: bool               # Gemma multiplies embeddings by sqrt(hidden)
    sandwich_norms: bool                 # Gemma2/3: norms after attn/MLP too (pre+post FF norms)
    qk_norm: bool                        # Gemma3, Qwen3: RMSNorm over head_dim on q and k
    attn_scale: float                    # softmax scale: query_pre_attn_scalar**-0.5 or head_dim**-0.5
    attn_logit_softcap: Optional[float]
    final_logit_softcap: Optional[float]
    layer_types: tuple[str, ...]         # per layer: FULL or SLIDING
    sliding_window: Optional[int]        # tokens a sliding layer sees, the current one included
    rope: dict[str, RopeConfig] = field(hash=False)   # per layer type
    tie_word_embeddings: bool = False
    qkv_bias: bool = False               # Qwen2 (always), attention_bias: bias on q, k, v
    o_proj_bias: bool = False            # attention_bias: bias on o_proj, added after the TP sum
    max_position_embeddings: int = 8192
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: Optional[int] = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Build from an HF ``config.json`` dict; raise UnsupportedModelError for the rest."""
        mt = hf.get("model_type")
        if mt not in _FAMILIES:
            hint = " (multimodal wrapper: convert its text-only gemma3_text model)" \
                if mt == "gemma3" else ""
            raise UnsupportedModelError(
                f"unsupported model_type {mt!r}{hint}; supported: {', '.join(_FAMILIES)}")
        fam = _FAMILIES[mt]
        for key in ("mlp_bias", "use_bidirectional_attention"):
            if hf.get(key):
                raise UnsupportedModelError(f"{mt}: {key}=true is not supported")
        if fam["bias"] == "qkv":
            qkv_bias, o_bias = True, False
        elif fam["bias"] == "attention_bias":
            # LlamaAttention, GemmaAttention, Qwen3Attention: one flag for q, k, v and o.
            qkv_bias = o_bias = bool(hf.get("attention_bias"))
        else:
            qkv_bias = o_bias = False   # mistral: bias=False hard-coded, the key is ignored

        def req(key):
            if hf.get(key) is None:
                raise ConfigError(f"config.json ({mt}) lacks required key {key!r}")
            return hf[key]

        hidden, heads = int(req("hidden_size")), int(req("num_attention_heads"))
        n_layers = int(req("num_hidden_layers"))
        head_dim = int(hf.get("head_dim") or fam["head_dim"] or hidden // heads)
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ConfigError(f"num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")

        act = next((hf[k] for k in fam["act_keys"] if hf.get(k)), fam["act"])
        if act == "gelu" and fam["norm_offset"]:
            # Gemma checkpoints say "gelu" but were trained with the tanh approximation;
            # transformers rewrites it the same way (GemmaConfig.__post_init__, #29402).
            act = "gelu_pytorch_tanh"
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"{mt}: unsupported activation {act!r}")

        layer_types, window = _layer_types(hf, fam, mt, n_layers)
        if SLIDING in layer_types and not window:
            raise ConfigError(f"{mt}: sliding_attention layers but no sliding_window")
        if SLIDING not in layer_types:
            window = None

        qpas = hf.get("query_pre_attn_scalar", fam["query_pre_attn_scalar"]) \
            if fam["query_pre_attn_scalar"] is not None else None
        # Gemma2/3 scale scores by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5
        # (Gemma2Attention.scaling); for gemma2-27b the two differ (144 vs 128).
        attn_scale = float(qpas) ** -0.5 if qpas else head_dim ** -0.5

        eos = hf.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])
                        if e is not None)
        return cls(
            model_type=mt, vocab_size=int(req("vocab_size")), hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")), num_layers=n_layers,
            num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps") or fam["eps"]), hidden_act=act,
            norm_offset=fam["norm_offset"], norm_scale_fp32=fam["norm_scale_fp32"],
            scale_embeddings=fam["scale_embeddings"], sandwich_norms=fam["sandwich_norms"],
            qk_norm=fam["qk_norm"], attn_scale=attn_scale,
            attn_logit_softcap=_opt_float(hf.get("attn_logit_softcapping", fam["attn_softcap"])),
            final_logit_softcap=_opt_float(
                hf.get("final_logit_softcapping", fam["final_softcap"])),
            layer_types=layer_types, sliding_window=int(window) if window else None,
            rope=_rope(hf, fam, set(layer_types)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam["tie"])),
            qkv_bias=qkv_bias, o_proj_bias=o_bias,
            max_position_embeddings=int(hf.get("max_position_embeddings") or 8192),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
        )

    @property
    def residual_layout(self) -> "Layout":
        """Where the norms sit around each row-parallel reduce (comm/norm.py)."""
        from megatron_lite.comm.layout import Layout
        return Layout.SANDWICH if self.sandwich_norms else Layout.PRE_NORM

    # ---------------------------------------------------------------- TP arithmetic
    def validate_tp(self, tp: int) -> None:
        """Raise TPSizeError unless ``tp`` splits heads, KV heads and the MLP evenly."""
        problem = self._tp_problem(tp)
        if problem:
            raise TPSizeError(f"{problem}; valid TP sizes for this model: "
                              f"{', '.join(map(str, self.valid_tp_sizes()))}")

    def valid_tp_sizes(self, limit: int = 64) -> list[int]:
        return [tp for tp in range(1, limit + 1) if self._tp_problem(tp) is None]

    def _tp_problem(self, tp) -> Optional[str]:
        if not isinstance(tp, int) or tp < 1:
            return f"TP size must be a positive integer, got {tp!r}"
        if self.num_heads % tp:
            return f"TP size {tp} does not divide num_attention_heads {self.num_heads}"
        if self.num_kv_heads >= tp and self.num_kv_heads % tp:
            return f"TP size {tp} does not divide num_key_value_heads {self.num_kv_heads}"
        if self.num_kv_heads < tp and tp % self.num_kv_heads:
            return (f"TP size {tp} is not a multiple of num_key_value_heads "
                    f"{self.num_kv_heads} (needed to replicate KV heads)")
        if self.intermediate_size % tp:
            return f"TP size {tp} does not divide intermediate_size {self.intermediate_size}"
        return None

    def padded_vocab_size(self, tp: int) -> int:
        """Vocab rounded up to a multiple of 128*tp, so each rank's slice is 128-aligned."""
        mult = 128 * tp
        return int(math.ceil(self.vocab_size / mult) * mult)

    def local_heads(self, tp: int) -> int:
        return self.num_heads // tp

    def local_kv_heads(self, tp: int) -> int:
        """KV heads held per rank: an even share, or one replicated head when tp > n_kv."""
        return max(1, self.num_kv_heads // tp)

    def kv_heads_of_rank(self, tp: int, rank: int) -> list[int]:
        """Global indices of the KV heads rank ``rank`` holds (docs/architecture.md)."""
        if self.num_kv_heads >= tp:
            n = self.num_kv_heads // tp
            return list(range(rank * n, (rank + 1) * n))
        # Replication: the q heads of rank r all map to KV head r*n_kv//tp (HF repeat_kv
        # groups consecutive q heads on one KV head, and tp % n_kv == 0 keeps them together).
        return [rank * self.num_kv_heads // tp]


def _opt_float(v) -> Optional[float]:
    return None if v is None else float(v)


def _layer_types(hf, fam, mt, n_layers) -> tuple[tuple[str, ...], Optional[int]]:
    """(per-layer FULL/SLIDING, sliding window) by the family's transformers rule."""
    window = hf.get("sliding_window", fam["sliding_window"])
    types = hf.get("layer_types")
    rule = fam["window_rule"]
    if rule == "max_window_layers":
        # Qwen2Config/Qwen3Config.__post_init__: the window only exists with
        # use_sliding_window, and without layer_types the layers i >= max_window_layers slide.
        window = window if hf.get("use_sliding_window") else None
        if types is None:
            first = int(hf["max_window_layers"] if hf.get("max_window_layers") is not None
                        else 28)
            types = [SLIDING if window is not None and i >= first else FULL
                     for i in range(n_layers)]
    elif rule == "all":
        # MistralModel ignores layer_types (MistralConfig only warns about them): refuse a
        # list that says otherwise instead of silently running a different model.
        derived = [SLIDING if window is not None else FULL] * n_layers
        if types is not None and list(types) != derived:
            raise UnsupportedModelError(
                f"{mt}: layer_types {sorted(set(types))} disagree with sliding_window="
                f"{window}, which transformers' mistral applies to every layer "
                "(alternating attention is model_type ministral)")
        types = derived
    if types is not None:
        if len(types) != n_layers:
            raise ConfigError(f"layer_types has {len(types)} entries for {n_layers} layers")
        bad = set(types) - {FULL, SLIDING}
        if bad:
            raise UnsupportedModelError(f"unsupported layer types {sorted(bad)}")
        return tuple(types), window
    pattern = hf.get("sliding_window_pattern") or fam["layer_pattern"]
    if pattern is None:
        return (FULL,) * n_layers, window
    # transformers' rule for configs without layer_types: every pattern-th layer is global.
    return tuple(SLIDING if (i + 1) % int(pattern) else FULL for i in range(n_layers)), window


def _rope_one(params: dict, default_theta: float, max_pos) -> RopeConfig:
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta") or default_theta)
    if params.get("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
    if rtype == "default":
        return RopeConfig(theta=theta)
    if rtype == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    if rtype == "llama3":
        return RopeConfig(
            theta=theta, rope_type="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings") or max_pos))
    raise UnsupportedModelError(f"unsupported rope type {rtype!r} "
                                "(supported: default, linear, llama3)")


def _rope(hf, fam, types: set[str]) -> dict[str, RopeConfig]:
    theta_full = fam["theta"][FULL]
    theta_local = fam["theta"].get(SLIDING, theta_full)
    max_pos = hf.get("max_position_embeddings") or 8192
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and any(isinstance(v, dict) for v in rp.values()):
        # transformers >= 5, per-layer-type rope (gemma3): {"full_attention": {...}, ...}
        out = {}
        for t in types:
            p = dict(rp.get(t) or {})
            p.setdefault("rope_theta", hf.get("rope_theta"))
            out[t] = _rope_one(p, theta_local if t == SLIDING else theta_full, max_pos)
        return out
    # One dict for every layer (transformers >= 5 rope_parameters, or legacy rope_scaling).
    if isinstance(rp, dict) and rp:
        full = dict(rp)
    else:
        full = dict(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta"))
    out = {FULL: _rope_one(full, theta_full, max_pos)}
    if SLIDING in types:
        if SLIDING in fam["theta"]:
            # Legacy gemma3: rope_scaling applies to global layers only; local layers use
            # plain RoPE with rope_local_base_freq (Gemma3TextConfig.convert_rope_params_to_dict).
            out[SLIDING] = RopeConfig(theta=float(hf.get("rope_local_base_freq") or theta_local))
        else:
            out[SLIDING] = out[FULL]   # gemma2: one rotary embedding for all layers
    return out
