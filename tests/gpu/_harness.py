"""Helpers for the GPU tests: import the kernels from a checkout, spawn NCCL ranks, and
compute the CPU reference of a quantized all-reduce from every rank's input."""
from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def import_kernels():
    """``megatron_lite.kernels`` (the repo's ``kernels/``), installed or not."""
    import types

    from megatron_lite.comm import fused as backends
    from megatron_lite.kernels import fused_allreduce, maps, quant, sync, workspace
    return types.SimpleNamespace(backends=backends, fused_allreduce=fused_allreduce, maps=maps,
                                 quant=quant, sync=sync, workspace=workspace)


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_nccl(fn, world: int, *args, timeout: float = 900.0):
    """Run ``fn(rank, world, *args)`` on ``world`` GPUs (one process each, NCCL group)."""
    return run_distributed(fn, world, *args, timeout=timeout, backend="nccl")


_RUNS = {}


def run_nccl_once(fn, world: int):
    """``run_nccl(fn, world)``, run once per test session (the tests of one module read the
    same ranks' results); skips where fewer than ``world`` GPUs are present."""
    if gpu_count() < world:
        pytest.skip(f"needs {world} GPUs")
    if (fn, world) not in _RUNS:
        _RUNS[fn, world] = run_nccl(fn, world)
    return _RUNS[fn, world]


def reference_all_reduce(xs, codec, algo="two-step"):
    """The quantized all-reduce of comm/algorithms.py (two-step unless ``algo`` says
    otherwise) on CPU over simulated ranks: the exact bits every backend must produce for
    the per-rank inputs ``xs``."""
    from megatron_lite.comm.algorithms import quantized_all_reduce
    from megatron_lite.comm.simulate import run_simulated
    outs = run_simulated(lambda comm, xs: quantized_all_reduce(comm, xs[comm.rank], codec,
                                                               algo),
                         len(xs), [x.cpu() for x in xs])
    return outs[0]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, except that any NaN equals any NaN."""
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return False
    iv = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a[~na].contiguous().view(iv), b[~nb].contiguous().view(iv))
