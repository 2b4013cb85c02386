"""GPU: the all-reduce fused with the residual add and RMSNorm (kernels/allreduce_norm.py)
over torch symmetric memory, at world sizes 2 and 4, against the unfused path.

One spawned NCCL job per world size runs every check and returns plain values; the tests
assert on them. "Unfused" is the communicator's own all-reduce followed by comm/norm.py's
torch ops on the GPU (``Communicator.all_reduce_add_rmsnorm``); for the quantized codecs
the sum is also checked against comm/algorithms.py's one-shot algorithm on CPU over
simulated ranks. The sum and the pre-norm residual must match bit for bit; the norm
outputs within tests/test_allreduce_norm.py's tolerance (the row's sum of squares is
reduced in another order than torch's CUDA kernel).
"""
import pytest
import torch

from tests.gpu._harness import (import_kernels, needs_cuda, reference_all_reduce, run_nccl_once,
                                same_bits)
from tests.test_allreduce_norm import CASES, _check, _norm_kwargs

pytestmark = [pytest.mark.gpu, needs_cuda]

SITE = "layers.0.mlp.down_proj"
CODECS = ["int4:128", "int8:128", "fp8:128", "int3:128", "hadamard-int4:128"]


def _inputs(world, rows, h, dtype, seed):
    return [(torch.randn(rows, h, generator=torch.Generator().manual_seed(seed * 10 + r))
             * (1 + r)).to(dtype) for r in range(world)]


def _kw(kw):
    """comm-layer keywords -> the kernel's (``sandwich`` instead of ``layout``)."""
    out = {k: v for k, v in kw.items() if k != "layout"}
    out["sandwich"] = kw["layout"] == "sandwich"
    return out


def _to(kw, dev):
    return {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _checks(rank, world):
    import torch.distributed as dist
    k = import_kernels()
    from megatron_lite.comm.codecs import CodecSpec, get_scheme
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    from megatron_lite.comm.communicator import Communicator, DistCommunicator
    from megatron_lite.comm.norm import add_rmsnorm
    from megatron_lite.comm.router import QuantizedCommunicator
    from megatron_lite.comm.spec import parse_comm
    from megatron_lite.kernels import allreduce_norm as an
    dev = torch.device("cuda", rank)
    table = {"oneshot_max": 1 << 20, "fused_min": {"*": 1 << 30}}
    res = {"raw": [], "codec": [], "comm": [], "mixed": [], "graph": []}
    sums = []

    # 1. raw (auto -> oneshot): fused vs unfused through the same communicator
    qc = QuantizedCommunicator(DistCommunicator(), parse_comm("auto"))
    k.backends.install_fused(qc, max_bytes=16 << 20, oneshot_max_bytes=1 << 20, table=table)
    ws = qc.backends[0].state.ws
    assert ws is not None, qc.backends[0].state.why
    variants = [(torch.bfloat16, h, rows, case) for h in (4096, 5120) for rows in (1, 33)
                for case in CASES]
    variants += [(torch.float16, 4096, 8, CASES[0]), (torch.float32, 2048, 8, CASES[3]),
                 (torch.bfloat16, 8192, 64, CASES[1])]
    for i, (dtype, h, rows, case) in enumerate(variants):
        w, kw = _norm_kwargs(case, h, dtype, torch.Generator().manual_seed(i))
        w, kw = (w.to(dev) if w is not None else None), _to(kw, dev)
        residual = (torch.randn(rows, h, generator=torch.Generator().manual_seed(77 + i))
                    * 4).to(dtype).to(dev)
        x = _inputs(world, rows, h, dtype, i)[rank].to(dev)
        why = qc.explain_add_rmsnorm(x, SITE)
        got = qc.all_reduce_add_rmsnorm(x, residual, w, 1e-6, SITE, **kw)
        want = Communicator.all_reduce_add_rmsnorm(qc, x, residual, w, 1e-6, SITE, **kw)
        torch.cuda.synchronize()
        res["raw"].append((str(dtype), h, rows, *case, why.startswith("fused"),
                           *_check(got, want, exact_residual=case[0] == "pre")))
        sums.append(float(got[0].float().sum()))

    # 2. one-shot quantized codecs: the CPU one-shot reference's sum, then torch ops
    h, rows = 4096, 4
    scale = torch.rand(h, generator=torch.Generator().manual_seed(5)) * 8 + 0.05
    schemes = [get_scheme(c) for c in CODECS]
    schemes += [WeightedScheme(CodecSpec("weighted-int8", 128), scale),
                WeightedScheme(CodecSpec("weighted-hadamard-int4", 128), scale)]
    for i, scheme in enumerate(schemes):
        for case in (CASES[0], CASES[3]):
            xs = _inputs(world, rows, h, torch.bfloat16, 300 + i)
            w, kw = _norm_kwargs(case, h, torch.bfloat16, torch.Generator().manual_seed(i))
            residual = torch.randn(rows, h, generator=torch.Generator().manual_seed(i)
                                   ).to(torch.bfloat16)
            x = xs[rank].to(dev)
            got = an.all_reduce_add_rmsnorm(
                ws, x, residual.to(dev), w.to(dev), 1e-6, plan=scheme.kernel_plan(x),
                **_kw(_to(kw, dev)))
            y = reference_all_reduce(xs, scheme, "one-shot")
            want = add_rmsnorm(y, residual, w, 1e-6, **kw)
            torch.cuda.synchronize()
            got = tuple(t.cpu() for t in got)
            res["codec"].append((scheme.spec, *case,
                                 *_check(got, want, exact_residual=case[0] == "pre")))
            sums.append(float(torch.nan_to_num(got[0].float()).sum()))

    # 3. the communicator with algo=one-shot: fused where the hidden size takes the group
    #    (fp8: its unfused path runs the Triton codec kernels, not the JIT-built CUDA ones)
    for spec, h in (("fp8:128,algo=one-shot", 4096), ("fp8:128,algo=one-shot", 4160)):
        q1 = QuantizedCommunicator(DistCommunicator(), parse_comm(spec))
        k.backends.install_fused(q1, max_bytes=16 << 20, oneshot_max_bytes=1 << 20,
                                 table=table)
        xs = _inputs(world, 2, h, torch.bfloat16, h)
        w, kw = _norm_kwargs(CASES[0], h, torch.bfloat16, torch.Generator().manual_seed(1))
        residual = torch.randn(2, h, generator=torch.Generator().manual_seed(2)
                               ).to(torch.bfloat16)
        x = xs[rank].to(dev)
        why = q1.explain_add_rmsnorm(x, SITE)
        got = q1.all_reduce_add_rmsnorm(x, residual.to(dev), w.to(dev), 1e-6, SITE,
                                        **_to(kw, dev))
        want = add_rmsnorm(reference_all_reduce(xs, get_scheme("fp8:128"), "one-shot"),
                           residual, w, 1e-6, **kw)
        got = tuple(t.cpu() for t in got)
        res["comm"].append((spec, h, why, *_check(got, want, exact_residual=True)))

    # 4. changing row counts from call to call, between one-shot and two-shot calls (the
    #    epochs and parities of the fixed grid), and 5. CUDA graph replays
    plan = get_scheme("int8:128").kernel_plan(torch.zeros(1))
    for i, rows in enumerate((1, 64, 3, 1, 17, 2)):
        xs = _inputs(world, rows, 4096, torch.bfloat16, 900 + i)
        w, kw = _norm_kwargs(CASES[1], 4096, torch.bfloat16, torch.Generator().manual_seed(i))
        residual = torch.randn(rows, 4096, generator=torch.Generator().manual_seed(i)
                               ).to(torch.bfloat16)
        got = an.all_reduce_add_rmsnorm(ws, xs[rank].to(dev), residual.to(dev), w.to(dev),
                                        1e-6, plan=plan if i % 2 else None,
                                        **_kw(_to(kw, dev)))
        k.fused_allreduce.one_shot_all_reduce(ws, xs[rank].to(dev).view(-1)[:1000])
        k.fused_allreduce.two_shot_all_reduce(ws, xs[rank].to(dev), plan)
        if i % 2:
            y = reference_all_reduce(xs, get_scheme("int8:128"), "one-shot")
        else:
            acc = xs[0].float()
            for o in xs[1:]:
                acc = acc + o.float()
            y = acc.to(torch.bfloat16)
        want = add_rmsnorm(y, residual, w, 1e-6, **kw)
        got = tuple(t.cpu() for t in got)
        res["mixed"].append((rows, *_check(got, want, exact_residual=True)))

    rows, h = 8, 4096
    w, kw = _norm_kwargs(CASES[3], h, torch.bfloat16, torch.Generator().manual_seed(3))
    w, kwd = w.to(dev), _kw(_to(kw, dev))
    static_x = torch.zeros(rows, h, dtype=torch.bfloat16, device=dev)
    static_r = torch.zeros(rows, h, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):             # warm up (compile) outside the capture
        an.all_reduce_add_rmsnorm(ws, static_x, static_r, w, 1e-6, **kwd)
        an.all_reduce_add_rmsnorm(ws, static_x, static_r, w, 1e-6, plan=plan, **kwd)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_raw = an.all_reduce_add_rmsnorm(ws, static_x, static_r, w, 1e-6, **kwd)
        g_q = an.all_reduce_add_rmsnorm(ws, static_x, static_r, w, 1e-6, plan=plan, **kwd)
    for rep in range(3):
        xs = _inputs(world, rows, h, torch.bfloat16, 50 + rep)
        static_x.copy_(xs[rank].to(dev))
        static_r.copy_(torch.randn(rows, h, generator=torch.Generator().manual_seed(rep)))
        graph.replay()
        torch.cuda.synchronize()
        e_raw = an.all_reduce_add_rmsnorm(ws, static_x, static_r, w, 1e-6, **kwd)
        e_q = an.all_reduce_add_rmsnorm(ws, static_x, static_r, w, 1e-6, plan=plan, **kwd)
        torch.cuda.synchronize()
        res["graph"].append((rep, all(same_bits(a, b) for a, b in zip(g_raw + g_q,
                                                                        e_raw + e_q))))
    torch.cuda.synchronize()
    res["status"] = int(ws.status[0].item())
    gathered = [None] * world
    dist.all_gather_object(gathered, sums)
    res["ranks_same"] = all(g == gathered[0] for g in gathered)
    return res


def results(world):
    return run_nccl_once(_checks, world)


@pytest.mark.parametrize("world", [2, 4])
def test_raw_fused_matches_unfused(world):
    for r in results(world):
        assert len(r["raw"]) == 27
        for c in r["raw"]:
            assert c[7] and c[8] and c[9], c        # fused path, residual', normed


@pytest.mark.parametrize("world", [2, 4])
def test_quantized_fused_matches_one_shot_reference(world):
    for r in results(world):
        assert len(r["codec"]) == 14
        for c in r["codec"]:
            assert c[5] and c[6], c


@pytest.mark.parametrize("world", [2, 4])
def test_communicator_takes_the_fused_kernel_where_it_fits(world):
    for r in results(world):
        (s0, h0, why0, *ok0), (s1, h1, why1, *ok1) = r["comm"]
        assert why0.startswith("fused add + RMSNorm: one-shot-kernels"), why0
        assert why1.startswith("unfused (hidden size 4160"), why1
        assert ok0[0] and ok0[1] and ok1[0] and ok1[1], r["comm"]


@pytest.mark.parametrize("world", [2, 4])
def test_row_counts_change_between_calls_and_graphs_replay(world):
    for r in results(world):
        assert len(r["mixed"]) == 6 and all(c[1] and c[2] for c in r["mixed"]), r["mixed"]
        assert len(r["graph"]) == 3 and all(c[1] for c in r["graph"]), r["graph"]
        assert r["status"] == 0


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_bitwise_identical(world):
    assert all(r["ranks_same"] for r in results(world))
