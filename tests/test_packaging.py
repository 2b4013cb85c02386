"""Packaging: our top-level kernels/ folder is importable only as megatron_lite.kernels.

Newer transformers import Hugging Face's ``kernels`` package (top-level name ``kernels``)
from ``transformers.integrations.hub_kernels``. A regular package named ``kernels`` in the
repository root, which ``python -c``, pytest and the tools put on ``sys.path``, would
shadow it and break every model load (pyproject.toml says how the layout avoids that).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import importlib.util, os, sys
import kernels
print(os.path.realpath(kernels.__file__ or ""))
import transformers.integrations.hub_kernels  # noqa: F401  (imports HF's kernels)
import megatron_lite.kernels.quant as q
print(os.path.realpath(q.__file__))
"""


def _probe(env_extra):
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


def test_kernels_folder_is_not_a_regular_package():
    assert (REPO / "kernels").is_dir()
    assert not (REPO / "kernels" / "__init__.py").exists()
    # megatron_lite.kernels is the same folder (a relative link, so it also travels).
    link = REPO / "megatron_lite" / "kernels"
    assert link.is_symlink() and os.readlink(link) == "../kernels"


@pytest.mark.parametrize("pythonpath", [False, True])
def test_import_kernels_from_repo_root_is_hugging_faces(pythonpath):
    pytest.importorskip("kernels", reason="HF kernels is in the test extras")
    pytest.importorskip("triton")
    hf_kernels, ours = _probe({"PYTHONPATH": str(REPO)} if pythonpath else {})
    assert not hf_kernels.startswith(str(REPO)), hf_kernels
    assert "site-packages" in hf_kernels or "dist-packages" in hf_kernels
    assert ours == str(REPO / "kernels" / "quant.py")


def test_hf_kernels_is_a_test_dependency():
    import tomllib
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for extra in ("dev", "test"):
        names = [d.split("[")[0].split(">")[0].split("=")[0].strip()
                 for d in meta["optional-dependencies"][extra]]
        assert "kernels" in names, extra
    # no upper pin on transformers: CI must meet the newest release
    tf = [d for d in meta["dependencies"] if d.startswith("transformers")]
    assert tf and "<" not in tf[0]


def test_cuda_codec_source_ships_with_the_package():
    """kernels/codec_cuda.py builds kernels/csrc/codec.cu (and the headers it includes) on
    a GPU machine: the files must be in the wheel (package data), not only in a checkout."""
    import fnmatch
    import tomllib
    from megatron_lite.kernels import codec_cuda
    assert Path(codec_cuda._SRC).is_file()
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = data["package-data"]["megatron_lite.kernels"]
    for src in Path(codec_cuda._CSRC).iterdir():
        rel = os.path.relpath(src, os.path.dirname(codec_cuda.__file__))
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), (rel, patterns)
