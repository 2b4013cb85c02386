"""GPU: the klt codecs (comm/codecs/klt.py) on the portable one-shot path over NCCL.

Their transform is a dense product computed exactly (sliced fp64 products, klt.py's
``exact_matmul``), so the claims checked here are that every rank holds bitwise the same
sum, that it equals the definition computed on the same GPU (each partial encoded with
its rank's basis, all decoded and summed in rank order), and that it equals the CPU
reference bit for bit. (With a plain fp32 matmul the GPU and CPU sums differed by a few
codes moved one step: 1.9e-4 of the sum's norm on 2 x H200.)
"""
import pytest
import torch

from tests.gpu._harness import gpu_count, needs_cuda, run_nccl, same_bits

pytestmark = [pytest.mark.gpu, needs_cuda]

H = 640


def _scheme(world):
    from megatron_lite.comm.codecs import parse_codec_spec
    from megatron_lite.comm.codecs.klt import TransformScheme
    from megatron_lite.lab.transform import TransformStats
    g = torch.Generator().manual_seed(7)
    mix = [torch.randn(200 + 60 * r, H, generator=g)
           * torch.linspace(3.0, 0.05, 200 + 60 * r)[:, None] for r in range(world)]
    st = TransformStats(world, (64,))
    for p in range(2):
        for r, m in enumerate(mix):
            st.update("s", r, torch.randn(800, m.shape[0], generator=g) @ m)
        if p == 0:
            st.make_bases({"s": torch.rand(H, generator=g) + 0.05})
    d, q, errs, _ = st.tables("s")
    return TransformScheme(parse_codec_spec("klt4:64"), d, q, errs[64]), mix


def _checks(rank, world, sch, xs):
    from megatron_lite.comm.algorithms import one_shot_all_reduce
    from megatron_lite.comm.communicator import DistCommunicator
    dev = torch.device("cuda", rank)
    out = []
    for i, x in enumerate(xs):
        y = one_shot_all_reduce(DistCommunicator(), x[rank].to(dev), sch)
        acc = sch.decode_partial(sch.encode_partial(x[0].to(dev), 0), 0)
        for r in range(1, world):
            acc = acc + sch.decode_partial(sch.encode_partial(x[r].to(dev), r), r)
        want = acc.to(x.dtype).reshape(y.shape)
        out.append((i, y.cpu(), same_bits(y, want)))
    return out


@pytest.mark.parametrize("world", [2])
def test_klt_one_shot_over_nccl(world):
    if gpu_count() < world:
        pytest.skip(f"needs {world} GPUs")
    from megatron_lite.comm.algorithms import one_shot_all_reduce
    from megatron_lite.comm.simulate import run_simulated
    sch, mix = _scheme(world)
    g = torch.Generator().manual_seed(8)
    xs = [torch.stack([torch.randn(t, m.shape[0], generator=g) @ m for m in mix]).to(dt)
          for t, dt in ((1, torch.bfloat16), (37, torch.bfloat16), (512, torch.float32))]
    res = run_nccl(_checks, world, sch, xs)
    for i, x in enumerate(xs):
        ys = [r[i][1] for r in res]
        cpu = run_simulated(lambda c, x=x: one_shot_all_reduce(c, x[c.rank], sch), world)[0]
        exact = x.float().sum(0)
        rel_cpu = ((ys[0].float() - cpu.float()).norm() / exact.norm()).item()
        rel = ((ys[0].float() - exact).norm() / exact.norm()).item()
        print(f"klt4:64 nccl W={world} tokens={x.shape[1]} {x.dtype} ranks identical="
              f"{all(same_bits(y, ys[0]) for y in ys)} definition={res[0][i][2]} "
              f"rel err={rel:.4g} |gpu-cpu|/|sum|={rel_cpu:.2e}")
        assert all(same_bits(y, ys[0]) for y in ys)
        assert all(r[i][2] for r in res)
        assert rel < 0.05
        assert same_bits(ys[0], cpu), rel_cpu       # the exact product: no device rounding
