"""Tensor-parallel layers, region functions, TP group and ModelConfig parsing/validation.

Multi-rank tests run on real gloo ranks (tests/_dist.py) and compare against the plain
single-device computation with the same full weights.
"""
from __future__ import annotations

import copy

import pytest
import torch

from megatron_lite.comm.communicator import DistCommunicator
from megatron_lite.models.config import ModelConfig, TPSizeError, UnsupportedModelError
from megatron_lite.parallel_state import TPGroup
from tests._dist import run_distributed
from tests.tiny_configs import TINY_CONFIGS, hf_config_dict


def _group():
    from megatron_lite.parallel_state import initialize_model_parallel
    return initialize_model_parallel()


def _full(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------- layers on gloo
def _linear_worker(rank, ws):
    from megatron_lite.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    g = _group()
    x, w = _full(0, 3, 5, 16), _full(1, 24, 16)           # y = x w^T, w [out, in]
    col = ColumnParallelLinear(16, 24, group=g, gather_output=True)
    col.weight.data.copy_(w.chunk(ws, 0)[rank])
    col_local = ColumnParallelLinear(16, 24, group=g, gather_output=False)
    col_local.weight.data.copy_(w.chunk(ws, 0)[rank])
    row = RowParallelLinear(16, 24, group=g, input_is_parallel=False, site="test.row")
    row.weight.data.copy_(w.chunk(ws, 1)[rank])
    row_par = RowParallelLinear(16, 24, group=g, input_is_parallel=True)
    row_par.weight.data.copy_(w.chunk(ws, 1)[rank])
    return (col(x), col_local(x), row(x), row_par(x.chunk(ws, -1)[rank].contiguous()))


@pytest.mark.parametrize("ws", [2, 4])
def test_column_and_row_parallel_linear_equal_the_full_linear(ws):
    x, w = _full(0, 3, 5, 16), _full(1, 24, 16)
    ref = x @ w.T
    outs = run_distributed(_linear_worker, ws)
    for rank, (col, col_local, row, row_par) in enumerate(outs):
        torch.testing.assert_close(col, ref)                       # gather_output=True
        torch.testing.assert_close(col_local, ref.chunk(ws, -1)[rank])
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)  # scatter + reduce
        assert torch.equal(row, outs[0][2])                         # ranks bitwise equal
        torch.testing.assert_close(row_par, ref, rtol=1e-5, atol=1e-5)


def _bias_worker(rank, ws):
    from megatron_lite.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    g = _group()
    x, w, b = _full(0, 3, 5, 16), _full(1, 24, 16), _full(2, 24)
    col = ColumnParallelLinear(16, 24, group=g, gather_output=True, bias=True)
    col.weight.data.copy_(w.chunk(ws, 0)[rank])
    col.bias.data.copy_(b.chunk(ws, 0)[rank])          # split like the output rows
    row = RowParallelLinear(16, 24, group=g, input_is_parallel=False, site="t", bias=True)
    row.weight.data.copy_(w.chunk(ws, 1)[rank])
    row.bias.data.copy_(b)                             # whole on every rank
    return col(x), row(x), RowParallelLinear(16, 24, group=g).bias


@pytest.mark.parametrize("ws", [2, 4])
def test_parallel_linear_biases_are_split_and_added_once(ws):
    x, w, b = _full(0, 3, 5, 16), _full(1, 24, 16), _full(2, 24)
    ref = x @ w.T + b
    outs = run_distributed(_bias_worker, ws)
    for col, row, no_bias in outs:
        torch.testing.assert_close(col, ref)
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)   # b once, not ws times
        assert torch.equal(row, outs[0][1])
        assert no_bias is None                                       # bias-free by default


def _vocab_worker(rank, ws, ids, table, vocab):
    from megatron_lite.tensor_parallel import ParallelLMHead, VocabParallelEmbedding
    from megatron_lite.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
    g = _group()
    vp = table.shape[0]
    emb = VocabParallelEmbedding(vp, table.shape[1], group=g)
    emb.weight.data.copy_(table.chunk(ws, 0)[rank])
    head = ParallelLMHead(vocab, vp, table.shape[1], group=g)
    head.weight.data.copy_(table.chunk(ws, 0)[rank])
    h = emb(ids)
    return dict(emb=h, start=emb.vocab_start, end=emb.vocab_end,
                local_logits=head(h, gather=False), logits=head(h),
                reduced_twice=reduce_from_tensor_model_parallel_region(h, g, "x"))


def test_vocab_parallel_embedding_and_lm_head_mask_padding():
    ws, vocab, hidden = 4, 250, 8
    vp = 512                                    # ceil(250 / (128*4)) * 128*4
    table = torch.zeros(vp, hidden)
    table[:vocab] = _full(3, vocab, hidden)      # padded rows are zero, as the layout writes
    ids = torch.tensor([[0, 127, 128, 249], [200, 5, 249, 130]])
    outs = run_distributed(_vocab_worker, ws, ids, table, vocab)
    ref_emb = table[ids]
    ref_logits = ref_emb @ table[:vocab].T
    for rank, o in enumerate(outs):
        assert (o["start"], o["end"]) == (rank * 128, (rank + 1) * 128)
        assert torch.equal(o["emb"], ref_emb)        # exact: one non-zero addend per token
        assert o["logits"].shape == (2, 4, vocab)    # padding stripped
        torch.testing.assert_close(o["logits"], ref_logits)
        assert torch.equal(o["logits"], outs[0]["logits"])
        local = o["local_logits"]
        assert local.shape == (2, 4, 128)
        real = max(0, min(128, vocab - rank * 128))  # rank 1 holds 122 real rows, 2 and 3 none
        assert torch.isneginf(local[..., real:]).all()
        assert torch.isfinite(local[..., :real]).all()
        torch.testing.assert_close(o["reduced_twice"], ref_emb * ws)


def test_out_of_range_ids_contribute_zero_rows():
    # single rank holding rows [128, 256) of a 256-row table: ids outside give zero rows
    from megatron_lite.tensor_parallel import VocabParallelEmbedding

    class OneOfTwo(DistCommunicator):
        """rank 1 of 2, where the 'sum' is the identity: exposes one rank's contribution."""
        def __init__(self):
            super().__init__(None)
            self.rank, self.world_size, self.sites = 1, 2, []

        def all_reduce(self, x, site=None):
            self.sites.append(site)
            return x.clone()

    comm = OneOfTwo()
    emb = VocabParallelEmbedding(256, 4, group=TPGroup.from_communicator(comm))
    emb.weight.data.copy_(torch.arange(128 * 4, dtype=torch.float32).view(128, 4) + 1)
    out = emb(torch.tensor([0, 127, 128, 255, 130]))
    assert torch.equal(out[:2], torch.zeros(2, 4))
    assert torch.equal(out[2], emb.weight[0]) and torch.equal(out[3], emb.weight[127])
    assert torch.equal(out[4], emb.weight[2])
    assert comm.sites == ["embed_tokens"]


def test_world_size_one_short_circuits():
    from megatron_lite.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region, scatter_to_tensor_model_parallel_region)
    g = TPGroup(DistCommunicator(None))
    assert g.world_size == 1 and g.rank == 0
    x = torch.randn(2, 6)
    for f in (copy_to_tensor_model_parallel_region, gather_from_tensor_model_parallel_region,
              scatter_to_tensor_model_parallel_region):
        assert f(x, g) is x
    assert reduce_from_tensor_model_parallel_region(x, g, "s") is x


def test_scatter_needs_divisible_last_dim():
    from megatron_lite.tensor_parallel.mappings import scatter_to_tensor_model_parallel_region

    class Two(DistCommunicator):
        def __init__(self):
            super().__init__(None)
            self.rank, self.world_size = 0, 2
    g = TPGroup.from_communicator(Two())
    assert scatter_to_tensor_model_parallel_region(torch.arange(6.0), g).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="not divisible"):
        scatter_to_tensor_model_parallel_region(torch.arange(5.0), g)


# --------------------------------------------------------------------- reduce sites
class RecordingCommunicator(DistCommunicator):
    """Real gloo all-reduce that also records which layer asked for it."""

    def __init__(self):
        super().__init__(None)
        self.sites = []

    def all_reduce(self, x, site=None):
        self.sites.append(site)
        return super().all_reduce(x, site)


def _sites_worker(rank, ws, hf_cfg, sd):
    from megatron_lite.inference.engine import Engine
    comm = RecordingCommunicator()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    native = Engine.from_hf_state_dict(hf_cfg, sd, comm=comm, device="cpu").logits(ids)
    # a --comm spec wraps the group's communicator (comm/build.py); the model is unchanged
    quant = Engine.from_hf_state_dict(hf_cfg, sd, comm="int8:32", device="cpu").logits(ids)
    return comm.sites, native, quant


def test_every_tp_sum_goes_through_the_group_with_its_site():
    from tests.tiny_configs import make_hf_model
    sd = make_hf_model("gemma3_text").state_dict()
    outs = run_distributed(_sites_worker, 2, hf_config_dict("gemma3_text"), sd)
    n_layers = TINY_CONFIGS["gemma3_text"]["num_hidden_layers"]
    expected = ["embed_tokens"] + [s for i in range(n_layers) for s in
                                   (f"layers.{i}.self_attn.o_proj", f"layers.{i}.mlp.down_proj")]
    (sites0, native, quant), (sites1, native1, quant1) = outs
    assert sites0 == expected and sites1 == expected
    assert torch.equal(native, native1) and torch.equal(quant, quant1)
    err = (quant - native).abs().max().item()
    assert 0 < err < 0.05 * native.abs().max().item()     # quantized, yet close


# --------------------------------------------------------------------- ModelConfig
def _legacy_gemma3():
    """A gemma3_text config.json as transformers 4.x wrote it."""
    return dict(model_type="gemma3_text", vocab_size=250, hidden_size=64,
                intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
                num_key_value_heads=1, head_dim=32, rope_theta=1e6, rope_local_base_freq=1e4,
                rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=16,
                sliding_window_pattern=6, query_pre_attn_scalar=32)


def test_legacy_and_transformers5_configs_agree():
    from transformers import AutoConfig
    legacy = _legacy_gemma3()
    d = copy.deepcopy(legacy)
    normalised = AutoConfig.for_model(d.pop("model_type"), **d).to_dict()
    assert set(normalised["rope_parameters"]) == {"full_attention", "sliding_attention"}
    a, b = ModelConfig.from_hf(legacy), ModelConfig.from_hf(normalised)
    assert a.rope == b.rope and a.layer_types == b.layer_types
    assert a.layer_types[5] == "full_attention" and a.layer_types.count("full_attention") == 1
    assert a.rope["full_attention"].rope_type == "linear"
    assert a.rope["full_attention"].theta == 1e6 and a.rope["sliding_attention"].theta == 1e4


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_tiny_configs_parse_with_expected_features(name):
    cfg = ModelConfig.from_hf(hf_config_dict(name))
    assert cfg.valid_tp_sizes(8) == [1, 2, 4]
    assert cfg.padded_vocab_size(4) == 512 and cfg.padded_vocab_size(1) == 256
    features = {
        "llama": cfg.rope["full_attention"].rope_type == "llama3" and cfg.num_kv_heads == 2,
        "llama_tied": cfg.tie_word_embeddings and cfg.norm_offset == 0,
        "gemma": cfg.num_kv_heads == 1 and cfg.head_dim * cfg.num_heads != cfg.hidden_size
        and cfg.norm_offset == 1 and cfg.scale_embeddings,
        "gemma2": cfg.attn_logit_softcap == 2.0 and cfg.final_logit_softcap == 3.0
        and cfg.sandwich_norms and cfg.sliding_window == 8 and cfg.attn_scale == 24 ** -0.5,
        "gemma3_text": cfg.qk_norm and len(set(cfg.layer_types)) == 2
        and cfg.rope["sliding_attention"].theta == 10000.0
        and cfg.rope["full_attention"].rope_type == "linear",
        "llama_attn_bias": cfg.qkv_bias and cfg.o_proj_bias,
        "qwen2": cfg.qkv_bias and not cfg.o_proj_bias and cfg.sliding_window is None
        and set(cfg.layer_types) == {"full_attention"} and cfg.num_kv_heads == 2
        and cfg.rope["full_attention"].theta == 1e6 and not cfg.tie_word_embeddings,
        "qwen2_sliding": cfg.qkv_bias and cfg.sliding_window == 8 and cfg.tie_word_embeddings
        and cfg.layer_types == ("full_attention",) + ("sliding_attention",) * 2,
        "qwen3": cfg.qk_norm and not cfg.qkv_bias and not cfg.o_proj_bias
        and cfg.head_dim == 24 and cfg.norm_offset == 0 and not cfg.norm_scale_fp32,
        "mistral": not cfg.qkv_bias and cfg.sliding_window == 8
        and set(cfg.layer_types) == {"sliding_attention"},
    }
    assert features[name]


def test_unknown_model_type_is_one_line():
    with pytest.raises(UnsupportedModelError) as e:
        ModelConfig.from_hf({"model_type": "mamba"})
    msg = str(e.value)
    assert "\n" not in msg and "mamba" in msg and "gemma3_text" in msg and "qwen2" in msg


# Raw config.json dicts (as on the hub, before transformers fills in defaults): our window
# rules must give the layer types and window transformers' own config classes derive.
_QWEN25_CODER_1_5B = dict(   # Qwen/Qwen2.5-Coder-1.5B-Instruct config.json
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    sliding_window=32768, use_sliding_window=False, max_window_layers=21,
    tie_word_embeddings=False, hidden_act="silu", bos_token_id=151643, eos_token_id=151645)
_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
              num_attention_heads=4, num_key_value_heads=2)
RAW_WINDOW_CONFIGS = {
    "qwen2.5-coder-1.5b": _QWEN25_CODER_1_5B,
    "qwen2 window on": dict(_SMALL, model_type="qwen2", use_sliding_window=True,
                            sliding_window=16, max_window_layers=2),
    "qwen2 window on, no max_window_layers": dict(_SMALL, model_type="qwen2",
                                                  use_sliding_window=True, sliding_window=16),
    "qwen2 window on but null": dict(_SMALL, model_type="qwen2", use_sliding_window=True,
                                     sliding_window=None, max_window_layers=2),
    "qwen3 window on": dict(_SMALL, model_type="qwen3", use_sliding_window=True,
                            sliding_window=16, max_window_layers=3, head_dim=8),
    "qwen3 default": dict(_SMALL, model_type="qwen3"),
    "mistral default window": dict(_SMALL, model_type="mistral"),
    "mistral window null": dict(_SMALL, model_type="mistral", sliding_window=None),
    "mistral window 16": dict(_SMALL, model_type="mistral", sliding_window=16),
}


@pytest.mark.parametrize("key", list(RAW_WINDOW_CONFIGS))
def test_window_rules_match_transformers_configs(key):
    from transformers import AutoConfig
    raw = copy.deepcopy(RAW_WINDOW_CONFIGS[key])
    d = copy.deepcopy(raw)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    # transformers' models: qwen2/qwen3 read config.layer_types (a layer slides only if
    # config.sliding_window is set); MistralModel slides every layer iff sliding_window.
    want_types = tuple(getattr(hf, "layer_types", None) or
                       ["sliding_attention" if hf.sliding_window else "full_attention"]
                       * hf.num_hidden_layers)
    want_window = hf.sliding_window if "sliding_attention" in want_types else None
    for config in (raw, hf.to_dict()):   # the raw file and the transformers-normalised one
        cfg = ModelConfig.from_hf(config)
        assert cfg.layer_types == want_types
        assert cfg.sliding_window == want_window
        # Qwen2Attention: getattr(config, "head_dim", hidden // heads); Qwen3 defaults to 128
        assert cfg.head_dim == (getattr(hf, "head_dim", None)
                                or hf.hidden_size // hf.num_attention_heads)
    if key == "qwen2 window on":   # the test is not vacuous
        assert want_types == ("full_attention",) * 2 + ("sliding_attention",) * 3


def test_qwen25_coder_1_5b_config():
    cfg = ModelConfig.from_hf(_QWEN25_CODER_1_5B)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (12, 2, 128)
    assert cfg.qkv_bias and not cfg.o_proj_bias and not cfg.tie_word_embeddings
    assert cfg.rope["full_attention"].theta == 1e6 and cfg.sliding_window is None
    # 12 heads, 2 KV heads (replicated at 4), intermediate 8960 = 2^8 * 5 * 7: no 3, 6, 12.
    assert cfg.valid_tp_sizes() == [1, 2, 4]
    with pytest.raises(TPSizeError, match="TP size 3 is not a multiple of "
                                          "num_key_value_heads 2.*valid TP sizes.*1, 2, 4"):
        cfg.validate_tp(3)


@pytest.mark.parametrize("config,match", [
    (dict(_SMALL, model_type="mistral", sliding_window=16,
          layer_types=["full_attention", "sliding_attention"] * 2 + ["full_attention"]),
     "mistral: layer_types .* disagree with sliding_window=16"),
    (dict(_SMALL, model_type="llama", mlp_bias=True), "llama: mlp_bias=true is not supported"),
    (dict(_SMALL, model_type="qwen2", use_bidirectional_attention=True),
     "use_bidirectional_attention=true is not supported"),
])
def test_unsupported_features_are_refused_in_one_line(config, match):
    with pytest.raises(UnsupportedModelError, match=match) as e:
        ModelConfig.from_hf(config)
    assert "\n" not in str(e.value)


def test_attention_bias_is_read_per_family():
    # LlamaAttention / Qwen3Attention: attention_bias puts a bias on q, k, v and o_proj;
    # MistralAttention hard-codes bias=False and Qwen2Attention bias on q, k, v only.
    def biases(**kw):
        c = ModelConfig.from_hf(dict(_SMALL, **kw))
        return c.qkv_bias, c.o_proj_bias
    assert biases(model_type="llama", attention_bias=True) == (True, True)
    assert biases(model_type="qwen3", attention_bias=True) == (True, True)
    assert biases(model_type="qwen3") == (False, False)
    assert biases(model_type="qwen2") == (True, False)
    assert biases(model_type="qwen2", attention_bias=True) == (True, False)
    assert biases(model_type="mistral", attention_bias=True) == (False, False)


@pytest.mark.parametrize("change,tp,match", [
    (dict(num_attention_heads=4), 3, "does not divide num_attention_heads 4"),
    (dict(num_attention_heads=12, num_key_value_heads=4, head_dim=8), 6,
     "not a multiple of num_key_value_heads 4"),
    (dict(num_attention_heads=12, num_key_value_heads=6, head_dim=8), 4,
     "does not divide num_key_value_heads 6"),
    (dict(intermediate_size=98), 4, "does not divide intermediate_size 98"),
    (dict(), 0, "positive integer"),
])
def test_tp_size_errors(change, tp, match):
    hf = dict(hf_config_dict("llama"), **change)
    cfg = ModelConfig.from_hf(hf)
    with pytest.raises(TPSizeError, match=match) as e:
        cfg.validate_tp(tp)
    assert "\n" not in str(e.value) and "valid TP sizes" in str(e.value)


def test_kv_heads_of_rank_replicates_consecutively():
    cfg = ModelConfig.from_hf(dict(hf_config_dict("llama"), num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=8))
    assert [cfg.kv_heads_of_rank(8, r) for r in range(8)] == [[0]] * 4 + [[1]] * 4
    assert [cfg.kv_heads_of_rank(2, r) for r in range(2)] == [[0], [1]]
    assert cfg.local_kv_heads(8) == 1 and cfg.local_kv_heads(1) == 2


def test_engine_refuses_a_tp_size_that_does_not_fit():
    from megatron_lite.inference.engine import Engine

    class Three(DistCommunicator):
        def __init__(self):
            super().__init__(None)
            self.rank, self.world_size = 0, 3
    with pytest.raises(TPSizeError):
        Engine.from_hf_state_dict(hf_config_dict("gemma"), {}, comm=Three())


# --------------------------------------------------------------------- parallel_state
_TORCHRUN_SCRIPT = '''
import os, torch
from megatron_lite.parallel_state import (destroy_model_parallel, get_tp_group,
                                          initialize_model_parallel)
g = initialize_model_parallel()
assert get_tp_group() is g and initialize_model_parallel() is g
import torch.distributed as dist
x = g.all_reduce(torch.full((3,), float(g.rank + 1)), site="test")
y = g.all_gather(torch.tensor([[g.rank]]), dim=1)
# One file per rank: torchrun may interleave the ranks' stdout mid-line (seen in CI).
with open(os.path.join(os.environ["RESULT_DIR"], f"rank{g.rank}.txt"), "w") as f:
    f.write(f"RESULT rank={g.rank} ws={g.world_size} backend={dist.get_backend()} "
            f"sum={x.tolist()} gather={y.tolist()}")
destroy_model_parallel()
assert not dist.is_initialized()
'''


def test_initialize_from_torchrun_environment(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    script = tmp_path / "init.py"
    script.write_text(_TORCHRUN_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MEGATRON_LITE_BACKEND="gloo",
               RESULT_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={port}", str(script)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert lines == [f"RESULT rank={r} ws=2 backend=gloo sum=[3.0, 3.0, 3.0] "
                     f"gather=[[0, 1]]" for r in range(2)]


def test_without_torchrun_environment_is_one_rank(monkeypatch):
    from megatron_lite import parallel_state as ps
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ps.destroy_model_parallel()
    g = ps.initialize_model_parallel()
    try:
        assert (g.rank, g.world_size) == (0, 1)
        x = torch.ones(2)
        assert g.all_reduce(x, "s") is x and g.all_gather(x) is x
    finally:
        ps.destroy_model_parallel()
