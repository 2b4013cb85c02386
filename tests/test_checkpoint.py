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
from megatron_lite.checkpoint.shards import (MANIFEST_NAME, load_hf_state_dict, sha256_file,
                                             shard_file_name, verify_shard_dir)
from megatron_lite.errors import CheckpointError
from tests.conftest import run_tool

CONVERT = "tools/convert_hf_checkpoint.py"


def convert(*args):
    return run_tool([CONVERT, "--quiet", *args], timeout=300)


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
@pytest.mark.parametrize("name,tp", [("llama", 2), ("gemma3_text", 2), ("llama_tied", 4)])
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
