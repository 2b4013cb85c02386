"""GPU: the transport an NCCL group detects (peer access; the NCCL variables that
``--transport`` sets), ``auto`` against ``bf16`` there, and the chunked portable path over
NCCL's asynchronous exchanges: bit for bit the unchunked path, ranks identical, and the
same bits when captured in a CUDA graph and replayed. Also times chunked against whole
(printed, not asserted: one run is no measurement for the size table)."""
import pytest
import torch

from tests.gpu._harness import gpu_count, needs_cuda, run_nccl, same_bits

pytestmark = [pytest.mark.gpu, needs_cuda,
              pytest.mark.skipif(gpu_count() < 2, reason="needs 2 GPUs")]

SITE = "layers.0.mlp.down_proj"
CHUNK = 2 << 20


def _body(rank, world):
    from megatron_lite.comm.algorithms import quantized_all_reduce
    from megatron_lite.comm.build import build_communicator
    from megatron_lite.comm.codecs import get_scheme
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.lab.bench_comm import capture_graph, time_call
    dev = torch.device("cuda", rank)
    base = DistCommunicator()
    out = {"transport": base.transport.transport.value, "how": base.transport.how}
    g = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(4096, 2048, generator=g).bfloat16().to(dev)          # 16 MiB
    if rank == 0:
        x[3, 17] = float("nan")                    # a NaN group on one rank
    cases = []
    for spec in ("int4:128", "hadamard-int8:128", "fp8:128", "int4-int8:128", "bf16"):
        scheme = get_scheme(spec)
        for algo in ("two-step", "one-shot"):
            if algo == "one-shot" and scheme.traits.two_stage:
                continue
            whole = quantized_all_reduce(base, x, scheme, algo)
            parts = quantized_all_reduce(base, x, scheme, algo, chunk_bytes=CHUNK)
            cases.append((spec, algo, same_bits(whole, parts),
                          int(parts.float().nan_to_num().sum().item() * 1000)))
    out["cases"] = cases
    qc = build_communicator(base, f"int4:128,path=two-step,chunk={CHUNK}")
    static = x.clone()
    eager = qc.all_reduce(static, SITE)
    holder = {}
    graph = capture_graph(lambda: holder.__setitem__("y", qc.all_reduce(static, SITE)), 1)
    graph.replay()
    torch.cuda.synchronize()
    out["graph"] = same_bits(holder["y"], eager)
    static.copy_(x * 3)
    graph.replay()
    again = qc.all_reduce(x * 3, SITE)
    torch.cuda.synchronize()
    out["graph_new_input"] = same_bits(holder["y"], again)
    out["explain"] = {s: build_communicator(base, s).explain(x, SITE)
                      for s in ("auto", "bf16", "int4:128", f"int4:128,chunk={CHUNK}")}
    big = torch.randn(16384, 2048, generator=g).bfloat16().to(dev)       # 64 MiB
    out["us"] = {}
    for spec in ("native", "int4:128,path=two-step,chunk=0",
                 "int4:128,path=two-step,chunk=4MiB", "int4:128,path=two-step,chunk=16MiB"):
        c = build_communicator(base, spec)
        us, _ = time_call(lambda c=c: c.all_reduce(big, SITE), big.numel() * 2, 10, 2,
                          0, 1, dev)
        out["us"][spec] = round(us, 1)
    return out


@pytest.mark.parametrize("emulate,want", [(None, "nvlink"), ("host-memory", "host-memory"),
                                          ("socket", "socket")])
def test_transport_and_chunked_path_over_nccl(emulate, want, monkeypatch):
    from megatron_lite.lab.benchmark import TRANSPORTS
    for key in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in TRANSPORTS.get(emulate, {}).items():
        monkeypatch.setenv(key, value)           # the spawned ranks inherit it
    res = run_nccl(_body, 2)
    r0 = res[0]
    print(want, r0["how"], r0["us"])
    for r in res:
        assert r["transport"] == want, r["how"]
        assert all(c[2] for c in r["cases"]), r["cases"]
        assert r["graph"] and r["graph_new_input"]
        assert [c[3] for c in r["cases"]] == [c[3] for c in r0["cases"]]
    ex = r0["explain"]
    assert all(f"; transport {want} (" in e for e in ex.values()), ex
    if want == "nvlink":
        assert ex["auto"].startswith("auto -> ")
        assert "nvlink table (measured, NVIDIA H200 x 2)" in ex["auto"]
    else:
        assert ex["auto"].startswith(f"auto -> native; transport {want}")
        assert f"{want} unmeasured" in ex["auto"]
        assert ex["bf16"].startswith("two-step with bf16")
        assert ex["int4:128"].startswith("two-step in pieces of 4194304 B with int4:128")
        assert ex[f"int4:128,chunk={CHUNK}"].startswith(f"two-step in pieces of {CHUNK} B")
