"""tools/generate.py end to end: torchrun, shards or HF dir, --output-json, bad input.

Generation on a tiny random model must give transformers' greedy tokens; bad input must
end every rank with an ``error:`` line and a non-zero exit, without hanging.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpoint.shards import shard_file_name
from tests.conftest import run_tool

GENERATE = "tools/generate.py"
CONVERT = "tools/convert_hf_checkpoint.py"
PROMPT = "Tensor parallel"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny_shards(tiny_hf_dir, tmp_path_factory):
    """gemma3_text tiny model as TP 1 and TP 2 shard directories."""
    hf = tiny_hf_dir("gemma3_text")
    root = tmp_path_factory.mktemp("cli-shards")
    out = {}
    for tp in (1, 2):
        out[tp] = root / f"tp{tp}"
        proc = run_tool([CONVERT, "--quiet", "--hf-dir", hf, "--tp", tp, "--out", out[tp]])
        assert proc.returncode == 0, proc.stderr
    return out


def hf_greedy(hf_dir: Path, prompt: str, n: int) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, top_p=None, top_k=None)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("source", ["shards", "hf"])
def test_torchrun_greedy_matches_transformers(tiny_hf_dir, tiny_shards, tmp_path, source):
    hf = tiny_hf_dir("gemma3_text")
    ckpt = tiny_shards[2] if source == "shards" else hf
    report = tmp_path / "out.json"
    proc = run_tool(["torchrun", "--nproc_per_node=2", GENERATE, "--ckpt", ckpt,
                     "--prompt", PROMPT, "--max-new-tokens", NEW_TOKENS,
                     "--output-json", report], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert set(data) == {"checkpoint", "world_size", "dtype", "comm", "ttft_s",
                         "tokens_per_s", "num_new_tokens", "results"}
    assert data["world_size"] == 2 and data["dtype"] == "float32" and data["comm"] is None
    (res,) = data["results"]
    assert set(res) == {"prompt", "completion", "token_ids", "prompt_token_ids",
                        "finish_reason"}
    want = hf_greedy(hf, PROMPT, NEW_TOKENS)
    assert res["token_ids"] == want
    assert res["prompt"] == PROMPT and data["num_new_tokens"] == len(want)
    assert data["ttft_s"] > 0 and (data["tokens_per_s"] or 0) > 0
    # Rank 0 streamed prompt + completion to stdout, once.
    assert proc.stdout.count(PROMPT + res["completion"]) == 1
    assert "TTFT" in proc.stderr and "tokens/s" in proc.stderr


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def test_world_size_differs_from_shards_tp(tiny_shards):
    # world size 1 (plain python) on TP-2 shards: exactly one line, nothing else.
    proc = run_tool([GENERATE, "--ckpt", tiny_shards[2], "--prompt", "x"], timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {tiny_shards[2]} was converted for TP 2 but the world size is 1; "
        "run with --nproc_per_node=2 or re-convert with --tp 1"]
    assert proc.stdout == ""
    # world size 2 on TP-1 shards: both ranks refuse before joining the process group.
    proc = run_tool(["torchrun", "--nproc_per_node=2", GENERATE, "--ckpt", tiny_shards[1],
                     "--prompt", "x"], timeout=120)
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 2 and all("converted for TP 1 but the world size is 2" in l
                                   for l in lines), proc.stderr[-3000:]


def test_corrupt_shard(tiny_shards, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_shards[2], bad)
    f = bad / shard_file_name(1, 2)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    proc = run_tool(["torchrun", "--nproc_per_node=2", GENERATE, "--ckpt", bad,
                     "--prompt", "x"], timeout=120)
    assert proc.returncode != 0
    lines = _error_lines(proc)
    assert len(lines) == 2, proc.stderr[-3000:]
    assert all(l.endswith("model-rank001-of-002.safetensors is corrupt (sha256 does not "
                          "match the manifest)") for l in lines)


def test_missing_checkpoint_and_bad_arguments(tmp_path):
    proc = run_tool([GENERATE, "--ckpt", tmp_path / "nope", "--prompt", "x"], timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint directory {tmp_path / 'nope'} does not exist"]
    proc = run_tool([GENERATE, "--ckpt", tmp_path, "--prompt", "x"], timeout=120)
    assert proc.returncode == 1 and "has no config.json" in proc.stderr


def test_engine_input_errors_are_one_line(tiny_shards):
    # the tiny tokenizer has no chat template: a clean error, not a traceback.
    proc = run_tool([GENERATE, "--ckpt", tiny_shards[1], "--prompt", "x", "--chat"],
                    timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert len(_error_lines(proc)) == 1 and "Traceback" not in proc.stderr
    assert "chat template" in _error_lines(proc)[0]
