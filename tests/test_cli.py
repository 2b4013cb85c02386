"""tools/generate.py end to end: torchrun, shards or HF dir, --json, bad input, --compile.

Generation on a tiny random model must give transformers' greedy tokens; bad input must
end every rank with an ``error:`` line and a non-zero exit, before any weights load and
without hanging. The CLI's other contracts (fast --help, help text and defaults on every
flag, console scripts) are in tests/test_tools_cli.py.
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
        proc = run_tool([CONVERT, "--no-progress", "--hf-dir", hf, "--tp", tp, "--out", out[tp]])
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
                     "--json", report], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert set(data) == {"checkpoint", "world_size", "dtype", "comm", "ttft_s",
                         "tokens_per_s", "compile_s", "num_new_tokens", "results"}
    assert data["world_size"] == 2 and data["dtype"] == "float32" and data["comm"] is None
    assert data["compile_s"] is None
    (res,) = data["results"]
    assert set(res) == {"prompt", "completion", "token_ids", "prompt_token_ids",
                        "finish_reason"}
    want = hf_greedy(hf, PROMPT, NEW_TOKENS)
    assert res["token_ids"] == want
    assert res["prompt"] == PROMPT and data["num_new_tokens"] == len(want)
    assert data["ttft_s"] > 0 and (data["tokens_per_s"] or 0) > 0
    # Rank 0 streamed prompt + completion to stdout, once.
    assert proc.stdout.count(PROMPT + res["completion"]) == 1
    summary = [line for line in proc.stderr.splitlines() if line.startswith("TTFT")]
    assert len(summary) == 1 and "tokens/s" in summary[0]
    assert "| TP 2 | comm native | float32 |" in summary[0]


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


def test_torchrun_failure_summary_names_the_error(tiny_shards):
    """Under torchrun the one-line error is also the root cause of torchrun's own failure
    summary (the rank's torchelastic error file), not a link to the torchelastic docs."""
    proc = run_tool(["torchrun", "--nproc_per_node=2", GENERATE, "--ckpt", tiny_shards[2],
                     "--prompt", "x", "--top-p", "2"], timeout=120)
    assert proc.returncode != 0
    msg = "error: --top-p must be in (0, 1], got 2.0"
    assert _error_lines(proc) == [msg, msg], proc.stderr[-3000:]
    assert f"traceback : {msg}" in proc.stderr
    assert "To enable traceback see" not in proc.stderr


# ------------------------------------------------------------------ checks before load
@pytest.fixture(scope="module")
def unloadable(tiny_hf_dir, tmp_path_factory):
    """The tiny gemma3_text HF directory with its weights file replaced by garbage: config
    and tokenizer are fine, so every check passes until the weights are read. An error
    about a flag from this directory was raised before any weights loaded."""
    import shutil
    out = tmp_path_factory.mktemp("unloadable") / "hf"
    shutil.copytree(tiny_hf_dir("gemma3_text"), out)
    (out / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    return out


def _generate(args, capsys):
    from megatron_lite.cli.generate import main
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_unloadable_checkpoint_fails_at_load(unloadable, capsys):
    # With good flags the run gets as far as reading the weights, which fails.
    rc, out, err = _generate(["--ckpt", unloadable, "--prompt", "x"], capsys)
    assert rc == 1 and out == ""
    assert err.startswith(f"error: cannot read {unloadable / 'model.safetensors'}"), err


@pytest.mark.parametrize("extra,msg", [
    (["--top-p", "2.0"], "--top-p must be in (0, 1], got 2.0"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-k", "0"], "--top-k must be >= 1, got 0"),
    (["--temperature", "-0.5"], "--temperature must be >= 0, got -0.5"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be in [0, 2^64), got -1"),
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2^64)"),
    (["--comm", "int7"], "--comm 'int7': unknown codec"),
    (["--comm", "int4:128,bogus"], "--comm 'int4:128,bogus': bad --comm item 'bogus'"),
    (["--comm", "int4:128,algo=one-shot,path=fused"], "--comm 'int4:128,algo=one-shot,"
                                                      "path=fused': path=fused runs"),
    (["--comm", "weighted-int8:128"], "--comm 'weighted-int8:128': weighted-int8 needs a "
                                      "calibration file"),
    (["--calibration", "/nonexistent/c.safetensors", "--comm", "int8"],
     "--calibration: file not found: /nonexistent/c.safetensors"),
    (["--chat"], "--chat: the tokenizer of {ckpt} has no chat template; run without --chat"),
    (["--max-new-tokens", "250"], "--prompt is 16 tokens; with --max-new-tokens 250 that "
                                  "exceeds the model's context of 256 positions"),
    (["--json", "/nonexistent/dir/o.json"], "--json /nonexistent/dir/o.json: directory "
                                            "/nonexistent/dir does not exist"),
])
def test_bad_input_fails_before_the_weights_load(unloadable, capsys, extra, msg):
    rc, out, err = _generate(["--ckpt", unloadable, "--prompt", "Tensor parallel"] + extra,
                             capsys)
    assert rc == 1 and out == "", err
    assert err.splitlines() == [err.strip()] and err.startswith("error: "), err
    assert msg.format(ckpt=unloadable) in err


def test_calibration_without_a_codec_is_refused(unloadable, tmp_path, capsys):
    calib = tmp_path / "c.safetensors"
    calib.write_bytes(b"x")
    rc, _, err = _generate(["--ckpt", unloadable, "--prompt", "x", "--calibration", calib],
                           capsys)
    assert rc == 1 and err.strip() == (f"error: --calibration {calib} is given but no --comm "
                                       "spec uses it (give a codec, e.g. --comm "
                                       "weighted-hadamard-int8:128)")


def test_empty_prompt_is_refused(unloadable, capsys):
    for extra in ([], ["--chat"], ["--prompt", "x"]):
        rc, out, err = _generate(["--ckpt", unloadable, "--prompt", ""] + extra, capsys)
        assert rc == 1 and out == "" and err.startswith("error: --prompt is empty"), err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_nccl_without_cuda_is_one_line(unloadable, capsys, monkeypatch):
    rc, _, err = _generate(["--ckpt", unloadable, "--prompt", "x", "--backend", "nccl"],
                           capsys)
    assert rc == 1 and err.strip() == (
        "error: --backend nccl needs CUDA, and this machine has none "
        "(torch.cuda.is_available() is False); use --backend gloo")
    monkeypatch.setenv("MEGATRON_LITE_BACKEND", "nccl")
    rc, _, err = _generate(["--ckpt", unloadable, "--prompt", "x"], capsys)
    assert rc == 1 and err.startswith("error: MEGATRON_LITE_BACKEND=nccl needs CUDA")


def test_nccl_without_cuda_under_torchrun(tiny_shards):
    if torch.cuda.is_available():
        pytest.skip("checks the message without CUDA")
    proc = run_tool(["torchrun", "--nproc_per_node=2", GENERATE, "--ckpt", tiny_shards[2],
                     "--prompt", "x", "--backend", "nccl"], timeout=120)
    assert proc.returncode != 0
    assert _error_lines(proc) == ["error: --backend nccl needs CUDA, and this machine has "
                                  "none (torch.cuda.is_available() is False); use --backend "
                                  "gloo"] * 2, proc.stderr[-3000:]
    # the only traceback is torchrun's own summary of the failed ranks
    assert proc.stderr.count("Traceback (most recent call last)") == 1


# ------------------------------------------------------------------ real tokenizers
@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_empty_prompt_is_refused_by_every_model(which, request, capsys):
    """Gemma's tokenizer turns "" into a lone BOS and SmolLM2's into no token at all; both
    refuse it, in the CLI and in the engine."""
    from transformers import AutoTokenizer

    from megatron_lite.inference.engine import encode_prompt
    hf = request.getfixturevalue(f"{which}_hf_dir")
    tok = AutoTokenizer.from_pretrained(str(hf))
    for chat in (False, True):
        with pytest.raises(ValueError, match="empty prompt"):
            encode_prompt(tok, "", chat=chat)
    assert encode_prompt(tok, "Hello")                  # a real prompt still encodes
    rc, out, err = _generate(["--ckpt", hf, "--prompt", ""], capsys)
    assert rc == 1 and out == "" and err.strip() == (
        "error: --prompt is empty: give the text to continue")


def test_chat_prompt_length_counts_the_template(smollm2_hf_dir, capsys):
    """SmolLM2-Instruct has a chat template: the context check counts its tokens."""
    from transformers import AutoConfig
    context = AutoConfig.from_pretrained(str(smollm2_hf_dir)).max_position_embeddings
    args = ["--ckpt", smollm2_hf_dir, "--prompt", "Hi", "--max-new-tokens", context - 3]
    rc, _, err = _generate(args + ["--chat"], capsys)
    assert rc == 1 and "tokens after the chat template; with --max-new-tokens" in err, err
    assert f"exceeds the model's context of {context} positions" in err


# ------------------------------------------------------------------ summary and --compile
def test_summary_names_the_comm_spec(tiny_shards, tmp_path, capsys):
    out = tmp_path / "o.json"
    rc, stdout, err = _generate(["--ckpt", tiny_shards[1], "--prompt", PROMPT,
                                 "--max-new-tokens", 4, "--comm", "int8",
                                 "--json", out], capsys)
    assert rc == 0, err
    assert stdout.startswith(PROMPT)
    (summary,) = [line for line in err.splitlines() if line.startswith("TTFT")]
    assert "| TP 1 | comm int8:128 | float32 |" in summary
    assert json.loads(out.read_text())["comm"] == "int8:128"


def test_compile_time_is_reported_apart_from_decode(tiny_hf_dir, tiny_shards, tmp_path):
    """--compile: the decode step compiles before the timed run, announced on one line,
    and the decode rate does not include it."""
    out = tmp_path / "o.json"
    n = 24
    proc = run_tool([GENERATE, "--ckpt", tiny_shards[1], "--prompt", PROMPT,
                     "--max-new-tokens", n, "--compile", "--json", out], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr.splitlines()
    start = err.index("compiling the decode step (first call) ...")
    done = [i for i, line in enumerate(err) if line.startswith("compiled the decode step in")]
    assert done and done[0] > start
    data = json.loads(out.read_text())
    assert data["compile_s"] > 0 and data["num_new_tokens"] == n
    # Compiling took seconds; had the timed loop compiled again, its n-1 steps would take
    # about as long. They take a small fraction of it.
    assert data["tokens_per_s"] > 4 * (n - 1) / data["compile_s"], data
    (summary,) = [line for line in err if line.startswith("TTFT")]
    assert f"| compile {data['compile_s']:.1f} s |" in summary
    assert data["results"][0]["token_ids"] == hf_greedy(tiny_hf_dir("gemma3_text"), PROMPT, n)
