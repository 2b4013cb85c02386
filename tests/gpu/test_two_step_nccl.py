"""GPU: the portable two-step all-reduce over NCCL (comm/allreduce.py), with the codecs that
have no fused kernels (rotated, channel-scaled), equals the CPU reference bit for bit.

The same torch code runs on CUDA tensors and NCCL here and on CPU over simulated ranks in
the reference, so any difference would be a device-dependent rounding in a codec.
"""
import pytest
import torch

from tests.gpu._harness import gpu_count, needs_cuda, reference_all_reduce, run_nccl, same_bits

pytestmark = [pytest.mark.gpu, needs_cuda]

H = 640                                   # Gemma-3-270M's hidden size: 5 groups of 128
SPECS = ["int8:128", "int4:128", "hadamard-int4:128", "hadamard-int8:128",
         "weighted-int8:128", "weighted-hadamard-int4:128", "weighted-int4:32"]


def _scheme(spec):
    from megatron_lite.comm.allreduce import scheme_for
    from megatron_lite.comm.codecs import get_codec, parse_codec_spec
    from megatron_lite.comm.weighting import WeightedScheme, channel_scales
    if spec.startswith("weighted-"):
        g = torch.Generator().manual_seed(5)
        rms = torch.logspace(-1, 2, H)[torch.randperm(H, generator=g)]
        fisher = torch.rand(H, generator=g) + 0.01
        return WeightedScheme(parse_codec_spec(spec), channel_scales(rms, fisher))
    return scheme_for(get_codec(spec))


def _inputs(world, seed, tokens):
    g = torch.Generator().manual_seed(seed)
    amp = torch.logspace(-1, 2, H)[torch.randperm(H, generator=g)]
    return [(torch.randn(tokens, H, generator=g) * amp).bfloat16() for _ in range(world)]


def _checks(rank, world):
    from megatron_lite.comm.allreduce import two_step_all_reduce
    from megatron_lite.comm.communicator import DistCommunicator
    dev = torch.device("cuda", rank)
    comm = DistCommunicator()
    out = []
    for i, spec in enumerate(SPECS):
        for tokens in (1, 37, 512):
            xs = _inputs(world, 100 * i + tokens, tokens)
            scheme = _scheme(spec)
            y = two_step_all_reduce(comm, xs[rank].to(dev), scheme)
            ref = reference_all_reduce(xs, scheme)
            err = (y.float().cpu() - sum(x.float() for x in xs)).abs().max().item()
            out.append((spec, tokens, same_bits(y, ref), err))
    return out


@pytest.mark.parametrize("world", [2])
def test_two_step_over_nccl_equals_cpu_reference(world):
    if gpu_count() < world:
        pytest.skip(f"needs {world} GPUs")
    results = run_nccl(_checks, world)
    for spec, tokens, same, err in results[0]:        # the record (pytest -s shows it)
        print(f"two-step nccl W={world} {spec:28s} tokens={tokens:4d} bitwise={same} "
              f"max|err|={err:.4g}")
    for rank_out in results:
        for spec, tokens, same, err in rank_out:
            assert same, (spec, tokens, err)
