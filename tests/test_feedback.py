"""Error feedback: the next reduce cancels the previous one's error exactly (in sum)."""
from __future__ import annotations

import pytest
import torch

from megatron_lite.comm.build import build_communicator
from megatron_lite.comm.feedback import ErrorFeedbackCommunicator
from megatron_lite.comm.simulate import make_thread_communicators, run_simulated
from tests._dist import run_distributed


def _two_reduces(comm, spec, xs, ef):
    q = build_communicator(comm, spec)
    c = ErrorFeedbackCommunicator(q) if ef else q
    c.all_reduce(xs[0][comm.rank], "embed_tokens")            # resets the state
    y1 = c.all_reduce(xs[1][comm.rank], "layers.0.self_attn.o_proj")
    y2 = c.all_reduce(xs[2][comm.rank], "layers.0.mlp.down_proj")
    y3 = q.all_reduce(xs[2][comm.rank], "layers.0.mlp.down_proj")  # same message, no carry
    return y1, y2, y3


@pytest.mark.parametrize("spec", ["int4:32", "hadamard-int3:64", "int4-int8:32",
                                  "int4:32,algo=one-shot", "hadamard-int3:64,algo=one-shot"])
def test_residual_carries_only_the_last_error(spec):
    torch.manual_seed(0)
    w = 3
    xs = torch.randn(3, w, 4, 128)
    xs[2] *= 0.5
    ys = run_simulated(_two_reduces, w, spec, xs, True)
    y1, y2, _ = ys[0]
    for r in ys[1:]:                                           # ranks bitwise identical
        assert all(torch.equal(a, b) for a, b in zip(r, ys[0]))
    exact1, exact2 = xs[1].sum(0), xs[2].sum(0)
    e1 = y1 - exact1
    # The second reduce delivered exact2 - e1 + e2, with e2 the error of quantizing the
    # compensated message: the stream h + y1 + y2 is off by e2 only.
    resid = (y1 + y2) - (exact1 + exact2)
    plain = run_simulated(_two_reduces, w, spec, xs, False)[0]
    resid_plain = (plain[0] + plain[1]) - (exact1 + exact2)
    assert resid.pow(2).mean() < 0.75 * resid_plain.pow(2).mean()
    # and y2 is the quantized sum of (x2 - own error parts), whose sum is exactly -e1:
    assert ((y2 - (exact2 - e1)).pow(2).mean() <
            0.5 * (y2 - exact2).pow(2).mean())


def _real(rank, world_size, spec, xs):
    return _two_reduces(__import__("megatron_lite.comm.communicator", fromlist=["x"])
                        .DistCommunicator(), spec, xs, True)


def test_error_feedback_gloo_equals_simulation():
    torch.manual_seed(1)
    xs = torch.randn(3, 2, 3, 64)
    sim = run_simulated(_two_reduces, 2, "int4:64", xs, True)
    real = run_distributed(_real, 2, "int4:64", xs)
    for r in real:
        assert all(torch.equal(a, b) for a, b in zip(r, sim[0]))


# ----------------------------------------------------------- sandwich norms (Gemma 2/3)
SITES = [f"layers.{i // 2}.{'self_attn.o_proj' if i % 2 == 0 else 'mlp.down_proj'}"
         for i in range(6)]


def _norm(y, gain, eps):
    return gain * y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps)


def _sandwich_chain(comm, spec, xs, gains, eps, ef):
    q = build_communicator(comm, spec)
    c = ErrorFeedbackCommunicator(q, {s: (g, eps) for s, g in zip(SITES, gains)}) if ef else q
    c.all_reduce(xs[0][comm.rank], "embed_tokens")
    ys = [c.all_reduce(xs[k][comm.rank], s) for k, s in enumerate(SITES)]
    return ys, (c.debt if ef else None)


def _sandwich_data(w, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(len(SITES), w, 3, 5, 128, generator=g)
    xs *= torch.exp(torch.randn(len(SITES), 1, 3, 5, 1, generator=g))   # per-token scale
    # Gains like Gemma 3's post norms: log-normal over channels,
    # a few channels near zero (they cannot pay their debt and must defer it).
    gains = [torch.exp(torch.randn(128, generator=g)) for _ in SITES]
    for gk in gains:
        gk[:4] = 1e-3
    return xs, gains


@pytest.mark.parametrize("spec,dtype", [("int4:32", torch.float32),
                                        ("hadamard-int4:64", torch.float32),
                                        ("int4:32", torch.bfloat16),
                                        ("hadamard-int4:64,algo=one-shot", torch.float32)])
def test_norm_aware_feedback_cancels_through_sandwich_norms(spec, dtype):
    """What reaches the residual stream is norm(y_k) for every site. Norm-aware feedback
    must make the stream's total error much smaller than without it, and the rank debts
    must account exactly (to rounding) for what every site's norm let through."""
    w, eps = 3, 1e-6
    xs, gains = _sandwich_data(w)
    xs = xs.to(dtype)
    ef = run_simulated(_sandwich_chain, w, spec, xs, gains, eps, True)
    plain = run_simulated(_sandwich_chain, w, spec, xs, gains, eps, False)[0][0]
    ys, _ = ef[0]
    for r in ef[1:]:                                   # ranks bitwise identical
        assert all(torch.equal(a, b) for a, b in zip(r[0], ys))
    ys, plain = [y.float() for y in ys], [y.float() for y in plain]
    exact = [xs[k].float().sum(0) for k in range(len(SITES))]
    stream = lambda out: sum(_norm(y, g, eps) - _norm(e, g, eps)          # noqa: E731
                             for y, e, g in zip(out, exact, gains))
    err_ef, err_plain = stream(ys), stream(plain)
    assert err_ef.pow(2).mean() < 0.5 * err_plain.pow(2).mean()        # measured 0.34
    debt = sum(r[1] for r in ef)
    if dtype != torch.float32:
        # The final cast of the sum to bf16 (which the bf16 reference does too) is
        # nobody's error part, so the books below hold in fp32 only.
        return
    # Bookkeeping: the debts sum to the first-order stream error of the delivered sums.
    first_order = sum(g * (y - e) / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + eps)
                      for y, e, g in zip(ys, exact, gains))
    torch.testing.assert_close(debt, first_order, rtol=1e-4, atol=1e-5)
    # The linearisation holds: the real stream error is the debt, up to the part of each
    # error along its sum (which the norm removes, about 1/H of it) and second order.
    assert (err_ef - debt).pow(2).mean() < 0.15 * err_plain.pow(2).mean()   # measured 0.08


def _prenorm_by_hand(comm, spec, xs):
    """The pre-norm rule written out: the second message carries minus this rank's
    error part of the first reduce."""
    from megatron_lite.comm.algorithms import Algo, Trace, quantized_all_reduce
    q = build_communicator(comm, spec)
    algo = q.spec.algo
    scheme = q.sites.scheme_for("layers.0.mlp.down_proj")
    trace = Trace()
    y1 = quantized_all_reduce(q.base, xs[1][comm.rank], scheme, algo, trace)
    assert (trace.acc is None) == (algo == Algo.ONE_SHOT)   # one-shot: no all-gather requant
    carry = -trace.restore(scheme.own_error(trace.chunks, trace.acc, comm.rank)).float()
    x2 = (xs[2][comm.rank].float() + carry).to(xs.dtype)
    return y1, quantized_all_reduce(q.base, x2, scheme, algo)


@pytest.mark.parametrize("spec", ["int4:32", "hadamard-int4:64", "hadamard-int4:64,algo=one-shot"])
def test_feedback_without_post_norms_is_the_exact_prenorm_rule(spec):
    """Pre-norm models (no post norms) get the plain rule, bit for bit."""
    torch.manual_seed(3)
    w = 2
    xs = torch.randn(3, w, 4, 128)
    got = run_simulated(_two_reduces, w, spec, xs, True)
    want = run_simulated(_prenorm_by_hand, w, spec, xs)
    for g, h in zip(got, want):
        assert torch.equal(g[0], h[0]) and torch.equal(g[1], h[1])


def test_norm_aware_feedback_nonfinite_input_does_not_poison_later_sites():
    w, eps = 2, 1e-6
    xs, gains = _sandwich_data(w, seed=1)
    xs[1, 0, 0, 0, 7] = float("nan")                  # one token of site 1 on rank 0
    ys, _ = run_simulated(_sandwich_chain, w, "int4:32", xs, gains, eps, True)[0]
    assert torch.isnan(ys[1][0, 0]).any()
    for y in ys[2:]:
        assert torch.isfinite(y).all()


# ------------------------------------------------------------ ef+ through the Engine
def _engine_logits(comm_or_rank, world, hf_cfg, sd, specs):
    from megatron_lite.comm.communicator import Communicator, DistCommunicator
    from megatron_lite.inference.engine import Engine
    from megatron_lite.parallel_state import TPGroup
    base = comm_or_rank if isinstance(comm_or_rank, Communicator) else DistCommunicator()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 3, 7, 2, 40, 41, 8, 9]])
    out = {}
    for spec in specs:
        eng = Engine.from_hf_state_dict(hf_cfg, sd, group=TPGroup.from_communicator(base),
                                        comm=spec, device="cpu")
        c = eng.group.communicator
        out[spec] = (eng.logits(ids), len(getattr(c, "post_norms", {})), type(c).__name__)
    return out


@pytest.mark.parametrize("name,norms", [("gemma3_text", True), ("llama", False)])
def test_ef_spec_through_the_engine_gloo_equals_simulation(name, norms):
    """``--comm ef+CODEC`` on generate/the Engine: the Engine hands a sandwich-norm
    model's post-norm gains to the feedback (none for a pre-norm model); gloo ranks are
    identical and equal to simulated TP bit for bit; the feedback changes the result."""
    from tests.tiny_configs import TINY_CONFIGS, hf_config_dict, make_hf_model
    sd = make_hf_model(name).state_dict()
    cfg = hf_config_dict(name)
    specs = ["int4:32", "ef+int4:32", "ef+int4:32,algo=one-shot"]
    real = run_distributed(_gloo_engine_logits, 2, cfg, sd, specs)
    sim = run_simulated(_engine_logits, 2, 2, cfg, sd, specs)
    n_sites = 2 * TINY_CONFIGS[name]["num_hidden_layers"]
    for r in real + sim:
        for spec in specs:
            assert torch.equal(r[spec][0], real[0][spec][0]), spec
        assert r["ef+int4:32"][1:] == ((n_sites if norms else 0), "ErrorFeedbackCommunicator")
    assert not torch.equal(real[0]["ef+int4:32"][0], real[0]["int4:32"][0])
    assert not torch.equal(real[0]["ef+int4:32,algo=one-shot"][0], real[0]["ef+int4:32"][0])


def _gloo_engine_logits(rank, world, hf_cfg, sd, specs):
    return _engine_logits(rank, world, hf_cfg, sd, specs)


def test_ef_explains_its_portable_path():
    base = make_thread_communicators(1)[0]
    c = build_communicator(base, "ef+int4:128,algo=one-shot,layers.0.*=native")
    x = torch.zeros(4, 128)
    assert c.explain(x, "layers.1.mlp.down_proj").split("; transport ")[0] == \
        "error feedback, portable one-shot with int4:128"
    assert c.explain(x, "layers.0.mlp.down_proj").split("; transport ")[0] == "native: no codec for this site"


def test_ef_spec_needs_a_quantizing_codec():
    from megatron_lite.comm.codecs import CodecError
    base = make_thread_communicators(1)[0]
    with pytest.raises(CodecError, match="needs a quantizing codec"):
        build_communicator(base, "ef+native")
