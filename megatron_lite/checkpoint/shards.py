"""Checkpoint directories on disk: the TP shard directory, HF directories, atomic writes.

Shard directory, layout_version 1 (docs/architecture.md, contract 5 of DESIGN.md)::

    <out>/config.json        HF config + "megatron_lite": {"tp_size", "layout_version",
                             "padded_vocab_size", "dtype"}
    <out>/tokenizer*.json ... every non-weight file of the HF directory, copied as is
    <out>/model-rank{r:03d}-of-{tp:03d}.safetensors
    <out>/manifest.json      {"layout_version": 1, "tp_size": N, "files": {name: sha256}}

A directory is whole or absent: it is written to ``<out>.tmp-<pid>`` and renamed into
place when complete. :func:`verify_shard_dir` checks the manifest (sha256 of every file)
and the TP size before anyone computes or joins a collective; every rank hashes every
file, so all ranks reach the same verdict and fail together instead of hanging.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_lite.checkpoint.layout import LAYOUT_VERSION
from megatron_lite.errors import CheckpointError

CONFIG_NAME = "config.json"
MANIFEST_NAME = "manifest.json"
META_KEY = "megatron_lite"
HF_INDEX_NAME = "model.safetensors.index.json"

# Files that are weights (or describe weights) and so are never copied as "tokenizer files".
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_NOT_COPIED = {CONFIG_NAME, MANIFEST_NAME, HF_INDEX_NAME, "pytorch_model.bin.index.json"}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``, the spelling HF configs use."""
    return str(dtype).replace("torch.", "")


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; use one of bf16, fp16, fp32")
    return DTYPES[name]


def shard_file_name(rank: int, tp: int) -> str:
    return f"model-rank{rank:03d}-of-{tp:03d}.safetensors"


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg})")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})")


def write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# ---------------------------------------------------------------------------------------
# Atomic output directories
# ---------------------------------------------------------------------------------------

def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``: called before any compute."""
    out = Path(out)
    if out.exists() and not force:
        raise CheckpointError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {out} exists and is not a directory")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling ``<out>.tmp-<pid>``; rename it to ``out`` on success.

    On any exception the temporary directory is removed, so ``out`` is whole or absent.
    With ``force`` an existing ``out`` is moved aside first and deleted only after the new
    directory is in place.
    """
    out = Path(out).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)   # inputs are verified by now
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.exists():
            if not force:  # appeared while we were writing
                raise CheckpointError(f"output directory {out} appeared while writing; not replaced")
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------
# HF directories
# ---------------------------------------------------------------------------------------

def tokenizer_files(src: Path) -> List[str]:
    """Every plain file of an HF directory that is not config or weights (tokenizer files,
    chat template, generation config, special tokens map, ...)."""
    src = Path(src)
    return sorted(p.name for p in src.iterdir()
                  if p.is_file() and p.name not in _NOT_COPIED
                  and not p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.startswith("."))


def copy_tokenizer_files(src: Path, dst: Path) -> List[str]:
    names = tokenizer_files(src)
    for name in names:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    return names


def hf_weight_files(hf_dir: Path) -> List[Path]:
    """The safetensors files of an HF directory (single file or index-sharded)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / HF_INDEX_NAME
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise CheckpointError(f"{hf_dir}: files named in {HF_INDEX_NAME} are missing: "
                                  + ", ".join(missing))
        return [hf_dir / n for n in names]
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        other = [p.name for p in hf_dir.iterdir() if p.name.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {', '.join(sorted(other))}; re-save it with safe_serialization)" if other else ""
        raise CheckpointError(f"{hf_dir} holds no *.safetensors weights{hint}")
    return files


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class HFWeights(Mapping):
    """The tensors of an HF directory by HF name, read lazily from the safetensors files.

    Indexing reads one tensor (memory-mapped) and casts floating-point ones to ``dtype``;
    so sharding for one rank touches only that rank's bytes, not the whole model.
    """

    def __init__(self, hf_dir: Path, dtype: Optional[torch.dtype] = None):
        self.dtype = dtype
        self._file_of: Dict[str, str] = {}
        self._handles: Dict[str, object] = {}
        for path in hf_weight_files(hf_dir):
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise CheckpointError(f"cannot read {path}: {str(e).splitlines()[0]}")
            self._handles[str(path)] = handle
            for name in handle.keys():
                if name in self._file_of:
                    raise CheckpointError(f"{path}: tensor {name} appears in two weight files")
                self._file_of[name] = str(path)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._handles[self._file_of[name]].get_tensor(name)
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def stored_dtypes(self) -> Dict[str, torch.dtype]:
        out = {}
        for name, f in self._file_of.items():
            code = self._handles[f].get_slice(name).get_dtype()
            out[name] = _ST_DTYPES.get(code, torch.float32)
        return out

    def numel(self, name: str) -> int:
        n = 1
        for d in self._handles[self._file_of[name]].get_slice(name).get_shape():
            n *= d
        return n

    def stored_dtype(self) -> torch.dtype:
        """The dtype most floating-point weights are stored in (the checkpoint's dtype)."""
        counts: Dict[torch.dtype, int] = {}
        for name, dt in self.stored_dtypes().items():
            if dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + self.numel(name)
        if not counts:
            raise CheckpointError("checkpoint holds no floating-point tensors")
        return max(counts, key=counts.get)


def load_hf_state_dict(hf_dir: Path, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """All tensors of an HF directory, eagerly (tests, small models)."""
    weights = HFWeights(hf_dir, dtype)
    return {k: weights[k] for k in weights}


def save_hf_state_dict(state: Dict[str, torch.Tensor], out: Path,
                       max_shard_bytes: int = 5 << 30) -> List[str]:
    """Write ``state`` as HF safetensors: ``model.safetensors`` or, above ``max_shard_bytes``,
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``."""
    groups: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        t = state[name]
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(groups) == 1:
        save_file(groups[0], str(Path(out) / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    total = sum(t.numel() * t.element_size() for t in state.values())
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(group, str(Path(out) / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in group})
    write_json(Path(out) / HF_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [HF_INDEX_NAME]


# ---------------------------------------------------------------------------------------
# Shard directories
# ---------------------------------------------------------------------------------------

def is_shard_dir(path: Path) -> bool:
    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return True
    cfg = path / CONFIG_NAME
    if cfg.is_file():
        try:
            return META_KEY in read_json(cfg)
        except CheckpointError:
            return False
    return False


def write_manifest(directory: Path, tp: int) -> dict:
    """sha256 every file in ``directory`` (except the manifest) into manifest.json."""
    directory = Path(directory)
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir())
             if p.is_file() and p.name != MANIFEST_NAME}
    manifest = {"layout_version": LAYOUT_VERSION, "tp_size": tp, "files": files}
    write_json(directory / MANIFEST_NAME, manifest)
    return manifest


def save_rank_shard(directory: Path, rank: int, tp: int, state: Dict[str, torch.Tensor]) -> str:
    name = shard_file_name(rank, tp)
    save_file({k: v.contiguous() for k, v in state.items()}, str(Path(directory) / name),
              metadata={"format": "pt", "tp_rank": str(rank), "tp_size": str(tp),
                        "layout_version": str(LAYOUT_VERSION)})
    return name


def verify_shard_dir(path: Path, world_size: Optional[int] = None, check_hashes: bool = True) -> dict:
    """Check a shard directory and return its config.json (with the ``megatron_lite`` block).

    Raises :class:`CheckpointError` when the directory or manifest is missing, the layout
    version is unknown, ``tp_size != world_size`` (when given), a file is missing, extra
    rank files exist, or any sha256 differs from the manifest. The TP check comes first: it
    is the cheap one.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not (path / MANIFEST_NAME).is_file():
        raise CheckpointError(f"{path} is not a megatron_lite shard directory (no {MANIFEST_NAME})")
    manifest = read_json(path / MANIFEST_NAME)
    config = read_json(path / CONFIG_NAME)
    meta = config.get(META_KEY)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / CONFIG_NAME} has no '{META_KEY}' block")
    for where, version in (("manifest", manifest.get("layout_version")),
                           ("config", meta.get("layout_version"))):
        if version != LAYOUT_VERSION:
            raise CheckpointError(f"{path}: {where} layout_version {version!r} is not "
                                  f"{LAYOUT_VERSION}; re-convert the checkpoint")
    tp = manifest.get("tp_size")
    if not isinstance(tp, int) or tp < 1 or meta.get("tp_size") != tp:
        raise CheckpointError(f"{path}: manifest tp_size {tp!r} disagrees with config "
                              f"tp_size {meta.get('tp_size')!r}")
    if world_size is not None and tp != world_size:
        raise CheckpointError(f"{path} was converted for TP {tp} but the world size is "
                              f"{world_size}; run with --nproc_per_node={tp} or re-convert with --tp {world_size}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST_NAME} has no 'files' table")
    expected = {shard_file_name(r, tp) for r in range(tp)} | {CONFIG_NAME}
    missing_from_manifest = sorted(expected - files.keys())
    if missing_from_manifest:
        raise CheckpointError(f"{path}: manifest does not list {', '.join(missing_from_manifest)}")
    stray = sorted(p.name for p in path.glob("model-rank*.safetensors") if p.name not in files)
    if stray:
        raise CheckpointError(f"{path}: rank files not in the manifest: {', '.join(stray)}")
    for name in sorted(files):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if check_hashes and _file_sha256(f) != files[name]:
            raise CheckpointError(f"{path}: {name} is corrupt (sha256 does not match the manifest)")
    return config


# (path, size, mtime_ns) -> sha256: a CLI verifies before joining the process group and the
# engine verifies again when it loads; the second pass must not hash a GB again.
_HASHED: Dict[tuple, str] = {}


def _file_sha256(f: Path) -> str:
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(f)
    return _HASHED[key]


def load_rank_shard(path: Path, rank: int, tp: int,
                    dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    f = Path(path) / shard_file_name(rank, tp)
    try:
        state = load_file(str(f))
    except Exception as e:
        raise CheckpointError(f"cannot read {f}: {e}".splitlines()[0])
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state
