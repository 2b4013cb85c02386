"""GPU: the fused all-reduce kernels over torch symmetric memory, at world sizes 2 and 4;
the two-shot kernels (CUDA C++ and Triton) also at one rank, on a one-GPU machine.

One spawned NCCL job per world size runs every check and returns plain numbers; the
tests below assert on them. The reference is comm/algorithms.py's two-step algorithm run
on CPU over simulated ranks with the same per-rank inputs, so "equal" means bit for bit.
"""
import math

import pytest
import torch

from tests.gpu._harness import (import_kernels, needs_cuda, reference_all_reduce, run_nccl_once,
                                same_bits)

pytestmark = [pytest.mark.gpu, needs_cuda]

CODECS = ["bf16", "int8:128", "int4:128", "int4:32", "int4-int8:128", "int4-sym:64", "fp8:128",
          "int3:64", "int2:128", "int8:256", "int5:128", "int5:64", "int6-sym:128"]
SIZES = [1, 3, 127, 1000, 3 * 4096 * 4 + 17, (1 << 20) + 3]


def inputs(world, n, dtype, seed, specials=False):
    xs = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed * 100 + r)
        x = torch.randn(n, generator=g) * (1 + r)
        if specials and n > 5000:
            if r == 1:
                x[5] = math.nan
            if r == 0:
                x[4100] = math.inf
            if r == world - 1:
                x[4100 if world > 2 else 4200] = -math.inf
        xs.append(x.to(dtype))
    return xs


def _setup(rank):
    k = import_kernels()
    from megatron_lite.comm.codecs import get_scheme
    fa = k.fused_allreduce
    state = k.backends.make_state(None, max_bytes=16 << 20, oneshot_max_bytes=1 << 20)
    assert state.ws is not None, state.why
    # split the Triton compiles over the ranks (every rank then loads them from the cache)
    fa.prewarm(state.ws, [get_scheme(c).kernel_plan(torch.zeros(1)) for c in CODECS],
               SIZES + [40000, 300000, (4 << 20) + 5])
    return k, state, torch.device("cuda", rank)


def _two_shot_checks(rank, world, k=None, state=None, dev=None):
    """Sections 1-1e: the two-shot kernel's bits against the CPU reference."""
    if k is None:
        k, state, dev = _setup(rank)
    from megatron_lite.comm.codecs import get_scheme
    fa, ws = k.fused_allreduce, state.ws
    res = {"fused": [], "dense": [], "wrapped": [], "status": None}

    # 1. fused two-shot == CPU reference, every codec, odd sizes, three dtypes
    for ci, spec in enumerate(CODECS):
        codec = get_scheme(spec)
        for si, n in enumerate(SIZES):
            for dtype in ((torch.bfloat16, torch.float16, torch.float32) if spec == "int4:128"
                          else (torch.bfloat16,)):
                xs = inputs(world, n, dtype, seed=ci * 10 + si)
                out = fa.two_shot_all_reduce(ws, xs[rank].to(dev), codec.kernel_plan(xs[rank]))
                ref = reference_all_reduce(xs, codec)
                res["fused"].append((spec, n, str(dtype), same_bits(out, ref)))

    # 1c. denser grids (more blocks than SMs: kernels/thresholds.py ``blocks_per_sm``) give
    #     the same bits: forced by the bpsm override, then the table's own choice for an
    #     8 MB message (4 blocks per SM on 2 x H200)
    sms = fa._num_sms(dev)
    for ci, (spec, n, bpsm) in enumerate([("int4:128", (1 << 20) + 3, 4),
                                          ("int8:128", (1 << 20) + 3, 8),
                                          ("int2:128", 300000, 4),
                                          ("int4:128", (4 << 20) + 5, None),
                                          ("bf16", (4 << 20) + 5, None)]):
        codec = get_scheme(spec)
        xs = inputs(world, n, torch.bfloat16, seed=700 + ci, specials=True)
        plan = codec.kernel_plan(xs[rank])
        grid = fa.two_shot_plan(n, world, plan.group, dev, 2 * n, bpsm=bpsm)[3]
        out = fa.two_shot_all_reduce(ws, xs[rank].to(dev), plan, bpsm=bpsm)
        res["dense"].append((spec, n, bpsm, grid, sms,
                             same_bits(out, reference_all_reduce(xs, codec))))

    # 1d. hadamard-/weighted- codecs: the plain codec's kernel with their maps folded in
    #     (FusedTwoShotBackend, kernels/maps.py) == CPU reference
    from megatron_lite.comm.codecs import CodecSpec
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    fused = k.backends.FusedTwoShotBackend(state)
    h = 640
    scale = torch.rand(h, generator=torch.Generator().manual_seed(3)) * 8 + 0.05
    wrapped = [get_scheme("hadamard-int8:128"), get_scheme("hadamard-int4:128"),
               get_scheme("hadamard-int4-int8:64"),
               WeightedScheme(CodecSpec("weighted-int8", 128), scale),
               WeightedScheme(CodecSpec("weighted-hadamard-int4", 128), scale),
               WeightedScheme(CodecSpec("weighted-hadamard-int5", 64), scale)]
    for ci, codec in enumerate(wrapped):
        for rows, dtype in ((1, torch.bfloat16), (7, torch.float32), (3000, torch.bfloat16)):
            xs = [x.view(rows, h) for x in inputs(world, rows * h, dtype, seed=900 + ci * 10 + rows,
                                                  specials=rows == 3000)]
            why = fused.unsupported(xs[rank].to(dev), codec, None)
            out = fused.all_reduce(xs[rank].to(dev), codec, None) if why is None else None
            ok = out is not None and same_bits(out, reference_all_reduce(xs, codec))
            res["wrapped"].append((codec.spec, rows * h, str(dtype), why, ok))

    # 1e. the maps folded into the kernel on a forced dense grid (4 blocks per SM)
    for ci, codec in enumerate((wrapped[0], wrapped[4])):
        xs = [x.view(3000, h) for x in inputs(world, 3000 * h, torch.bfloat16,
                                              seed=950 + ci, specials=True)]
        plan = codec.kernel_plan(xs[rank].to(dev))
        grid = fa.two_shot_plan(3000 * h, world, plan.group, dev, 2 * 3000 * h, True, bpsm=4)[3]
        out = fa.two_shot_all_reduce(ws, xs[rank].to(dev), plan, bpsm=4).view(3000, h)
        res["dense"].append((codec.spec, 3000 * h, 4, grid, sms,
                             same_bits(out, reference_all_reduce(xs, codec))))

    # 1g. grids past what the device holds at once, on the Triton kernel (fp16 messages):
    #     capped at the resident blocks of each compiled variant (its blocks wait for
    #     their peers' blocks of the same index), same bits. Two variants that differ only
    #     in their constexprs (tiles of 2048 and 4096 values: 4 and 8 warps) are queried
    #     apart; the larger message asks for more blocks than its variant holds.
    codec = get_scheme("hadamard-int4:128")
    fa._RESIDENT.clear()
    ws.two_shot_caps.clear()
    res["resident"] = []
    for n in (400000 * world, (8 << 20) + 5):
        xs = inputs(world, n, torch.float16, seed=990 + n % 7, specials=True)
        plan = codec.kernel_plan(xs[rank])
        out = fa.two_shot_all_reduce(ws, xs[rank].to(dev), plan, bpsm=32)
        tile, _, _, planned = fa.two_shot_plan(n, world, plan.group, dev, 2 * n, True, bpsm=32)
        res["resident"].append((n, tile, planned, same_bits(out, reference_all_reduce(xs, codec))))
    res["resident_caps"] = sorted(fa._RESIDENT.values())
    res["workspace_caps"] = sorted(ws.two_shot_caps.values())   # the per-call lookup's
    #     the same messages again (the workspace's lookup hits), and a weighted- codec
    #     on fp16, twice (a new KernelPlan each call, holding the same scale tensors)
    res["resident_again"] = []
    for n in (400000 * world, (8 << 20) + 5):
        xs = inputs(world, n, torch.float16, seed=991 + n % 7, specials=True)
        out = fa.two_shot_all_reduce(ws, xs[rank].to(dev), codec.kernel_plan(xs[rank]),
                                     bpsm=32)
        res["resident_again"].append(same_bits(out, reference_all_reduce(xs, codec)))
    for rep in range(2):
        xs = [x.view(-1, h) for x in inputs(world, 300 * h, torch.float16, seed=992 + rep)]
        out = fa.two_shot_all_reduce(ws, xs[rank].to(dev), wrapped[4].kernel_plan(xs[rank]),
                                     bpsm=32)
        res["resident_again"].append(same_bits(out, reference_all_reduce(xs, wrapped[4])))
    res["workspace_caps_after"] = len(ws.two_shot_caps)

    # 1f. the one-launch one-shot quantized all-reduce (OneShotKernelsBackend's path for
    #     algo=one-shot) == the one-shot algorithm's bits, with each rank's error part
    #     (what error feedback carries), NaN/Inf included; then under CUDA-graph replay
    res["oneshot_q"] = []
    osq = [get_scheme("int4:128"), get_scheme("int8:64"), get_scheme("hadamard-int8:128"),
           get_scheme("hadamard-int5:128"), get_scheme("int6-sym:128"), wrapped[3], wrapped[4],
           wrapped[5]]
    for ci, codec in enumerate(osq):
        for rows in (1, 41, 3000):
            n = rows * h
            xs = [x.view(rows, h) for x in inputs(world, n, torch.bfloat16, seed=980 + ci,
                                                  specials=rows > 1)]
            x = xs[rank].to(dev)
            launch = fa.one_shot_q_launcher(ws, x, codec.kernel_plan(x))
            if launch is None:
                res["oneshot_q"].append((codec.spec, n, "no launch", False))
                continue
            out, err = launch(x, torch.empty_like(x),
                              torch.empty(x.shape, dtype=torch.float32, device=dev))
            want, want_err = reference_one_shot_with_error(xs, codec, rank)
            res["oneshot_q"].append((codec.spec, n, None,
                                     same_bits(out, want) and same_bits(err, want_err)))
    codec, n = osq[6], 300 * h
    static_x = torch.zeros(300, h, dtype=torch.bfloat16, device=dev)
    launch = fa.one_shot_q_launcher(ws, static_x, codec.kernel_plan(static_x))
    o, e = torch.empty_like(static_x), torch.empty(300, h, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        launch(static_x, o, e)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch(static_x, o, e)
    for rep in range(3):
        xs = [x.view(300, h) for x in inputs(world, n, torch.bfloat16, seed=990 + rep)]
        static_x.copy_(xs[rank].to(dev))
        graph.replay()
        torch.cuda.synchronize()
        want, want_err = reference_one_shot_with_error(xs, codec, rank)
        res["oneshot_q"].append((f"{codec.spec} graph", n, None,
                                 same_bits(o, want) and same_bits(e, want_err)))

    torch.cuda.synchronize()
    res["status"] = int(ws.status[0].item())
    return res


def reference_one_shot_with_error(xs, scheme, rank):
    """The one-shot algorithm's sum (comm/algorithms.py) on CPU over simulated ranks, and
    rank ``rank``'s error part as error feedback takes it (fp32, the message's shape)."""
    from megatron_lite.comm.algorithms import Trace, one_shot_all_reduce
    from megatron_lite.comm.simulate import run_simulated

    def body(comm, xs):
        t = Trace()
        y = one_shot_all_reduce(comm, xs[comm.rank], scheme, t)
        return y, t.restore(scheme.own_error(t.chunks, t.acc, comm.rank)).float()
    return run_simulated(body, len(xs), [x.cpu() for x in xs])[rank]


def _one_rank_checks(rank, world, k=None, state=None, dev=None):
    """The two-shot sections, then the one-shot kernel's (also meaningful at one rank:
    the same launch, copy and sum, with one slot)."""
    if k is None:
        k, state, dev = _setup(rank)
    fa, ws = k.fused_allreduce, state.ws
    res = _two_shot_checks(rank, world, k, state, dev)
    res["oneshot"] = []
    # 2. one-shot == fp32 sum in rank order, rounded once
    for n in SIZES[:5] + [1 << 18]:    # 1 MB fp32: the one-shot buffer's size
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            xs = inputs(world, n, dtype, seed=n % 997)
            out = fa.one_shot_all_reduce(ws, xs[rank].to(dev))
            acc = xs[0].float().clone()
            for x in xs[1:]:
                acc += x.float()
            res["oneshot"].append((n, str(dtype), same_bits(out, acc.to(dtype))))
    return res


def _checks(rank, world):
    import torch.distributed as dist
    k, state, dev = _setup(rank)
    from megatron_lite.comm.codecs import get_scheme
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.comm.router import QuantizedCommunicator
    from megatron_lite.comm.spec import parse_comm
    fa, ws = k.fused_allreduce, state.ws
    res = _one_rank_checks(rank, world, k, state, dev)
    res.update(specials=[], graph=[], chain=[])

    # 3. NaN / Inf on some ranks: same bits as the reference, no hang, ranks identical
    for spec in ("int4:128", "int8:128", "bf16", "fp8:128"):
        codec = get_scheme(spec)
        xs = inputs(world, 40000, torch.bfloat16, seed=7, specials=True)
        out = fa.two_shot_all_reduce(ws, xs[rank].to(dev), codec.kernel_plan(xs[rank]))
        ref = reference_all_reduce(xs, codec)
        gathered = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(gathered, out)
        res["specials"].append((spec, same_bits(out, ref), int(torch.isnan(out).sum()),
                                all(same_bits(gathered[0], g) for g in gathered)))
    xs = inputs(world, 40000, torch.bfloat16, seed=8, specials=True)
    out = fa.one_shot_all_reduce(ws, xs[rank].to(dev))
    acc = xs[0].float().clone()
    for x in xs[1:]:
        acc += x.float()
    res["specials"].append(("oneshot", same_bits(out, acc.to(torch.bfloat16)),
                            int(torch.isnan(out).sum()), True))

    # 4. CUDA graph capture and replay (epochs advance on device: replays stay correct)
    int4, bf16 = get_scheme("int4:128"), get_scheme("bf16")
    p4, p16 = int4.kernel_plan(torch.zeros(1)), bf16.kernel_plan(torch.zeros(1))
    n = 300000
    static_x = torch.zeros(n, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fa.one_shot_all_reduce(ws, static_x)
        fa.two_shot_all_reduce(ws, static_x, p4)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o1 = fa.one_shot_all_reduce(ws, static_x)
        o2 = fa.two_shot_all_reduce(ws, static_x, p4)
        o3 = fa.two_shot_all_reduce(ws, static_x, p16)
        o4 = fa.one_shot_all_reduce(ws, static_x)
    for rep in range(3):
        xs = inputs(world, n, torch.bfloat16, seed=50 + rep)
        static_x.copy_(xs[rank].to(dev))
        graph.replay()
        torch.cuda.synchronize()
        acc = xs[0].float().clone()
        for x in xs[1:]:
            acc += x.float()
        res["graph"].append((rep, same_bits(o1, acc.bfloat16()), same_bits(o4, acc.bfloat16()),
                             same_bits(o2, reference_all_reduce(xs, int4)),
                             same_bits(o3, reference_all_reduce(xs, bf16))))
        # eager calls between replays must not disturb the epochs
        fa.two_shot_all_reduce(ws, static_x, p4)

    # 5. the backend chain: auto in front of QuantizedCommunicator
    qc = QuantizedCommunicator(DistCommunicator(), parse_comm("int4:128"))
    table = {"oneshot_max": 64 << 10, "fused_min": {"int4": 1 << 20}}
    k.backends.install_fused(qc, max_bytes=8 << 20, oneshot_max_bytes=1 << 20, table=table)
    site = "layers.0.mlp.down_proj"
    for n, want in ((1000, "oneshot"), (100000, "nccl"), (1 << 20, "fused"), (8 << 20, "nccl")):
        xs = inputs(world, n, torch.bfloat16, seed=n % 101)
        x = xs[rank].to(dev).view(-1, 8) if n % 8 == 0 else xs[rank].to(dev)
        auto = qc.backends[0]
        got_choice = auto.choose(x, qc.sites.scheme_for(site), qc)
        out = qc.all_reduce(x, site)
        if want == "fused":
            ok = same_bits(out.flatten(), reference_all_reduce(xs, int4))
        else:
            acc = xs[0].float().clone()
            for xx in xs[1:]:
                acc += xx.float()
            err = ((out.flatten().float().cpu() - acc).norm() / acc.norm()).item()
            ok = err < 1e-2 and out.shape == x.shape
        res["chain"].append((n, want, got_choice, qc.explain(x, site), ok))
    # path=fused / path=two-step: compressed at every size, always the reference's bits
    res["paths"] = []
    for path, cases in (("fused", ((1000, "fused"), (100000, "fused"), (8 << 20, "portable"))),
                        ("two-step", ((1000, "portable"), (1 << 20, "portable")))):
        qp = QuantizedCommunicator(DistCommunicator(), parse_comm(f"int4:128,path={path}"))
        k.backends.install_fused(qp, max_bytes=8 << 20, oneshot_max_bytes=1 << 20, table=table)
        for n, want in cases:
            xs = inputs(world, n, torch.bfloat16, seed=n % 97)
            x = xs[rank].to(dev)
            choice = qp.backends[0].choose(x, qp.sites.scheme_for(site), qp)
            out = qp.all_reduce(x, site)
            res["paths"].append((path, n, want, choice, qp.explain(x, site),
                                 same_bits(out, reference_all_reduce(xs, int4))))
        res.setdefault("path_status", 0)
        res["path_status"] += int(qp.backends[0].state.ws.status[0].item())
    # algo=one-shot through the chain: the one launch where it fits the recv slots (here
    # 8 MB of bf16, as int4 codes, at W = 2 and 4), else the codec kernels around NCCL
    res["osq_chain"] = []
    qo = QuantizedCommunicator(DistCommunicator(), parse_comm("int4:128,algo=one-shot"))
    k.backends.install_fused(qo, max_bytes=8 << 20, oneshot_max_bytes=1 << 20, table=table)
    for n in (4096, 1 << 20, 16 << 20):
        xs = inputs(world, n, torch.bfloat16, seed=n % 89)
        out = qo.all_reduce(xs[rank].to(dev), site)
        res["osq_chain"].append((n, qo.explain(xs[rank].to(dev), site),
                                 same_bits(out, reference_all_reduce(xs, int4, "one-shot"))))
    torch.cuda.synchronize()
    res["status"] = int(ws.status[0].item()) + int(qc.backends[0].state.ws.status[0].item())
    return res


def results(world):
    # one rank: the two-shot and one-shot sections alone (the chain short-cuts a one-rank
    # sum)
    return run_nccl_once(_one_rank_checks if world == 1 else _checks, world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_two_shot_matches_reference(world):
    for r in results(world):
        bad = [c for c in r["fused"] if not c[3]]
        assert not bad and len(r["fused"]) >= len(CODECS) * len(SIZES), bad
        assert r["status"] == 0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dense_grids_match_reference(world):
    for r in results(world):
        bad = [c for c in r["dense"] if not c[5]]
        assert not bad and len(r["dense"]) == 7, bad
        forced = [c for c in r["dense"] if c[2] is not None]
        assert all(c[3] > c[4] for c in forced), forced      # more blocks than SMs ran
        runs, caps = r["resident"], r["resident_caps"]
        assert all(ok for *_, ok in runs), runs
        assert [t for _, t, _, _ in runs] == [2048, 4096], runs
        # one cap per variant, 1 to 16 blocks of 128 or 256 threads per SM (2048 threads),
        # and the 4096-value tiles' variant holds fewer blocks than the message asks for
        sms = r["dense"][0][4]
        assert len(caps) == 2 and all(sms <= c <= 16 * sms for c in caps), caps
        assert runs[1][2] > min(caps), (runs, caps)
        assert r["workspace_caps"] == caps, (r["workspace_caps"], caps)
        # looked up again: same bits; the weighted- messages add one entry, not two
        assert r["resident_again"] == [True] * 4, r["resident_again"]
        assert r["workspace_caps_after"] == 3, r["workspace_caps_after"]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_one_shot_exact(world):
    for r in results(world):
        bad = [c for c in r["oneshot"] if not c[2]]
        assert not bad, bad


@pytest.mark.parametrize("world", [2, 4])
def test_nan_inf(world):
    for r in results(world):
        for spec, same, nans, identical in r["specials"]:
            assert same and identical and nans > 0, (spec, same, nans, identical)


@pytest.mark.parametrize("world", [2, 4])
def test_cuda_graph_replay(world):
    for r in results(world):
        assert len(r["graph"]) == 3 and all(all(c[1:]) for c in r["graph"]), r["graph"]


@pytest.mark.parametrize("world", [2, 4])
def test_backend_chain_auto(world):
    for r in results(world):
        for n, want, got, why, ok in r["chain"]:
            assert got == want and ok and why.startswith("auto"), (n, want, got, why, ok)
        assert r["status"] == 0


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_wrapped_codecs_match_reference(world):
    for r in results(world):
        bad = [c for c in r["wrapped"] if not c[4]]
        assert not bad and len(r["wrapped"]) == 18, (bad, len(r["wrapped"]))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_one_shot_quantized_matches_one_shot_algorithm(world):
    """The one-launch one-shot quantized kernel (csrc/two_shot.cu) gives the one-shot
    algorithm's sum and each rank's error part bit for bit, eager and graph-replayed."""
    for r in results(world):
        bad = [c for c in r["oneshot_q"] if not c[3]]
        assert not bad and len(r["oneshot_q"]) == 27, (bad, len(r["oneshot_q"]))
        assert r["status"] == 0
        if world > 1:   # through the communicator chain: one launch up to the recv slot
            launches = [("one launch" in why, ok) for n, why, ok in r["osq_chain"]]
            assert launches == [(True, True), (True, True), (False, True)], r["osq_chain"]


@pytest.mark.parametrize("world", [2, 4])
def test_forced_paths_stay_compressed(world):
    """``path=fused`` takes the fused kernel where ``auto`` would send bf16 (one-shot or
    NCCL), and the two-step path beyond the workspace; ``path=two-step`` never uses the
    kernels. Every result is the two-step reference's bits."""
    for r in results(world):
        assert len(r["paths"]) == 5 and r["path_status"] == 0
        for path, n, want, choice, why, ok in r["paths"]:
            backend = "auto" if want == "fused" else "two-step"    # portable: the algorithm
            assert ok and choice == want and why.startswith(backend), (path, n, choice, why)
