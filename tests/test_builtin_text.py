"""``--text python-docs``: English prose from the standard library's docstrings
(megatron_lite/lab/eval/pydocs.py), the same in every process of a Python version, and
usable wherever a tool takes --text (calibrate, evaluate, sensitivity), which record the
Python version it came from."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from collections import Counter

import pytest

from megatron_lite.lab.eval import pydocs
from megatron_lite.lab.eval.data import load_text_windows
from tests.conftest import REPO, make_char_tokenizer
from tests.test_calibrate import run_main

PROBE = ("import hashlib; from megatron_lite.lab.eval.pydocs import python_docs; "
         "print(hashlib.sha256(python_docs().encode()).hexdigest())")


@pytest.fixture(scope="module")
def text():
    return pydocs.python_docs()


def test_same_text_in_every_process(text):
    """Nothing depends on hashing, import state or the file system's listing order."""
    here = hashlib.sha256(text.encode()).hexdigest()
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == here
    # and the paragraphs a fresh reader produces are the cached ones
    assert "\n\n".join(pydocs._paragraphs()) == text


def test_the_cli_knows_the_name():
    from megatron_lite.cli.common import PYTHON_DOCS
    assert PYTHON_DOCS == pydocs.NAME == "python-docs"


def test_prefixes_are_prefixes(text):
    for n in (1, 5000, 123456):
        head = pydocs.python_docs(n)
        assert len(head) >= n and text.startswith(head)
        assert head.endswith(".")                       # whole paragraphs


def test_it_is_long_english_prose(text):
    paragraphs = text.split("\n\n")
    assert len(text) > 300_000 and len(paragraphs) > 1500
    words = re.findall(r"[A-Za-z']+", text.lower())
    common = Counter(words)
    # English function words at their usual rates (about 5% "the" in prose)
    assert common["the"] / len(words) > 0.04
    for w in ("is", "a", "of", "to", "and", "that", "this", "be"):
        assert common[w] / len(words) > 0.005, w
    assert 3.5 < sum(map(len, words)) / len(words) < 7
    letters = sum(c.isalpha() for c in text)
    assert letters / len(text) > 0.75
    for p in paragraphs:
        assert p[0].isupper() and p.endswith(".") and len(p.split()) >= 12, p
        assert ">>>" not in p and "\n" not in p
    assert len(set(paragraphs)) == len(paragraphs)


def test_text_windows_read_only_what_they_need():
    tok = make_char_tokenizer()            # one token per character, BOS first
    tw = load_text_windows(tok, "python-docs", window=64, max_tokens=630)
    assert tw.path == "python-docs" and len(tw.windows) == 10
    ids = [i for w in tw.windows for i in w.ids[1:]]
    # (the test tokenizer maps a line break pair to one unknown token: hence 700 chars)
    assert ids == tok(pydocs.python_docs()[:700], add_special_tokens=False)["input_ids"][:630]


# ------------------------------------------------------------------ in every --text tool
def test_calibrate_records_the_python_version(tiny_hf_dir, tmp_path, capsys):
    from megatron_lite.comm.calibration import load_calibration
    out = tmp_path / "c.safetensors"
    rc, err = run_main("calibrate", ["--ckpt", tiny_hf_dir("llama"), "--text", "python-docs",
                                     "--tp", "2", "--out", out, "--num-seqs", "4",
                                     "--seq-len", "32", "--no-progress"], capsys)
    assert rc == 0, err
    meta = load_calibration(str(out)).meta
    assert meta["text"] == "python-docs" and meta["num_seqs"] == 4
    assert meta["text_python"] == platform.python_version()
    assert meta["text_python_implementation"] == platform.python_implementation()


def test_evaluate_and_sensitivity_take_it(tiny_hf_dir, tmp_path, capsys):
    det, sens = tmp_path / "d.json", tmp_path / "s.json"
    ckpt = tiny_hf_dir("llama")
    rc, err = run_main("evaluate", ["--ckpt", ckpt, "--tp", "2", "--comm", "int8:32",
                                    "--text", "python-docs", "--window", "48",
                                    "--max-tokens", "94", "--details", det,
                                    "--no-progress"], capsys)
    assert rc == 0, err
    d = json.loads(det.read_text())
    assert d["text"] == "python-docs" and d["text_tokens"] == 94
    assert d["text_python"] == platform.python_version()
    rc, err = run_main("sensitivity", ["--ckpt", ckpt, "--tp", "2", "--comm", "int4:32",
                                       "--comm", "int8:32", "--text", "python-docs",
                                       "--num-seqs", "1", "--seq-len", "24", "--budget", "6",
                                       "--out", sens, "--no-progress"], capsys)
    assert rc == 0, err
    s = json.loads(sens.read_text())
    assert s["text"] == "python-docs" and s["text_python"] == platform.python_version()
    assert s["codecs"] == ["int4:32", "int8:32"] and len(s["kl"]) == 2 * 3
