"""tools/bench_gemv.py on the CPU: the layers it times for a shape and TP size, and one-line
errors with a non-zero exit (it times a GPU kernel, so a CPU run stops at the device check;
its speeds come from a GPU, docs/results/data/gemv/)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tests.conftest import run_tool

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                     "bench_gemv.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gemv", _TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_gemv_layers_are_the_ranks_slices():
    layers = _bench().layers
    assert layers("llama3-8b", 1) == [("qkv", 6144, 4096, 32), ("o", 4096, 4096, 32),
                                      ("gate_up", 28672, 4096, 32), ("down", 4096, 14336, 32),
                                      ("lm_head", 128256, 4096, 1)]
    # TP 4: q heads split, the 8 KV heads split to 2 per rank, vocab split
    assert layers("llama3-8b", 4)[0] == ("qkv", (8 + 2 * 2) * 128, 4096, 32)
    assert layers("llama3-70b", 8)[0] == ("qkv", (8 + 2 * 1) * 128, 8192, 80)
    # the vocab padded to a multiple of 128 * tp, as the model's LM head holds it
    assert layers("llama3-8b", 4)[-1] == ("lm_head", 32128, 4096, 1)
    assert layers("llama2-13b", 4)[-1] == ("lm_head", 8064, 5120, 1)
    with pytest.raises(ValueError, match="does not divide"):
        layers("llama3-8b", 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer")
def test_bench_gemv_needs_a_gpu():
    proc = run_tool(["tools/bench_gemv.py", "--shape", "llama3-8b"])
    assert proc.returncode == 2 and proc.stderr.strip() == "error: needs a CUDA GPU"


def test_bench_gemv_bad_shape_is_one_line():
    proc = run_tool(["tools/bench_gemv.py", "--shape", "nope"])
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr
