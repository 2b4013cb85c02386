"""CPU tests of the Triton kernels under the interpreter (``TRITON_INTERPRET=1``).

Triton reads that variable when a kernel is decorated, so the checks run in a child
process started with it set (another test module may already have imported the kernels
in compiled mode). The child prints JSON; the assertions are made here.

* quantize / dequantize(+sum): every codec against the reference, bit for bit, on data
  with NaN, Inf, fp32 beyond bf16, denormals, zero and constant groups; for the two-plane
  codes (int3, int5) also with the hadamard- rotation and the error part;
* the fused one-shot and two-shot all-reduce kernels, run by real gloo processes over a
  /dev/shm stand-in for symmetric memory (peers' flags and data really cross processes):
  bit for bit equal to ``two_step_all_reduce``, ranks identical, at world sizes 2 and 3;
* the ``auto`` backend in front of a QuantizedCommunicator.
"""
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("triton")


def _run_child(check: str, timeout: float = 900, **variant):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **variant)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), check], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- child side
def _kernels():
    from megatron_lite.comm import fused as backends
    from megatron_lite.kernels import fused_allreduce, maps, quant, workspace
    return types.SimpleNamespace(backends=backends, fused_allreduce=fused_allreduce,
                                 maps=maps, quant=quant, workspace=workspace)


def _same(a, b):
    na, nb = torch.isnan(a), torch.isnan(b)
    if a.shape != b.shape or not torch.equal(na, nb):
        return False
    iv = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a[~na].contiguous().view(iv), b[~nb].contiguous().view(iv))


def _hostile(rows, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * torch.logspace(-20, 20, rows)[:, None]
    x[0, :64] = 0.0
    x[0, 64:192] = -1.25
    x[1, 3] = math.nan
    x[1, n // 2] = math.inf
    x[2, :96] = torch.randn(96, generator=g) * 1e-41
    x[2, 100] = 3.3e38
    x[3, 9] = 3.4e38 if dtype == torch.float32 else -3.3e38
    return x.to(dtype)


def child_quant():
    k = _kernels()
    from megatron_lite.comm.codecs import get_codec
    out = []
    for spec in ["bf16", "int8:128", "int8:32", "int5:128", "int5:32", "int4:128", "int4:64",
                 "int4-sym:32", "int6-sym:128", "int6-sym:32", "int3:128", "int3:32", "int2:256", "fp8:128", "fp8:32"]:
        codec = get_codec(spec)
        g = getattr(codec, "group_size", 1)
        for dtype in (torch.float32, torch.bfloat16):
            n = 2048 + 3 * max(g, 32)
            x = _hostile(5, n, dtype, seed=len(out))
            kc = codec.kernel_codec()
            ref = codec.encode(x)
            got = k.quant.quantize(kc, x)
            if spec == "bf16":
                enc = _same(ref.view(torch.bfloat16), got.view(torch.bfloat16))
            else:
                npay = n * codec.bits // 8
                enc = (torch.equal(ref[:, :npay], got[:, :npay])
                       and _same(ref[:, npay:].contiguous().view(torch.bfloat16),
                                 got[:, npay:].contiguous().view(torch.bfloat16)))
            dec = all(_same(codec.decode(ref, n, od), k.quant.dequantize(kc, ref, n, od))
                      for od in (torch.float32, torch.bfloat16))
            parts = codec.decode(ref, n, torch.float32)
            acc = parts[0].clone()
            for r in range(1, parts.shape[0]):
                acc += parts[r]
            summed = _same(acc, k.quant.dequantize(kc, ref, n, torch.float32, sum_rows=True))
            out.append([spec, str(dtype), enc, dec, summed])
    # the two-plane codes with the hadamard- rotation folded in (quantize, dequantize,
    # dequantize-and-sum) and the error part, plain and rotated
    from megatron_lite.comm.codecs.hadamard import fwht
    for spec in ("int5:128", "int5:32", "int3:64"):
        codec = get_codec(spec)
        kc, g = codec.kernel_codec(), codec.group_size
        n = 2048 + 3 * g
        x = _hostile(5, n, torch.bfloat16, seed=len(out))
        for rot in (None, g):
            xr = fwht(x.float(), g) if rot else x
            ref = codec.encode(xr)
            got = k.quant.quantize(kc, x, rot=rot)
            npay = n * codec.bits // 8
            enc = (torch.equal(ref[:, :npay], got[:, :npay])
                   and _same(ref[:, npay:].contiguous().view(torch.bfloat16),
                             got[:, npay:].contiguous().view(torch.bfloat16)))
            dec = codec.decode(ref, n, torch.float32)
            acc = dec[0].clone()
            for r in range(1, dec.shape[0]):
                acc += dec[r]
            err = dec - xr.float()
            if rot:
                dec, acc, err = fwht(dec, g), fwht(acc, g), fwht(err, g)
            err = torch.nan_to_num(err, 0.0, 0.0, 0.0)
            ok = [enc, _same(dec, k.quant.dequantize(kc, ref, n, torch.float32, rot=rot)),
                  _same(acc, k.quant.dequantize(kc, ref, n, torch.float32, sum_rows=True,
                                                rot=rot)),
                  _same(err, k.quant.error_part(kc, x, ref, rot=rot))]
            out.append([f"{spec},rot={rot}", "error part"] + ok)
    return out


def _dist_body(rank, world, specs, sizes):
    k = _kernels()
    from megatron_lite.comm.algorithms import Algo, quantized_all_reduce, two_step_all_reduce
    from megatron_lite.comm.codecs import get_scheme
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.comm.router import QuantizedCommunicator
    from megatron_lite.comm.spec import parse_comm
    fa = k.fused_allreduce
    state = k.backends.make_state(None, max_bytes=1 << 18, oneshot_max_bytes=1 << 14,
                                  cpu_shm=True)
    ws, base, res = state.ws, DistCommunicator(), []
    for i, spec in enumerate(specs):
        codec = get_scheme(spec)
        for n in sizes:
            g = torch.Generator().manual_seed(1000 * i + 17 * n + rank)
            x = (torch.randn(n, generator=g) * (rank + 1)).to(torch.bfloat16)
            if n > 600 and rank == world - 1:
                x[300] = math.nan
            got = fa.two_shot_all_reduce(ws, x, codec.kernel_plan(x))
            want = two_step_all_reduce(base, x, codec)
            res.append(["two-shot", spec, n, _same(got, want), int(got.view(torch.int16).sum())])
    # an input and an output off a 16-byte boundary: moved to aligned memory around the
    # launch (the compiled variant, and with it the grid, must not differ between ranks)
    codec = get_scheme("int8:64")
    g = torch.Generator().manual_seed(4242 + rank)
    x = (torch.randn(1001, generator=g) * (rank + 1)).to(torch.bfloat16)[1:]
    out = torch.zeros(1001, dtype=torch.bfloat16)[1:]
    assert x.data_ptr() % 16 and out.data_ptr() % 16
    got = fa.two_shot_all_reduce(ws, x, codec.kernel_plan(x), out=out)
    res.append(["two-shot", "int8:64, unaligned views", 1000,
                got.data_ptr() == out.data_ptr() and _same(out, two_step_all_reduce(base, x, codec)),
                int(out.view(torch.int16).sum())])
    # hadamard-/weighted- codecs: the plain codec's kernel with their maps folded in
    # (Scheme.kernel_plan, kernels/maps.py), against the two-step reference.
    from megatron_lite.comm.codecs import CodecSpec
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    fused = k.backends.FusedTwoShotBackend(state)
    h = 192
    scale = torch.rand(h, generator=torch.Generator().manual_seed(5)) * 8 + 0.05
    wrapped = [get_scheme("hadamard-int8:64"), get_scheme("hadamard-int4:128"),
               WeightedScheme(CodecSpec("weighted-int8", 64), scale),
               WeightedScheme(CodecSpec("weighted-hadamard-int4", 64), scale),
               WeightedScheme(CodecSpec("weighted-hadamard-int5", 64), scale)]
    for i, codec in enumerate(wrapped):
        for rows, dtype in ((1, torch.bfloat16), (7, torch.float32), (12, torch.float16),
                           (30, torch.bfloat16)):
            g = torch.Generator().manual_seed(97 * i + rows + rank)
            x = (torch.randn(rows, h, generator=g) * (rank + 1) * 3).to(dtype)
            if rows == 30 and rank == 0:
                x[3, 10] = math.nan
            if rows == 30 and rank == world - 1:
                x[20, 150] = -math.inf
            assert k.backends.no_kernel(codec, x) is None
            assert fused.unsupported(x, codec, None) is None
            got = fused.all_reduce(x, codec, None)
            want = two_step_all_reduce(base, x, codec)
            res.append(["two-shot", codec.spec, rows * h,
                        got.dtype == x.dtype and got.shape == x.shape and _same(got, want),
                        int(got.to(torch.bfloat16).view(torch.int16).sum())])
    for n in (1, 700, 5000):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n + rank)).to(torch.bfloat16)
        xs = [torch.empty_like(x) for _ in range(world)]
        torch.distributed.all_gather(xs, x)
        acc = xs[0].float()
        for other in xs[1:]:                   # fp32, rank order, one rounding at the end
            acc = acc + other.float()
        got = fa.one_shot_all_reduce(ws, x)
        res.append(["one-shot", "bf16", n, _same(got, acc.to(torch.bfloat16)),
                    int(got.view(torch.int16).sum())])
    # auto in front of the two-step chain (tables given: the CPU has none measured)
    qc = QuantizedCommunicator(base, parse_comm("int4:128"))
    auto = k.backends.install_fused(qc, max_bytes=1 << 18, oneshot_max_bytes=1 << 14,
                                    table={"oneshot_max": 4096, "fused_min": {"int4": 20000}},
                                    cpu_shm=True)
    for n, want in ((1000, "oneshot"), (5000, "nccl"), (30000, "fused")):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n * 3 + rank)).to(torch.bfloat16)
        choice = auto.choose(x, qc.sites.scheme_for("layers.0.mlp.down_proj"), qc)
        got = qc.all_reduce(x, "layers.0.mlp.down_proj")
        acc = x.float()
        torch.distributed.all_reduce(acc)
        err = ((got.float() - acc).norm() / acc.norm()).item()
        if want == "fused":   # quantized: must be the two-step result, bit for bit
            ok = _same(got, two_step_all_reduce(base, x, get_scheme("int4:128")))
        else:                 # bf16 paths: one rounding of the exact sum
            ok = err < 1e-2
        res.append(["auto", want, n, choice == want and ok, round(err, 5)])
    # path=fused: the fused kernel where auto would send bf16 (one-shot, NCCL) or where it
    # would pick it anyway; beyond the workspace, the portable two-step path. Both give
    # the two-step reference's bits. path=two-step: always the portable path.
    site, ref = "layers.0.mlp.down_proj", get_scheme("int4:128")
    # algo=one-shot: no fused kernel runs it, so auto steps aside on every path and size
    # (path=fused is refused with it); path=two-step keeps the portable one-shot path.
    for path, algo, cases in (("fused", "two-step", ((1000, "fused"), (5000, "fused"),
                                                     (30000, "fused"), (200000, "portable"))),
                              ("two-step", "two-step", ((1000, "portable"), (30000, "portable"))),
                              ("two-step", "one-shot", ((1000, "portable"), (30000, "portable"))),
                              ("auto", "one-shot", ((1000, "portable"), (30000, "portable")))):
        qp = QuantizedCommunicator(base, parse_comm(f"int4:128,path={path},algo={algo}"))
        auto_p = k.backends.install_fused(qp, max_bytes=1 << 18, oneshot_max_bytes=1 << 14,
                                          table={"oneshot_max": 4096,
                                                 "fused_min": {"int4": 20000}}, cpu_shm=True)
        for n, want in cases:
            x = torch.randn(n, generator=torch.Generator().manual_seed(n * 5 + rank)
                            ).to(torch.bfloat16)
            choice = auto_p.choose(x, qp.sites.scheme_for(site), qp)
            why = auto_p.unsupported(x, qp.sites.scheme_for(site), qp)
            got = qp.all_reduce(x, site)
            ok = (choice == want and (why is None) == (want == "fused")
                  and _same(got, quantized_all_reduce(base, x, ref, algo)))
            if algo != "two-step":   # auto steps aside; the one-shot kernels take it
                ok = (ok and why.startswith(f"algo={algo}: no fused kernel")   # unless
                      and qp.explain(x, site).split("; transport ")[0] == ("one-shot" if path == "two-step"  # forced
                                                  else "one-shot-kernels") + " with int4:128")
            res.append(["auto", f"path={path},algo={algo}:{want}", n, ok, why or ""])
        auto_p.state.ws.check()
    # algo=one-shot with the quantize / dequantize-and-sum kernels around the all-gather:
    # the one-shot reference's bits, for plain and rotated codecs, odd lengths included.
    for spec in ("int4:128", "hadamard-int4:64", "int3:64", "hadamard-int5:64", "fp8:128"):
        q1 = QuantizedCommunicator(base, parse_comm(f"{spec},algo=one-shot"))
        k.backends.install_fused(q1, max_bytes=1 << 18, oneshot_max_bytes=1 << 14,
                                 table={"oneshot_max": 4096, "fused_min": {"*": 0}},
                                 cpu_shm=True)
        for n in (1, 777, 5000):
            x = torch.randn(n, generator=torch.Generator().manual_seed(n * 7 + rank)
                            ).to(torch.bfloat16)
            why = q1.explain(x, site).split("; transport ")[0]
            got = q1.all_reduce(x, site)
            want = quantized_all_reduce(base, x, get_scheme(spec), Algo.ONE_SHOT)
            res.append(["one-shot-k", spec, n,
                        why == f"one-shot-kernels with {spec}" and _same(got, want),
                        int(got.view(torch.int16).sum())])
        # in pieces (each all-gather started before the next piece is quantized): the
        # same sum and error part as the whole message; a NaN on one rank
        x = torch.randn(5000, generator=torch.Generator().manual_seed(11 + rank)).to(
            torch.bfloat16)
        if rank == 0:
            x[4000] = math.nan
        whole = k.backends.one_shot_kernels_all_reduce(base, x, get_scheme(spec), True)
        parts = k.backends.one_shot_kernels_all_reduce(base, x, get_scheme(spec), True,
                                                       chunk_bytes=2048)
        want = quantized_all_reduce(base, x, get_scheme(spec), Algo.ONE_SHOT)
        res.append(["one-shot-k", spec + ",chunk=2048", 5000,
                    _same(parts[0], want) and _same(parts[0], whole[0])
                    and _same(parts[1], whole[1]), int(parts[0].view(torch.int16).sum())])
        # error feedback through the kernels (sum and error part in one call) gives the
        # portable feedback's bits over three chained reduces behind post norms
        from megatron_lite.comm.feedback import ErrorFeedbackCommunicator
        gains = {f"layers.{i}.mlp.down_proj": (torch.rand(128, generator=torch.Generator()
                                                          .manual_seed(i)) * 3, 1e-6)
                 for i in range(3)}
        ef_k = ErrorFeedbackCommunicator(q1, gains)
        ef_p = ErrorFeedbackCommunicator(QuantizedCommunicator(
            base, parse_comm(f"{spec},algo=one-shot")), gains)
        ok = ef_k.explain(torch.zeros(3, 128), "layers.0.mlp.down_proj").split("; transport ")[0] == \
            f"error feedback, one-shot-kernels with {spec}"
        for i in range(3):
            x = torch.randn(3, 128, generator=torch.Generator().manual_seed(50 * i + rank))
            if i == 1 and rank == 0:
                x[0, 5] = math.nan        # a non-finite group: its error part books as 0
            y = ef_k.all_reduce(x, f"layers.{i}.mlp.down_proj")
            y_p = ef_p.all_reduce(x, f"layers.{i}.mlp.down_proj")   # every rank, always
            ok = ok and _same(y, y_p)
        # (the debts are per rank; the sums are the same on every rank)
        res.append(["one-shot-k", "ef+" + spec, 3, ok and _same(ef_k.debt, ef_p.debt),
                    int(y.view(torch.int32).sum())])
    # a weighted- scheme through the one-shot kernels (the scaling a torch multiply around
    # them), sum and error part against the portable one-shot path and its own_error
    from megatron_lite.comm.algorithms import Trace
    wsch = WeightedScheme(CodecSpec("weighted-hadamard-int5", 64), scale)
    for rows in (1, 7):
        x = (torch.randn(rows, h, generator=torch.Generator().manual_seed(rows + rank))
             * 3).to(torch.bfloat16)
        y, err = k.backends.one_shot_kernels_all_reduce(base, x, wsch, with_error=True)
        trace = Trace()
        want = quantized_all_reduce(base, x, wsch, Algo.ONE_SHOT, trace)
        want_err = trace.restore(wsch.own_error(trace.chunks, trace.acc, rank)).float()
        res.append(["one-shot-k", "ef+" + wsch.spec, rows * h,
                    _same(y, want) and _same(err, want_err), int(y.view(torch.int16).sum())])
    ws.check()
    return res


def child_fused(world: int, specs, sizes):
    from tests._dist import run_distributed
    return run_distributed(_dist_body, world, specs, sizes)


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "quant":
        result = child_quant()
    elif what == "fused2":
        result = child_fused(2, ["int4:128", "int8:32", "bf16", "int4-int8:128", "int3:64",
                                 "int5:64", "fp8:128", "int2:128", "int4-sym:256", "int6-sym:64"],
                             [1, 777, 9000])
    else:
        result = child_fused(3, ["int4:128", "fp8:64", "int5:128"], [5, 20000])
    print(json.dumps(result))


# ----------------------------------------------------------------------------- tests
def test_quant_kernels_match_reference_bitwise():
    rows = _run_child("quant")
    assert len(rows) == 30 + 6
    bad = [r for r in rows if not all(r[2:])]
    assert not bad, bad


@pytest.mark.parametrize("check,world", [("fused2", 2), ("fused3", 3)])
def test_fused_allreduce_over_shared_memory(check, world):
    ranks = _run_child(check)
    assert len(ranks) == world
    for rows in ranks:
        bad = [r for r in rows if not r[3]]
        assert not bad, bad
    # every rank holds the same bits (checksums of its outputs)
    sums = [[r[4] for r in rows if r[0] != "auto"] for rows in ranks]
    assert all(s == sums[0] for s in sums[1:]), sums
    kinds = {r[0] for r in ranks[0]}
    assert kinds == {"two-shot", "one-shot", "auto", "one-shot-k"}


def test_one_shot_grid_covers_the_largest_message_and_stays_resident():
    """The one-shot bf16 kernel's blocks wait at a barrier, so its grid stays at most
    ONESHOT_MAX_BLOCKS (what the GPUs hold at once) whatever MAX_BLOCKS allows the two-shot
    grid; a workspace asking for larger one-shot messages than that grid covers is refused
    with a one-line error instead of leaving their tail unwritten."""
    _kernels()
    from megatron_lite.kernels import fused_allreduce as fa
    from megatron_lite.kernels import workspace as wsm
    most = wsm.ONESHOT_MAX_BYTES
    assert most == wsm.ONESHOT_MAX_BLOCKS * wsm.ONESHOT_BLOCK_ELEMS * 2 == 8 << 20
    assert wsm.MAX_BLOCKS > wsm.ONESHOT_MAX_BLOCKS
    with pytest.raises(ValueError, match="one-shot kernel takes at most 8388608 B"):
        wsm.WorkspaceLayout.make(2, 64 << 20, most + 2)
    cpu = torch.device("cpu")
    for nbytes in (16, 1 << 20, most):
        lay = wsm.WorkspaceLayout.make(2, 64 << 20, nbytes)
        ws = types.SimpleNamespace(layout=lay)
        grid = fa.one_shot_grid(ws, cpu)
        assert grid <= wsm.ONESHOT_MAX_BLOCKS
        n = nbytes // 2                                          # bf16 values
        assert grid * fa.one_shot_block(n, cpu) >= n             # every value has a block
    # the cap holds on its own too (a layout built around make's check)
    huge = types.SimpleNamespace(layout=types.SimpleNamespace(oneshot_max_bytes=64 << 20))
    assert fa.one_shot_grid(huge, cpu) == wsm.ONESHOT_MAX_BLOCKS


def test_two_shot_grid_density_follows_the_measured_table(monkeypatch):
    # The two-shot grid's blocks per SM come from kernels/thresholds.py by message size
    # (4 from 8 MB up on 2 x H200, 1 elsewhere); MEGATRON_LITE_BLOCKS_PER_SM overrides.
    _kernels()                                                     # import path of a checkout
    from megatron_lite.kernels import fused_allreduce as fa
    from megatron_lite.kernels.thresholds import blocks_per_sm
    assert blocks_per_sm("NVIDIA H200", 2, (8 << 20) - 1) == 1
    assert blocks_per_sm("NVIDIA H200", 2, 8 << 20) == 4
    assert blocks_per_sm("NVIDIA H200", 2, 8 << 20, mapped=True) == 1   # maps: from 16 MB
    assert blocks_per_sm("NVIDIA H200", 2, 16 << 20, mapped=True) == 4
    assert blocks_per_sm("NVIDIA H200", 4, 256 << 20) == 1      # not measured: 1
    assert blocks_per_sm("NVIDIA H100 80GB HBM3", 2, 256 << 20) == 1
    from megatron_lite.kernels.config import kernel_config
    monkeypatch.delenv("MEGATRON_LITE_BLOCKS_PER_SM", raising=False)
    kernel_config.cache_clear()
    monkeypatch.setattr(fa, "_device_name", lambda device: "NVIDIA H200")
    fa.two_shot_plan.cache_clear()      # cached per process, as the knob and the GPU kind
    cpu, sms = torch.device("cpu"), fa._num_sms(torch.device("cpu"))
    big, small = 8 << 20, 4 << 20                                 # bf16 bytes
    plan = fa.two_shot_plan(big // 2, 2, 128, cpu, big)
    assert plan[2] >= 4 * sms and plan[3] == 4 * sms
    assert fa.two_shot_plan(small // 2, 2, 128, cpu, small)[3] == sms
    assert fa.two_shot_plan(big // 2, 2, 128, cpu, big, mapped=True)[3] == sms
    assert fa.two_shot_plan(big // 2, 4, 128, cpu, big)[3] == sms
    assert fa.two_shot_plan(big // 2, 2, 128, cpu, big, bpsm=2)[3] == 2 * sms   # override
    # the knob is read once per process (kernels/config.py), checked when read
    monkeypatch.setenv("MEGATRON_LITE_BLOCKS_PER_SM", "2")
    kernel_config.cache_clear()
    fa.two_shot_plan.cache_clear()
    try:
        assert fa.two_shot_plan(big // 2, 2, 128, cpu, big)[3] == 2 * sms
        monkeypatch.setenv("MEGATRON_LITE_BLOCKS_PER_SM", "many")
        kernel_config.cache_clear()
        with pytest.raises(ValueError, match="MEGATRON_LITE_BLOCKS_PER_SM must be"):
            kernel_config()
    finally:
        monkeypatch.delenv("MEGATRON_LITE_BLOCKS_PER_SM")
        kernel_config.cache_clear()
        fa.two_shot_plan.cache_clear()


def test_two_shot_launch_key_holds_plain_values():
    # The Triton two-shot launch caches its grid cap per workspace under _launch_key:
    # equal for the plans a scheme builds call after call (new KernelPlan objects), equal
    # where only the scale values differ (the same compiled variant), apart where the
    # variant differs, and free of tensors (a plan's tensors compare element-wise, which a
    # dict lookup cannot take).
    _kernels()
    from megatron_lite.comm.codecs import CodecSpec, get_scheme
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    from megatron_lite.kernels import fused_allreduce as fa
    x = torch.randn(4, 192).to(torch.bfloat16)
    s = torch.rand(192, generator=torch.Generator().manual_seed(1)) + 0.5
    w = WeightedScheme(CodecSpec("weighted-hadamard-int4", 128), s)
    bf16, fp16 = torch.bfloat16, torch.float16
    key = fa._launch_key(w.kernel_plan(x), x.numel(), bf16, bf16)
    caps = {key: 264}
    assert caps[fa._launch_key(w.kernel_plan(x), x.numel(), bf16, bf16)] == 264

    def flat(k):
        for v in k:
            yield from flat(v) if isinstance(v, tuple) else (v,)
    assert not any(isinstance(v, torch.Tensor) for v in flat(key))
    other = WeightedScheme(CodecSpec("weighted-hadamard-int4", 128), s.flip(0))
    assert fa._launch_key(other.kernel_plan(x), x.numel(), bf16, bf16) == key
    x96 = x.view(-1, 96)
    wide = WeightedScheme(CodecSpec("weighted-hadamard-int4", 128), s[:96])
    apart = [fa._launch_key(wide.kernel_plan(x96), x.numel(), bf16, bf16),
             fa._launch_key(get_scheme("hadamard-int4:128").kernel_plan(x), x.numel(), bf16,
                            bf16),
             fa._launch_key(w.kernel_plan(x), x.numel() + 8, bf16, bf16),
             fa._launch_key(w.kernel_plan(x), x.numel(), fp16, fp16),
             fa._launch_key(w.kernel_plan(x), x.numel(), bf16, fp16)]
    assert len({key, *apart}) == 6
