"""GPU: the portable two-step all-reduce over NCCL (comm/algorithms.py), with the codecs that
have no fused kernels (rotated, channel-scaled), equals the CPU reference bit for bit; so
do the one-shot algorithm (``algo=one-shot``) on the portable path and on its Triton
kernels around NCCL's all-gather, and the error part those kernels return for feedback.

The same torch code runs on CUDA tensors and NCCL here and on CPU over simulated ranks in
the reference, so any difference would be a device-dependent rounding in a codec.
"""
import pytest
import torch

from tests.gpu._harness import (gpu_count, import_kernels, needs_cuda, reference_all_reduce,
                                run_nccl, same_bits)

pytestmark = [pytest.mark.gpu, needs_cuda]

H = 640                                   # Gemma-3-270M's hidden size: 5 groups of 128
SPECS = ["int8:128", "int4:128", "hadamard-int4:128", "hadamard-int8:128",
         "weighted-int8:128", "weighted-hadamard-int4:128", "weighted-int4:32"]


def _scheme(spec):
    from megatron_lite.comm.codecs import get_scheme, parse_codec_spec
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    from megatron_lite.lab.calibration import channel_scales
    if spec.startswith("weighted-"):
        g = torch.Generator().manual_seed(5)
        rms = torch.logspace(-1, 2, H)[torch.randperm(H, generator=g)]
        fisher = torch.rand(H, generator=g) + 0.01
        return WeightedScheme(parse_codec_spec(spec), channel_scales(rms, fisher))
    return get_scheme(spec)


def _inputs(world, seed, tokens):
    g = torch.Generator().manual_seed(seed)
    amp = torch.logspace(-1, 2, H)[torch.randperm(H, generator=g)]
    return [(torch.randn(tokens, H, generator=g) * amp).bfloat16() for _ in range(world)]


ONE_SHOT_SPECS = ["int4:128", "hadamard-int4:128", "weighted-hadamard-int4:128",
                  "weighted-hadamard-int5:128", "int8:128"]


def _checks(rank, world):
    import_kernels()
    from megatron_lite.comm.algorithms import Trace, quantized_all_reduce
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.comm.fused import one_shot_kernels_all_reduce
    dev = torch.device("cuda", rank)
    comm = DistCommunicator()
    out = []
    cases = [(s, "two-step") for s in SPECS] + [(s, "one-shot") for s in ONE_SHOT_SPECS]
    for i, (spec, algo) in enumerate(cases):
        for tokens in (1, 37, 512):
            xs = _inputs(world, 100 * i + tokens, tokens)
            scheme = _scheme(spec)
            y = quantized_all_reduce(comm, xs[rank].to(dev), scheme, algo)
            ref = reference_all_reduce(xs, scheme, algo)
            exact = sum(x.float() for x in xs)
            rel = ((y.float().cpu() - exact).norm() / exact.norm()).item()
            out.append((f"{spec},{algo}", tokens, same_bits(y, ref), rel))
            if algo == "one-shot":   # the Triton quantize / dequantize-sum kernels around NCCL
                yk = one_shot_kernels_all_reduce(comm, xs[rank].to(dev), scheme)
                out.append((f"{spec},one-shot-kernels", tokens, same_bits(yk, ref), rel))
                # the error part error feedback books, kernels vs the scheme's own_error
                _, ek = one_shot_kernels_all_reduce(comm, xs[rank].to(dev), scheme,
                                                    with_error=True)
                trace = Trace()
                quantized_all_reduce(comm, xs[rank].to(dev), scheme, "one-shot", trace)
                er = trace.restore(scheme.own_error(trace.chunks, None, rank)).float()
                out.append((f"{spec},one-shot-kernels error part", tokens, same_bits(ek, er),
                            ek.norm().item()))
    from megatron_lite.comm.build import build_communicator
    qc = build_communicator(comm, "int4:128,algo=one-shot")
    x = torch.randn(8, H, device=dev, dtype=torch.bfloat16)
    out.append(("explain " + qc.explain(x, "layers.0.mlp.down_proj"), 8,
                qc.explain(x, "layers.0.mlp.down_proj").split("; transport ")[0] == "one-shot-kernels with int4:128", 0.0))
    return out


@pytest.mark.parametrize("world", [2])
def test_two_step_over_nccl_equals_cpu_reference(world):
    if gpu_count() < world:
        pytest.skip(f"needs {world} GPUs")
    results = run_nccl(_checks, world)
    for spec, tokens, same, err in results[0]:        # the record (pytest -s shows it)
        print(f"portable nccl W={world} {spec:38s} tokens={tokens:4d} bitwise={same} "
              f"rel err={err:.4g}")
    for rank_out in results:
        for spec, tokens, same, err in rank_out:
            assert same, (spec, tokens, err)
    rel = {(s, t): e for s, t, _, e in results[0]}
    for spec in ("int4:128", "hadamard-int4:128"):   # one quantization per value, not two
        assert rel[(spec + ",one-shot", 512)] < 0.85 * rel[(spec + ",two-step", 512)], spec
