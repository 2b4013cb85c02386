"""The all-reduce fused with the residual add and RMSNorm (comm/norm.py,
kernels/allreduce_norm.py) on CPU.

* The fused kernel, run by 2 real gloo processes over the /dev/shm stand-in for
  symmetric memory under ``TRITON_INTERPRET=1`` (in a child process, as
  tests/test_kernels_interpret.py does), against the unfused path (the all-reduce, then
  comm/norm.py's torch ops): the sum and the pre-norm residual bit for bit, the norm
  outputs within two units in the last place, ranks bitwise identical; raw (bf16, fp16,
  fp32) and the one-shot quantized codecs (plain, hadamard-, weighted-); both layouts,
  Llama and Gemma norms, with and without a bias and a following norm; and through the
  communicator: which path it takes for which message, and a TP-2 model decoding through
  the kernel.
* The decoder with the fused API on its reference path (gloo TP 2, no kernel): every
  layer's hidden states are bitwise the ones of the previous layer code (residual add,
  then norm, as separate torch ops), in fp32 and bf16, pre-norm and sandwich.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests._dist import run_distributed
from tests.tiny_configs import hf_config_dict, make_hf_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = "layers.0.mlp.down_proj"
# normed outputs (and the sandwich residual) against torch: the row's sum of squares is
# reduced in another order, so the fp32 statistics differ in the last bits and a cast may
# round the other way, then the Llama weight multiply may round once more
ULPS = 2


def _run_child(check: str, timeout: float = 900):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), check], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- helpers
def _same(a, b):
    """Bitwise equal (any NaN equals any NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = torch.isnan(a), torch.isnan(b)
    iv = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return bool(torch.equal(na, nb)
                and torch.equal(a[~na].contiguous().view(iv), b[~nb].contiguous().view(iv)))


def _close(a, b):
    """Within ULPS units in the last place (fp32: 1e-5 relative) of the element or of the
    tensor's mean magnitude (a sum that cancels keeps its inputs' error), NaNs in the same
    places. Returns the worst error in units of that tolerance (<= 1 passes)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return math.inf
    na, nb = torch.isnan(a), torch.isnan(b)
    if not torch.equal(na, nb):
        return math.inf
    rel = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10, torch.float32: 1e-5}[a.dtype]
    a, b = a[~na].double(), b[~nb].double()
    if not a.numel():
        return 0.0
    tol = ULPS * rel * (b.abs() + b.abs().mean()) + 1e-30
    return float(((a - b).abs() / tol).max())


def _check(got, want, exact_residual):
    """[residual ok, normed ok, error units] for a fused result against the reference."""
    (r, n), (rr, rn) = got, want
    ok_r = _same(r, rr) if exact_residual else _close(r, rr) <= 1
    if rn is None:
        return [ok_r, n is None, 0.0]
    err = _close(n, rn)
    return [ok_r, err <= 1, round(err, 3)]


def _norm_kwargs(case, h, dtype, gen):
    from megatron_lite.comm.norm import Layout
    layout, gemma, bias, last = case
    w = lambda: (torch.randn(h, generator=gen) * 0.5 + (0 if gemma else 1)).to(dtype)  # noqa
    kw = dict(layout=Layout.SANDWICH if layout == "sandwich" else Layout.PRE_NORM,
              offset=1.0 if gemma else 0.0, scale_in_fp32=gemma,
              post_norm_weight=w() if layout == "sandwich" else None,
              bias=(torch.randn(h, generator=gen)).to(dtype) if bias else None)
    return (None if last else w()), kw


# ----------------------------------------------------------------------------- child side
CASES = [("pre", False, False, False), ("pre", True, False, False),
         ("pre", False, True, True), ("sandwich", True, False, False),
         ("sandwich", True, True, True), ("sandwich", False, False, False)]


def _kernel_body(rank, world):
    import torch.distributed as dist

    from megatron_lite.comm import fused as backends
    from megatron_lite.comm.algorithms import Algo, quantized_all_reduce
    from megatron_lite.comm.codecs import CodecSpec, get_scheme
    from megatron_lite.comm.codecs.weighted import WeightedScheme
    from megatron_lite.comm.communicator import Communicator, DistCommunicator
    from megatron_lite.comm.norm import add_rmsnorm
    from megatron_lite.comm.router import QuantizedCommunicator
    from megatron_lite.comm.spec import parse_comm
    from megatron_lite.kernels import allreduce_norm as an
    state = backends.make_state(None, max_bytes=1 << 16, oneshot_max_bytes=1 << 14,
                                cpu_shm=True)
    ws, base, res = state.ws, DistCommunicator(), []

    def raw_sum(x):      # fp32 in rank order, one rounding: the one-shot kernel's sum
        xs = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(xs, x)
        acc = xs[0].float()
        for o in xs[1:]:
            acc = acc + o.float()
        return acc.to(x.dtype)

    # 1. raw: every layout / norm kind, three dtypes, rows below, at and above the grid
    for i, (dtype, rows, h) in enumerate([(torch.bfloat16, 1, 192), (torch.bfloat16, 11, 40),
                                         (torch.float16, 3, 256), (torch.float32, 5, 96)]):
        for j, case in enumerate(CASES):
            gen = torch.Generator().manual_seed(100 * i + j)        # same weights everywhere
            w, kw = _norm_kwargs(case, h, dtype, gen)
            residual = (torch.randn(rows, h, generator=gen) * 4).to(dtype)
            x = (torch.randn(rows, h, generator=torch.Generator().manual_seed(
                7 * i + j + 1000 * rank)) * (rank + 1)).to(dtype)
            got = an.all_reduce_add_rmsnorm(ws, x, residual, w, 1e-6, plan=None,
                                            sandwich=kw["layout"] == "sandwich",
                                            **{k: v for k, v in kw.items() if k != "layout"})
            want = add_rmsnorm(raw_sum(x), residual, w, 1e-6, **kw)
            res.append(["raw", str(dtype), rows, h, *case,
                        *_check(got, want, exact_residual=case[0] == "pre"),
                        int(got[0].float().sum() * 1000)])

    # 2. one-shot quantized codecs: the scheme's one-shot sum, bit for bit
    h = 192
    scale = torch.rand(h, generator=torch.Generator().manual_seed(5)) * 8 + 0.05
    schemes = [get_scheme(s) for s in ("int4:64", "int8:64", "fp8:64", "int3:64",
                                       "int2:64", "hadamard-int4:64", "bf16")]
    schemes += [WeightedScheme(CodecSpec("weighted-int8", 64), scale),
                WeightedScheme(CodecSpec("weighted-hadamard-int4", 64), scale)]
    for i, scheme in enumerate(schemes):
        for j, (dtype, case) in enumerate([(torch.bfloat16, CASES[0]),
                                           (torch.float32, CASES[3])]):
            gen = torch.Generator().manual_seed(500 + 10 * i + j)
            w, kw = _norm_kwargs(case, h, dtype, gen)
            residual = (torch.randn(3, h, generator=gen) * 4).to(dtype)
            x = (torch.randn(3, h, generator=torch.Generator().manual_seed(
                31 * i + j + 1000 * rank)) * (rank + 1) * 3).to(dtype)
            if j == 0 and rank == 1:
                x[1, 70] = math.nan                       # a non-finite group: NaN row
            got = an.all_reduce_add_rmsnorm(ws, x, residual, w, 1e-6,
                                            plan=scheme.kernel_plan(x),
                                            sandwich=kw["layout"] == "sandwich",
                                            **{k: v for k, v in kw.items() if k != "layout"})
            y = quantized_all_reduce(base, x, scheme, Algo.ONE_SHOT)
            want = add_rmsnorm(y, residual, w, 1e-6, **kw)
            res.append(["codec", scheme.spec, str(dtype), *case,
                        *_check(got, want, exact_residual=case[0] == "pre"),
                        int(torch.nan_to_num(got[0].float()).sum() * 1000)])

    # 3. through the communicator: the fused kernel where the planned backend is one-shot
    #    and the message fits; the unfused path (exactly the reference) everywhere else
    table = {"oneshot_max": 1 << 13, "fused_min": {"*": 1 << 13}}
    for spec, h, rows, fused in (("auto", 128, 2, "auto -> oneshot with bf16"),
                                 ("int4:64", 128, 2, "auto -> oneshot with int4:64"),
                                 ("int4:64", 128, 40, None),      # auto -> fused two-shot
                                 ("int4:64,algo=one-shot", 128, 4,
                                  "one-shot-kernels with int4:64"),
                                 ("int4:64,algo=one-shot", 160, 4, None),  # 160 % 64
                                 ("int4:64,algo=one-shot", 128, 240, None),  # > the slot
                                 ("native", 128, 2, None)):
        qc = QuantizedCommunicator(base, parse_comm(spec))
        backends.install_fused(qc, max_bytes=1 << 16, oneshot_max_bytes=1 << 14,
                               table=table, cpu_shm=True)
        gen = torch.Generator().manual_seed(h + rows)
        w, kw = _norm_kwargs(CASES[1], h, torch.bfloat16, gen)
        residual = torch.randn(rows, h, generator=gen).to(torch.bfloat16)
        x = torch.randn(rows, h, generator=torch.Generator().manual_seed(rank + rows)
                        ).to(torch.bfloat16)
        why = qc.explain_add_rmsnorm(x, SITE)
        got = qc.all_reduce_add_rmsnorm(x, residual, w, 1e-6, SITE, **kw)
        want = Communicator.all_reduce_add_rmsnorm(qc, x, residual, w, 1e-6, SITE, **kw)
        plan = why.split("; transport")[0]       # the plan, without the transport's words
        path_ok = (plan == f"fused add + RMSNorm: {fused}" if fused
                   else plan.startswith("unfused"))
        exact = _same(got[1], want[1])                    # unfused: the reference itself
        res.append(["comm", spec, rows, h, path_ok, exact or fused is not None,
                    *_check(got, want, exact_residual=True), why])
        qc.backends[0].state.ws.check()
    ws.check()
    return res


def _fused_engine(name, sd, dtype, compile=False):
    from megatron_lite.comm import fused as backends
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.comm.router import QuantizedCommunicator
    from megatron_lite.comm.spec import parse_comm
    from megatron_lite.inference.engine import Engine
    qc = QuantizedCommunicator(DistCommunicator(), parse_comm("auto"))
    backends.install_fused(qc, max_bytes=1 << 16, oneshot_max_bytes=1 << 14,
                           table={"oneshot_max": 1 << 14, "fused_min": {}}, cpu_shm=True)
    eng = Engine.from_hf_state_dict(hf_config_dict(name), sd, comm=qc, device="cpu",
                                    dtype=dtype, compile=compile)
    eng.eos_token_ids = ()
    return eng, qc, qc.backends[0].state.ws


def _models_body(rank, world, cases):
    return {name: _model_body(name, sd, dtype, compile_too)
            for name, sd, dtype, compile_too in cases}


def _model_body(name, sd, dtype, compile_too):
    """A TP-2 model whose reduces go through the fused kernel (auto -> oneshot), against
    the same communicator with the fusion switched off; with ``compile_too``, greedy
    decoding eager and under torch.compile (the fused call is one custom op there)."""
    eng, qc, ws = _fused_engine(name, sd, dtype)
    ids = torch.tensor([[5, 17, 33, 2, 90, 41]])
    x = torch.zeros(1, 6, eng.model.cfg.hidden_size, dtype=dtype)
    paths = [qc.explain_add_rmsnorm(x, f"layers.0.{s}") for s in ("self_attn.o_proj",
                                                                  "mlp.down_proj")]
    fused = eng.logits(ids).float()
    launches = int(ws.counters[2, 0])          # every launch bumps every block's epoch
    qc.fuses_add_rmsnorm = False                # the unfused path through the same sums
    ref = eng.logits(ids).float()
    ws.check()
    launches = (launches, int(ws.counters[2, 0]))
    gen = {}
    for compiled in ((False, True) if compile_too else ()):
        eng, _, ws = _fused_engine(name, sd, dtype, compile=compiled)
        tokens = [r.token_ids for r in eng.generate([[5, 6, 7, 8]], max_new_tokens=3)]
        gen[compiled] = (tokens, int(ws.counters[2, 0]))    # 3 forwards, 2 per layer
    from torch._dynamo.utils import counters
    gen["graphs"] = counters["stats"]["unique_graphs"]
    gen["breaks"] = dict(counters["graph_break"])
    return paths, fused, ref, launches, gen


def child_kernel():
    return run_distributed(_kernel_body, 2)


def child_model():
    out = {}
    cases = [(name, make_hf_model(name).state_dict(), dtype, name == "gemma2")
             for name, dtype in (("llama", torch.bfloat16), ("gemma2", torch.float32))]
    ranks = run_distributed(_models_body, 2, cases)
    for name, *_ in cases:
        (paths, fused, ref, launches, gen), (_, fused1, _, _, _) = (r[name] for r in ranks)
        out[name] = dict(paths=paths, ranks_same=bool(torch.equal(fused, fused1)),
                         gen={str(k): v for k, v in gen.items()},
                         launches=launches, layers=hf_config_dict(name)["num_hidden_layers"],
                         err=float((fused - ref).abs().max() / ref.abs().max()),
                         argmax_same=bool(torch.equal(fused.argmax(-1), ref.argmax(-1))))
    return out


if __name__ == "__main__":
    print(json.dumps({"kernel": child_kernel, "model": child_model}[sys.argv[1]]()))


# ----------------------------------------------------------------------------- tests
def test_fused_kernel_matches_the_unfused_path_over_shared_memory():
    ranks = _run_child("kernel")
    assert len(ranks) == 2
    rows = ranks[0]
    kinds = [r[0] for r in rows]
    assert kinds.count("raw") == 24 and kinds.count("codec") == 18 and kinds.count("comm") == 7
    for r in rows:
        if r[0] == "raw":
            assert r[8] and r[9], r          # residual' (bitwise for pre-norm), normed
        elif r[0] == "codec":
            assert r[7] and r[8], r
        else:
            assert r[4] and r[5] and r[6] and r[7], r   # path, exact where unfused, values
    # ranks hold the same bits: identical checksums of every fused output
    assert [r[-1] for r in ranks[0] if r[0] != "comm"] == \
        [r[-1] for r in ranks[1] if r[0] != "comm"]


def test_model_decodes_through_the_fused_kernel():
    out = _run_child("model")
    for name, r in out.items():
        assert all(p.startswith("fused add + RMSNorm: auto -> oneshot") for p in r["paths"]), r
        # two fused launches per layer, none with the fusion off
        assert r["launches"] == [2 * r["layers"]] * 2, r
        assert r["ranks_same"], name
        assert r["argmax_same"], name
        # bf16: a norm output may differ by an ulp and the difference propagates
        assert r["err"] <= (2e-2 if name == "llama" else 1e-5), (name, r["err"])
    # torch.compile: the same greedy tokens through the fused custom op, one graph, no break
    gen, layers = out["gemma2"]["gen"], out["gemma2"]["layers"]
    assert gen["True"][0] == gen["False"][0], gen
    assert gen["True"][1] == gen["False"][1] == 2 * layers * 3, gen   # prefill + 2 decodes
    assert gen["graphs"] >= 1 and not gen["breaks"], gen


# ----------------------------------------------------------------------------- reference path
def _old_layer(layer, x, cos, sin, plan, kc, vc):
    """The decoder layer as it was before the fused API: reduce, residual add and norm as
    separate calls."""
    h = layer.self_attn(layer.input_layernorm(x), cos, sin, plan, kc, vc)
    if layer.sandwich:
        x = x + layer.post_attention_layernorm(h)
        return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
    x = x + h
    return x + layer.mlp(layer.post_attention_layernorm(x))


def _reference_path_body(rank, world, names, sds, dtypes):
    from megatron_lite.inference.engine import Engine
    from megatron_lite.inference.kv_cache import KVCache
    out = {}
    for (name, sd), dtype in ((c, d) for c in zip(names, sds) for d in dtypes):
        eng = Engine.from_hf_state_dict(hf_config_dict(name), sd, device="cpu", dtype=dtype)
        model = eng.model
        checks, saved, hooks = [], {}, []

        def pre(layer, args):
            x, normed, nxt, cos, sin, plan, kc, vc = args
            saved[id(layer)] = (x.clone(), kc.clone(), vc.clone())
            checks.append(_same(normed, layer.input_layernorm(x)))

        def post(layer, args, output):
            x, kc, vc = saved.pop(id(layer))
            _, _, nxt, cos, sin, plan, _, _ = args
            old = _old_layer(layer, x, cos, sin, plan, kc, vc)
            checks.append(_same(output[0], old))
            checks.append(output[1] is None if nxt is None else _same(output[1], nxt(old)))
        for layer in model.layers:
            hooks += [layer.register_forward_pre_hook(pre),
                      layer.register_forward_hook(post)]
        B, T = 2, 7
        cache = KVCache(model.cfg, world, B, 16, dtype, "cpu")
        ids = torch.randint(3, 250, (B, T), generator=torch.Generator().manual_seed(3))
        pos = torch.arange(T).expand(B, T)
        with torch.no_grad():
            model(ids, pos, cache.k, cache.v, kv_len=T, causal_prefill=True)
            model(ids[:, :1], torch.full((B, 1), T), cache.k, cache.v, kv_len=T + 1)
        for hk in hooks:
            hk.remove()
        out[name, str(dtype)] = (len(checks), all(checks))
    return out


def test_decoder_reference_path_is_bitwise_the_unfused_layer():
    names = ["llama", "llama_attn_bias", "qwen2", "gemma", "gemma2", "gemma3_text"]
    sds = [make_hf_model(n).state_dict() for n in names]
    dtypes = [torch.float32, torch.bfloat16]
    for per_rank in run_distributed(_reference_path_body, 2, names, sds, dtypes):
        assert len(per_rank) == len(names) * len(dtypes)
        for key, (n, ok) in per_rank.items():
            assert n >= 3 * 2 * 2 and ok, key      # 3 checks per layer, >= 2 layers, 2 steps


def test_reference_is_the_decoder_arithmetic():
    """add_rmsnorm's norm is the decoder's RMSNorm, bit for bit, and a wrong layout is a
    one-line error."""
    from megatron_lite.comm.norm import Layout, add_rmsnorm
    from megatron_lite.models.decoder import RMSNorm
    g = torch.Generator().manual_seed(0)
    for offset, fp32 in ((0.0, False), (1.0, True), (1.0, False)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            norm = RMSNorm(64, 1e-6, offset, fp32, dtype=dtype)
            norm.weight.copy_(torch.randn(64, generator=g))
            y, res = (torch.randn(5, 64, generator=g).to(dtype) for _ in range(2))
            new, normed = add_rmsnorm(y, res, norm.weight, 1e-6, offset=offset,
                                      scale_in_fp32=fp32)
            assert _same(new, res + y) and _same(normed, norm(res + y))
            new, normed = add_rmsnorm(y, res, norm.weight, 1e-6, layout=Layout.SANDWICH,
                                      post_norm_weight=norm.weight, offset=offset,
                                      scale_in_fp32=fp32)
            assert _same(new, res + norm(y)) and _same(normed, norm(res + norm(y)))
    with pytest.raises(ValueError, match="layout sandwich takes a post_norm_weight"):
        add_rmsnorm(y, res, None, 1e-6, layout=Layout.SANDWICH)
