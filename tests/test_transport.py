"""The transport and the ``auto`` chooser: detection on real gloo ranks and from what NCCL
ranks report, the ``transport=`` / ``chunk=`` spec items, the per-transport size table,
``explain``, ``auto`` against ``bf16``, and the chunked portable path (bit for bit the
unchunked one, ranks identical) on real gloo ranks and simulated ones."""
import math

import pytest
import torch

from megatron_lite.comm.algorithms import Algo, pieces, quantized_all_reduce
from megatron_lite.comm.build import build_communicator
from megatron_lite.comm.codecs import CodecError, CodecSpec, get_scheme
from megatron_lite.comm.codecs.weighted import WeightedScheme
from megatron_lite.comm.communicator import DistCommunicator
from megatron_lite.comm.simulate import make_thread_communicators, run_simulated
from megatron_lite.comm.spec import DEFAULT_CHUNK_BYTES, parse_comm
from megatron_lite.comm.transport import Transport, classify
from megatron_lite.kernels.thresholds import table_for
from tests._dist import run_distributed

SITE = "layers.0.mlp.down_proj"
H = 384
MiB = 1 << 20


# ----------------------------------------------------------------------------- detection
@pytest.mark.parametrize("backend,hosts,peer,env,want,how", [
    ("gloo", [], None, {}, "socket", "gloo process group"),
    ("nccl", ["a", "a"], True, {}, "nvlink", "CUDA peer access between all 2 GPUs"),
    ("nccl", ["a", "a"], True, {"NCCL_P2P_DISABLE": "1"}, "host-memory", "NCCL_P2P_DISABLE"),
    ("nccl", ["a", "a"], True, {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"},
     "socket", "NCCL_SHM_DISABLE"),
    ("nccl", ["a", "a"], True, {"NCCL_P2P_DISABLE": "0"}, "nvlink", "peer access"),
    ("nccl", ["a", "a"], True, {"NCCL_SHM_DISABLE": "1"}, "nvlink", "peer access"),
    ("nccl", ["a", "a", "a"], False, {}, "host-memory", "no CUDA peer access: GPU 0 cannot"),
    ("nccl", ["a", "a"], False, {"NCCL_SHM_DISABLE": "1"}, "socket", "no CUDA peer access"),
    ("nccl", ["a", "b", "a", "b"], None, {}, "socket", "ranks on 2 hosts"),
])
def test_classify(backend, hosts, peer, env, want, how):
    got = classify(backend, hosts, peer, "GPU 0 cannot access GPU 1", environ=env)
    assert got.transport == Transport(want) and how in got.how, got


def test_classify_agrees_with_the_benchmarks_emulation():
    """--transport in the bench tools sets NCCL variables; detection reads them back."""
    from megatron_lite.lab.benchmark import TRANSPORTS, apply_transport, transport_label
    for name in TRANSPORTS:
        env = {}
        apply_transport(name, env)
        assert classify("nccl", ["h", "h"], True, environ=env).transport.value == name
        assert transport_label("nccl", env) == name


def test_local_transports():
    assert DistCommunicator().transport.transport == Transport.LOCAL     # no process group
    sim = make_thread_communicators(2)[0]
    assert sim.transport.transport == Transport.LOCAL and "simulated" in sim.transport.how


# ----------------------------------------------------------------------------- spec
def test_spec_transport_and_chunk_items():
    s = parse_comm("int4:128,transport=Host-Memory,chunk=1MiB")
    assert s.transport == Transport.HOST_MEMORY and s.chunk_bytes == MiB
    assert str(s) == "int4:128,transport=host-memory,chunk=1048576"
    assert parse_comm(str(s)) == s
    d = parse_comm("int4:128")
    assert d.transport is None and d.chunk_bytes == DEFAULT_CHUNK_BYTES == 4 * MiB
    assert str(d) == "int4:128" and parse_comm("int4,chunk=0").chunk_bytes == 0


@pytest.mark.parametrize("spec,msg", [
    ("int4,transport=pcie", "transport='pcie': expected one of nvlink, host-memory, socket"),
    ("int4,transport=local", "transport='local': expected one of"),
    ("int4,chunk=big", "bad size 'big'"),
])
def test_bad_spec_items(spec, msg):
    with pytest.raises(CodecError) as e:
        parse_comm(spec)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_bad_transport_in_a_tool(capsys):
    from tests.test_calibrate import load_tool
    assert load_tool("bench_allreduce").main(["--comm", "int4,transport=pcie"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --comm 'int4,transport=pcie': transport='pcie': expected one of "
                   "nvlink, host-memory, socket")


# ----------------------------------------------------------------------------- the table
def _choices(table, codec, auto=False):
    sizes = (0, 16 << 10, 512 << 10, (512 << 10) + 1, MiB, 2 * MiB, 2 * MiB + 1, 4 * MiB,
             8 * MiB, 256 * MiB)
    return [table.choose(codec, n, auto) for n in sizes]


def test_table_per_transport():
    h2 = table_for("nvlink", "NVIDIA H200", 2)
    assert h2.measured and "measured, NVIDIA H200 x 2" in h2.source
    # one-shot up to 2 MiB (inclusive), then fused from 1 MiB on: fused right after
    assert _choices(h2, "bf16", auto=True) == ["oneshot"] * 6 + ["fused"] * 4
    assert _choices(h2, "int4") == ["oneshot"] * 6 + ["fused"] * 4
    assert _choices(h2, "hadamard-int4") == ["oneshot"] * 6 + ["nccl"] * 4   # not in fused_min
    h4 = table_for("nvlink", "NVIDIA H200", 4)
    assert _choices(h4, "bf16", auto=True) == ["oneshot"] * 3 + ["nccl"] * 7
    assert _choices(h4, "int4") == ["oneshot"] * 3 + ["nccl"] * 4 + ["fused"] * 3
    assert _choices(h4, "int8") == ["oneshot"] * 3 + ["nccl"] * 2 + ["fused"] * 5
    guess = table_for("nvlink", "NVIDIA L40S", 2)
    assert not guess.measured and "not measured" in guess.source
    assert _choices(guess, "int4") == ["oneshot"] * 2 + ["nccl"] * 6 + ["fused"] * 2
    for t in ("host-memory", "socket", "local"):
        tab = table_for(t, "NVIDIA H200", 2)
        assert not tab.measured and tab.ranges("int4") == ((0, None, "portable"),)
        assert _choices(tab, "bf16", auto=True) == ["nccl"] * 10
        assert _choices(tab, "int4") == _choices(tab, "bf16") == ["portable"] * 10
        assert tab.explain("bf16", MiB, auto=True).startswith(
            f"{t} unmeasured (") and "falls back to the group's own all-reduce" in \
            tab.explain("bf16", MiB, auto=True)
        assert "falls back to the portable path" in tab.explain("int4", MiB)
    # the ranges of every table cover all sizes once, in order
    for tab in (h2, h4, guess, table_for("socket", "cpu", 2)):
        for codec, auto in (("int4", False), ("bf16", True), ("int2", False)):
            r = tab.ranges(codec, auto)
            assert r[0][0] == 0 and r[-1][1] is None
            assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(r, r[1:])), r
    assert h2.explain("int4", 4 * MiB).endswith(": above 2 MiB -> the fused two-shot kernel")
    assert h4.explain("int4", MiB).endswith(": above 512 KiB below 4 MiB -> the group's own "
                                           "all-reduce")
    assert h4.explain("int4", 100).endswith(": up to 512 KiB -> the one-shot bf16 kernel")


# ----------------------------------------------------------------------------- gloo ranks
def _gloo_body(rank, world):
    torch.manual_seed(0)
    base = DistCommunicator()
    out = {"transport": (base.transport.transport.value, base.transport.how),
           "native_explain": base.explain(torch.zeros(4))}
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(6, H, generator=g) * 3
    # auto: the group's own all-reduce (socket is unmeasured); bf16: the portable two-step
    auto, bf16 = build_communicator(base, "auto"), build_communicator(base, "bf16")
    native = x.clone()
    torch.distributed.all_reduce(native)
    out["auto"] = (auto.all_reduce(x, SITE), auto.explain(x, SITE))
    out["bf16"] = (bf16.all_reduce(x, SITE), bf16.explain(x, SITE))
    out["bf16_ref"] = quantized_all_reduce(base, x, get_scheme("bf16"))
    out["native"] = native
    forced = build_communicator(base, "int4:128,transport=host-memory")
    out["forced"] = forced.explain(x, SITE)
    # chunked == unchunked, bit for bit: group, two-stage, rotated, weighted, fp8, bf16,
    # odd lengths (padded chunks), a NaN and an Inf on some ranks, both algorithms
    weighted = WeightedScheme(CodecSpec("weighted-hadamard-int4", 64),
                              torch.linspace(0.5, 2.0, H))
    cases = []
    for name, scheme in (("int4:128", get_scheme("int4:128")),
                         ("int4-int8:64", get_scheme("int4-int8:64")),
                         ("hadamard-int8:128", get_scheme("hadamard-int8:128")),
                         ("fp8:32", get_scheme("fp8:32")), ("bf16", get_scheme("bf16")),
                         ("weighted", weighted)):
        for algo in (Algo.TWO_STEP, Algo.ONE_SHOT):
            if algo == Algo.ONE_SHOT and scheme.traits.two_stage:
                continue
            for shape, chunk in (((40, H), 4096), ((40, H), 10000), ((7, H), 1000),
                                 ((3, 333), 700)):
                if name == "weighted" and shape[-1] != H:
                    continue
                y = torch.randn(shape, generator=g).to(torch.bfloat16)
                if rank == world - 1:
                    y[1, 5], y[2, 7] = math.nan, math.inf
                whole = quantized_all_reduce(base, y, scheme, algo)
                parts = quantized_all_reduce(base, y, scheme, algo, chunk_bytes=chunk)
                c = scheme.chunk(y, world)[0].shape[-1]
                cases.append((name, algo.value, shape, chunk,
                              len(pieces(scheme, c, y.numel() * 2, chunk)),
                              torch.equal(whole.view(torch.int16), parts.view(torch.int16)),
                              parts))
    out["cases"] = cases
    # the spec's chunk item on the communicator: same bits as chunk=0
    y = torch.randn(40, H, generator=g)
    a = build_communicator(base, "int4:128,chunk=4KiB")
    b = build_communicator(base, "int4:128,chunk=0")
    out["spec_chunk"] = (torch.equal(a.all_reduce(y, SITE), b.all_reduce(y, SITE)),
                         a.explain(y, SITE))
    return out


@pytest.fixture(scope="module", params=[2, 4])
def gloo(request):
    return request.param, run_distributed(_gloo_body, request.param)


def test_gloo_detection_and_explain(gloo):
    world, res = gloo
    for r in res:
        assert r["transport"][0] == "socket" and "gloo process group" in r["transport"][1]
        assert r["native_explain"].startswith("native (DistCommunicator); transport socket")
        assert r["forced"].startswith("two-step with int4:128; transport host-memory "
                                      "(--comm transport=host-memory; detected socket (gloo")
        assert "host-memory unmeasured" in r["forced"]


def test_gloo_auto_is_native_and_bf16_is_the_two_step(gloo):
    world, res = gloo
    r0 = res[0]
    auto_y, auto_why = r0["auto"]
    bf16_y, bf16_why = r0["bf16"]
    assert auto_why.startswith("auto -> native; transport socket (gloo")
    assert "socket unmeasured" in auto_why and \
        "falls back to the group's own all-reduce" in auto_why
    assert bf16_why.startswith("two-step with bf16; transport socket")
    assert "falls back to the portable path" in bf16_why
    assert torch.equal(auto_y, r0["native"])            # fp32 in, the gloo fp32 sum out
    assert torch.equal(bf16_y, r0["bf16_ref"])          # the two-step reference
    assert auto_y.dtype == bf16_y.dtype == torch.float32
    assert not torch.equal(auto_y, bf16_y)              # bf16 on the wire rounds the sum
    assert (auto_y - bf16_y).abs().max() <= auto_y.abs().max() * 2 ** -6
    for r in res:
        assert torch.equal(r["auto"][0], auto_y) and torch.equal(r["bf16"][0], bf16_y)


def test_gloo_chunked_equals_unchunked(gloo):
    world, res = gloo
    cases = res[0]["cases"]
    assert len(cases) == 9 * 4 + 2 * 3        # (scheme, algorithm) x shapes
    assert all(c[5] for c in cases), [c[:5] for c in cases if not c[5]]
    assert sum(c[4] > 1 for c in cases) >= len(cases) - 2, [c[:5] for c in cases]
    for r in res:          # every rank holds the same bits
        for mine, first in zip(r["cases"], cases):
            assert torch.equal(mine[6].view(torch.int16), first[6].view(torch.int16)), mine[:5]
    same, why = res[0]["spec_chunk"]
    assert same and why.startswith("two-step in pieces of 4096 B with int4:128")


# ----------------------------------------------------------------------------- threads
def test_chunked_error_feedback_and_whole_schemes():
    """Error feedback's trace is assembled from the pieces (same debt, same sums); a scheme
    whose codes depend on the position in a chunk runs whole."""
    x = torch.randn(3, 4, 40, 256)

    def body(comm, spec):
        c = build_communicator(comm, spec)
        return [c.all_reduce(x[i, comm.rank], SITE) for i in range(3)], c.debt
    for algo in ("", ",algo=one-shot"):
        a = run_simulated(body, 4, f"ef+int4:128,chunk=4KiB{algo}")
        b = run_simulated(body, 4, f"ef+int4:128,chunk=0{algo}")
        for (ya, da), (yb, db) in zip(a, b):
            assert all(torch.equal(u, v) for u, v in zip(ya, yb)) and torch.equal(da, db)
    assert get_scheme("int4:128").piece_quantum() == 128
    # static per-channel steps (outlier-int4) and per-rank transforms (klt): no quantum
    from megatron_lite.comm.codecs.base import Scheme
    from megatron_lite.comm.codecs.klt import TransformScheme
    from megatron_lite.comm.codecs.outlier import OutlierScheme
    assert OutlierScheme.piece_quantum is TransformScheme.piece_quantum is Scheme.piece_quantum
    assert Scheme.piece_quantum(get_scheme("int4:128")) is None
    # 8 MiB in 1 MiB pieces: 8 ranges of whole groups (bf16: one value per group)
    assert pieces(get_scheme("bf16"), 1000, 8 * MiB, MiB) == [
        (a, min(a + 125, 1000)) for a in range(0, 1000, 125)]
    assert pieces(get_scheme("int4:128"), 1024, 8 * MiB, 3 * MiB) == [(0, 384), (384, 768),
                                                                       (768, 1024)]
    assert pieces(get_scheme("int4:128"), 1024, MiB, MiB) == [(0, 1024)]      # fits
    assert pieces(get_scheme("int4:128"), 1024, 8 * MiB, 0) == [(0, 1024)]    # chunk=0
