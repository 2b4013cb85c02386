"""Where the host time of an eager all-reduce call goes, on one GPU (a diagnostic, not a
test): for each spec, the mean host microseconds of the communicator's route (the launch
path of W > 1, tools/bench_allreduce.py --host-overhead) and a cProfile of it; then the
cost of the single host operations that path makes.

    torchrun --nproc_per_node=1 tests/gpu/profile_host.py [SPEC ...]
"""
import cProfile
import io
import pstats
import sys
import time

import torch
import torch.distributed as dist

from megatron_lite.comm.build import build_communicator
from megatron_lite.comm.communicator import DistCommunicator
from megatron_lite.comm.fused import install_fused

SPECS = sys.argv[1:] or ["auto", "int4:128,path=fused", "int4:128,algo=one-shot",
                         "hadamard-int8:128,algo=one-shot"]   # weighted- needs a calibration
SITE = "layers.0.mlp.down_proj"


def mean_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter_ns()
    for _ in range(n):
        fn()
    us = (time.perf_counter_ns() - t) / n / 1e3
    torch.cuda.synchronize()
    return us


def main():
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 0)
    dist.init_process_group("nccl", device_id=dev)
    base = DistCommunicator()
    x = torch.randn(8192, device=dev).to(torch.bfloat16).view(-1, 2048)
    for spec in SPECS:
        comm = build_communicator(base, spec, max_bytes=64 << 20)
        install_fused(comm, max_bytes=64 << 20, one_rank=True)
        print(f"\n=== {spec}: {comm.explain(x, SITE)}")
        call = lambda: comm.route(x, SITE)  # noqa: E731
        print(f"mean host us per call (no hold): {mean_us(call):.2f}")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(500):
            call()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
        print("\n".join(line for line in s.getvalue().splitlines()[6:] if line.strip()))
    from megatron_lite.kernels import codec_cuda
    from megatron_lite.kernels import fused_allreduce as fa
    ws = comm.backends[0].state.ws
    out = torch.empty_like(x)
    y = torch.randn(1 << 16, device=dev)
    bound = codec_cuda.OneShotLaunch(ws, x.numel(), x.dtype, fa.one_shot_block(x.numel(), dev),
                                     fa.one_shot_grid(ws, dev), 1 << 22)
    prepared = fa.one_shot_launcher(ws, x)
    ext, handle = codec_cuda._ext(), bound._handles[0].h
    xp, op, stream = x.data_ptr(), out.data_ptr(), torch._C._cuda_getCurrentRawStream(0)
    prims = {
        "torch.empty_like(x)": lambda: torch.empty_like(x),
        "x.contiguous()": lambda: x.contiguous(),
        "x.view(x.shape)": lambda: x.view(x.shape),
        "x.data_ptr()": lambda: x.data_ptr(),
        "x.numel()": lambda: x.numel(),
        "x.is_cuda": lambda: x.is_cuda,
        "x.device": lambda: x.device,
        "x.device != ws.device": lambda: x.device != ws.device,
        "get_device_properties": lambda: torch.cuda.get_device_properties(dev),
        "raw stream": lambda: torch._C._cuda_getCurrentRawStream(0),
        "codec_cuda._ext()": lambda: codec_cuda._ext(),
        "y.add_(1.0) (a torch launch)": lambda: y.add_(1.0),
        "fa.one_shot_all_reduce(ws, x)": lambda: fa.one_shot_all_reduce(ws, x),
        "codec_cuda.one_shot_all_reduce (out given)":
            lambda: codec_cuda.one_shot_all_reduce(ws, x, out, fa.one_shot_block(x.numel(), dev),
                                                  fa.one_shot_grid(ws, dev), 1 << 22),
        # the prepared path a backend's call takes, piece by piece: the bound launch
        # (alignment checks, stream, extension call), then the extension call alone
        "bound one-shot launch (out given)": lambda: bound(x, out),
        "prepared one-shot launcher (allocates out)": lambda: prepared(x),
        "ext.ml_launch (handle, pointers, stream)":
            lambda: ext.ml_launch(handle, xp, op, 0, stream),
        "comm.plan(x, SITE)": lambda: comm.plan(x, SITE),
    }
    print("\nsingle operations, mean host us")
    for name, fn in prims.items():
        print(f"{name:45s} {mean_us(fn, 5000):8.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
