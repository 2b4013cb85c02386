"""weighted-<codec>: channel scales, the scaled two-step all-reduce, the statistics pass
(against HF transformers' autograd) and the calibration file / tool wiring."""
from __future__ import annotations

import pytest
import torch

from megatron_lite.comm.algorithms import two_step_all_reduce
from megatron_lite.comm.build import build_communicator
from megatron_lite.comm.calibration import CalibrationError, load_calibration
from megatron_lite.comm.codecs import (CodecError, CodecSpec, codec_bits,
                                       get_scheme, parse_codec_spec)
from megatron_lite.comm.codecs.weighted import WeightedScheme
from megatron_lite.comm.simulate import run_simulated
from megatron_lite.comm.spec import parse_comm
from megatron_lite.lab.calibration import SCALE_RANGE, channel_scales, channel_statistics
from tests._dist import run_distributed
from tests.test_calibrate import _text, planted_dir, run_main, text_file  # noqa: F401


def test_channel_scales_formula_floor_and_range():
    rms = torch.tensor([1.0, 4.0, 16.0, 0.25])
    fisher = torch.tensor([16.0, 1.0, 81.0, 1.0])
    s = channel_scales(rms, fisher)
    want = fisher.double() ** 0.25 / rms.double() ** 0.5
    want = want / want.log().mean().exp()                 # geometric mean 1
    assert torch.allclose(s.double(), want, rtol=1e-6)
    assert s.dtype == torch.float32 and abs(float(s.double().log().mean())) < 1e-6
    # Pure RMS equalisation with exponents (0, 1): s * rms is constant.
    e = channel_scales(rms, fisher, (0.0, 1.0))
    assert torch.allclose(e * rms, (e * rms)[0].expand(4), rtol=1e-6)
    # Dead channels (rms 0, F 0) get finite, positive, bounded scales.
    z = channel_scales(torch.tensor([1.0, 0.0, 2.0, 1e30]), torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert torch.isfinite(z).all() and (z > 0).all()
    assert float(z.max() / z.min()) <= SCALE_RANGE ** 2 * (1 + 1e-6)
    for bad in (torch.tensor([1.0, -1.0]), torch.tensor([1.0, float("nan")])):
        with pytest.raises(CodecError, match="finite and non-negative"):
            channel_scales(bad, torch.ones(2))
    with pytest.raises(CodecError, match="equal 1-D"):
        channel_scales(torch.ones(3), torch.ones(4))


def test_specs_bits_and_bad_input():
    assert str(parse_codec_spec("weighted-hadamard-int4")) == "weighted-hadamard-int4:128"
    assert codec_bits("weighted-hadamard-int4:128") == codec_bits("hadamard-int4:128") == 4.25
    assert codec_bits("weighted-int8:32") == codec_bits("int8:32")
    for spec, msg in [("weighted-outlier-int4", "unknown codec"), ("weighted-bf16", "unknown codec"),
                      ("weighted-int4:100", "does not fit")]:
        with pytest.raises(CodecError, match=msg):
            parse_codec_spec(spec)
    with pytest.raises(CodecError, match="needs a calibration file"):
        parse_comm("weighted-int4:128")
    with pytest.raises(CodecError, match="needs a calibration file"):
        get_scheme("weighted-int8:128")
    with pytest.raises(CodecError, match="positive"):
        WeightedScheme(CodecSpec("weighted-int8", 128), torch.tensor([1.0, 0.0]))


def _one_rank(comm, scheme, parts):
    return two_step_all_reduce(comm, parts[comm.rank], scheme)


def _real(rank, world_size, scheme, parts):
    from megatron_lite.comm.communicator import DistCommunicator
    return _one_rank(DistCommunicator(), scheme, parts)


@pytest.mark.parametrize("inner", ["int4:32", "hadamard-int8:64", "int4-int8:64"])
def test_unit_scales_are_the_inner_codec_bit_for_bit(inner):
    torch.manual_seed(3)
    parts = torch.randn(2, 5, 128) * torch.logspace(-2, 2, 128)
    cs = parse_codec_spec("weighted-" + inner)
    w = run_simulated(_one_rank, 2, WeightedScheme(cs, torch.ones(128)), parts)
    p = run_simulated(_one_rank, 2, get_scheme(inner), parts)
    assert torch.equal(w[0], p[0]) and torch.equal(w[1], p[0])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("inner", ["hadamard-int4:64", "int8:32"])
def test_two_step_gloo_equals_simulated_and_shaping_lowers_weighted_error(world, inner):
    """Channels with log-spread magnitudes (1e-2 .. 1e2) and uniform importance: the scales
    s = rms^-1/2 (the optimum for F = 1) must beat s = 1 in mean squared error, and every
    rank (simulated and gloo) must return the same bits."""
    torch.manual_seed(world)
    h = 128
    sigma = torch.logspace(-2, 2, h)[torch.randperm(h)]
    parts = torch.randn(world, 6, h) * sigma
    s = channel_scales(sigma, torch.ones(h))
    scheme = WeightedScheme(parse_codec_spec("weighted-" + inner), s)
    sim = run_simulated(_one_rank, world, scheme, parts)
    real = run_distributed(_real, world, scheme, parts)
    for y in sim[1:] + real:
        assert torch.equal(y, sim[0])
    exact = parts.sum(0)
    plain = run_simulated(_one_rank, world, get_scheme(inner), parts)[0]
    err_w = (sim[0] - exact).pow(2).mean()
    err_p = (plain - exact).pow(2).mean()
    assert err_w < 0.5 * err_p, (err_w, err_p)
    # Error bound: the inner scheme's bounds hold in the scaled domain; divide by s.
    chunks, restore = scheme.chunk(parts[0], 1)
    enc = scheme.rs_encode(chunks, 0)
    acc = scheme.rs_decode(enc, 0, chunks.shape[-1])[0]
    y = restore(scheme.ag_decode(scheme.ag_encode(acc, 0).unsqueeze(0), chunks.shape[-1],
                                 torch.float32))
    bound = restore(scheme.rs_error_bound(chunks, 0) + scheme.ag_error_bound(acc, 0))
    assert ((y - parts[0]).abs() <= bound * (1 + 1e-5) + 1e-30).all()


def test_non_finite_and_bf16_inputs():
    s = torch.logspace(-1, 1, 64)
    scheme = WeightedScheme(parse_codec_spec("weighted-int8:32"), s)
    x = torch.randn(2, 3, 64)
    x[0, 1, 5] = float("nan")
    y = run_simulated(_one_rank, 2, scheme, x)[0]
    assert y[1, :32].isnan().all() and y[1, 32:].isfinite().all() and y[0].isfinite().all()
    xb = torch.randn(2, 3, 64).bfloat16()
    yb = run_simulated(_one_rank, 2, scheme, xb)[0]
    # bf16 in: the same codes as its fp32 values, the output rounded once at the end.
    y32 = run_simulated(_one_rank, 2, scheme, xb.float())[0]
    assert yb.dtype == torch.bfloat16 and torch.equal(yb, y32.bfloat16())
    with pytest.raises(Exception, match="message has 32 channels, the calibration 64"):
        run_simulated(_one_rank, 2, scheme, torch.randn(2, 3, 32))


def test_fused_kernels_serve_weighted_codecs_through_their_maps():
    """The fused kernels run the plain inner codec between kernels/maps.py's scaling maps
    (bit-exactness: tests/test_kernels_interpret.py); they must not take the inner codec
    alone, which would skip the scaling."""
    s = torch.linspace(0.5, 2.0, 128)
    scheme = WeightedScheme(parse_codec_spec("weighted-int4:128"), s)
    plan = scheme.kernel_plan(torch.zeros(3, 128))
    assert plan.rot is None and torch.equal(plan.scale, s) and plan.mapped
    assert plan.rs == get_scheme("int4:128").rs.kernel_codec()
    rot = WeightedScheme(parse_codec_spec("weighted-hadamard-int8:64"), s)
    plan = rot.kernel_plan(torch.zeros(3, 128))
    assert plan.rot == 64 and torch.equal(plan.scale, s)
    assert plan.rs == get_scheme("int8:64").rs.kernel_codec()
    with pytest.raises(CodecError, match="channels"):
        scheme.kernel_plan(torch.zeros(3, 64))          # scales of another width
    plan = WeightedScheme(parse_codec_spec("weighted-hadamard-int5:128"), s).kernel_plan(
        torch.zeros(128))                              # int5: the two-plane kernels
    assert plan.rot == 128 and plan.rs.bits == 5 and plan.rs.qmax == 31


def _hf_statistics(hf_dir, batches):
    """The same statistics from HF transformers' model with its own autograd."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    outs = {}
    for i, layer in enumerate(model.model.layers):
        for name, mod in (("self_attn.o_proj", layer.self_attn.o_proj),
                          ("mlp.down_proj", layer.mlp.down_proj)):
            def keep(_m, _i, out, site=f"layers.{i}.{name}"):
                out.retain_grad()
                outs[site] = out
            mod.register_forward_hook(keep)
    sq, fi, n = {}, {}, 0
    for ids in batches:
        logits = model(ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        nll.backward()
        for s, y in outs.items():
            sq[s] = sq.get(s, 0) + y.detach()[:, :-1].double().pow(2).sum((0, 1))
            fi[s] = fi.get(s, 0) + y.grad[:, :-1].double().pow(2).sum((0, 1))
        n += ids.shape[0] * (ids.shape[1] - 1)
    return {s: (v / n).sqrt() for s, v in sq.items()}, {s: v / n for s, v in fi.items()}, n


@pytest.mark.parametrize("name", ["llama", "gemma3_text"])
def test_channel_statistics_match_hf_autograd(name, tiny_hf_dir):
    from megatron_lite.comm.communicator import Communicator
    from megatron_lite.lab.eval.runner import load_rank_engine
    d = tiny_hf_dir(name)
    torch.manual_seed(0)
    batches = [torch.randint(3, 250, (2, 24)), torch.randint(3, 250, (1, 30))]
    model = load_rank_engine(str(d), Communicator(0, 1)).model
    rms, fisher, n = channel_statistics(model, batches)
    hr, hf, hn = _hf_statistics(d, batches)
    assert n == hn == 2 * 23 + 29
    assert sorted(rms) == sorted(hr) and len(rms) == 2 * model.cfg.num_layers
    for s in rms:
        assert torch.allclose(rms[s].double(), hr[s], rtol=1e-4, atol=1e-7), s
        assert torch.allclose(fisher[s].double(), hf[s], rtol=1e-3, atol=1e-12 * hf[s].max()), s
        assert fisher[s].max() > 0
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="TP 1"):
        def at_tp2(comm):
            return channel_statistics(load_rank_engine(str(d), comm).model, batches)
        try:
            run_simulated(at_tp2, 2)
        except Exception as e:  # the simulated rank's error is wrapped
            raise ValueError(str(e)) from None


def _calibrate(ckpt, text, out, capsys, *extra):
    return run_main("calibrate", ["--ckpt", ckpt, "--text", text, "--tp", "2", "--out", out,
                                  "--num-seqs", "8", "--seq-len", "48", "--no-progress",
                                  *extra], capsys)


def test_calibrate_writes_scales_and_evaluate_uses_them(planted_dir, text_file, tmp_path,  # noqa: F811
                                                        capsys):
    out = tmp_path / "w.safetensors"
    rc, err = _calibrate(planted_dir, text_file, out, capsys, "--scale-seqs", "4")
    assert rc == 0 and "channel scales from 4 windows" in err, err
    calib = load_calibration(str(out))
    assert calib.meta["channel_scales"]["num_seqs"] == 4
    assert calib.meta["channel_scales"]["exponents"] == [0.25, 0.5]
    rows = [s for s in calib.sites if s != "embed_tokens"]
    for s in rows:
        sc = calib.sites[s].channel_scale
        assert sc.shape == (64,) and (sc > 0).all()
    # The planted channels are ~30x wider: their scale is the smallest (rms^-1/2).
    sc = calib.sites["layers.1.mlp.down_proj"].channel_scale
    assert set(torch.argsort(sc)[:2].tolist()) == {5, 40}
    assert calib.sites["embed_tokens"].channel_scale is None

    js = tmp_path / "e.json"
    base = ["--ckpt", planted_dir, "--tp", "2", "--text", text_file, "--window", "32",
            "--max-tokens", "62", "--no-progress", "--json", js]
    rc, err = run_main("evaluate", base + ["--comm", "hadamard-int4:32", "--comm",
                                           "weighted-hadamard-int4:32", "--calibration", out],
                       capsys)
    assert rc == 0, err
    import json
    got = {r["codec"]: r for r in json.loads(js.read_text())["rows"]}
    assert got["weighted-hadamard-int4:32"]["bits_per_value"] == codec_bits("int4:32") == 5.0
    assert 0 < got["weighted-hadamard-int4:32"]["kl"] < 0.05

    # A file without scales (--scale-seqs 0) is refused by weighted- codecs, in one line.
    plain = tmp_path / "p.safetensors"
    assert _calibrate(planted_dir, text_file, plain, capsys, "--scale-seqs", "0")[0] == 0
    assert load_calibration(str(plain)).sites["layers.0.mlp.down_proj"].channel_scale is None
    js.unlink()
    rc, err = run_main("evaluate", base + ["--comm", "weighted-int8:32", "--calibration", plain],
                       capsys)
    assert rc == 1 and "no channel scales" in err and len(err.strip().splitlines()) == 1, err
    assert not js.exists()
    rc, err = run_main("evaluate", base + ["--comm", "weighted-int8:32"], capsys)
    assert rc == 1 and "needs a calibration file" in err, err


def test_calibrate_scale_flag_bad_input(planted_dir, text_file, tmp_path, capsys):  # noqa: F811
    bad = tmp_path / "bad.safetensors"
    for extra, msg in [(["--scale-seqs", "-1"], "--scale-seqs must be >= 0"),
                       (["--scale-seqs", "9"], "--scale-seqs 9 > --num-seqs 8")]:
        rc, err = _calibrate(planted_dir, text_file, bad, capsys, *extra)
        assert rc == 1 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()


def test_calibrate_with_shard_directory_skips_or_refuses_scales(planted_dir, text_file,  # noqa: F811
                                                               tmp_path, capsys):
    shards = tmp_path / "shards"
    rc, err = run_main("convert_hf_checkpoint", ["--hf-dir", planted_dir, "--tp", "2", "--out", shards],
                       capsys)
    assert rc == 0, err
    out = tmp_path / "s.safetensors"
    rc, err = _calibrate(shards, text_file, out, capsys)
    assert rc == 0 and "no channel scales" in err, err
    rc, err = _calibrate(shards, text_file, tmp_path / "x.safetensors", capsys, "--scale-seqs", "2")
    assert rc == 1 and "need the HF checkpoint" in err, err


def test_corrupt_channel_scale_is_refused(planted_dir, text_file, tmp_path, capsys):  # noqa: F811
    from safetensors import safe_open
    from safetensors.torch import save_file
    out = tmp_path / "w.safetensors"
    assert _calibrate(planted_dir, text_file, out, capsys, "--scale-seqs", "2")[0] == 0
    with safe_open(str(out), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["layers.0.mlp.down_proj.channel_scale"][3] = -1.0
    save_file(tensors, str(out), metadata=meta)
    with pytest.raises(CalibrationError, match="inconsistent"):
        load_calibration(str(out))


def _ef_two_reduces(comm, calib, xs, ef):
    from megatron_lite.comm.feedback import ErrorFeedbackCommunicator
    q = build_communicator(comm, "weighted-hadamard-int4:32", calibration=calib)
    c = ErrorFeedbackCommunicator(q) if ef else q
    y1 = c.all_reduce(xs[0][comm.rank], "layers.0.self_attn.o_proj")
    y2 = c.all_reduce(xs[1][comm.rank], "layers.0.mlp.down_proj")
    return y1, y2


def test_error_feedback_composes_with_weighting(tmp_path):
    """ef+weighted-*: the carried error is computed in the scaled domain and unscaled by the
    scheme's restore; the stream then carries (about) the last error only."""
    from megatron_lite.lab.calibration import build_calibration
    torch.manual_seed(4)
    w, h = 2, 128
    sites = ["layers.0.self_attn.o_proj", "layers.0.mlp.down_proj"]
    r = torch.full((w, h), 3.0)
    stats = {s: {"rs_min": -r, "rs_max": r, "ag_min": -r[0], "ag_max": r[0]} for s in sites}
    calib = build_calibration(stats, k=3, tp=w, model="toy", fingerprint="toy")
    scale = torch.logspace(-1, 1, h)[torch.randperm(h)]
    for s in sites:      # one scale for both (with unrelated scales the carry can grow)
        calib.sites[s].channel_scale = scale.clone()
    path = str(tmp_path / "w.safetensors")
    calib.save(path)
    calib = path
    xs = torch.randn(2, w, 4, h)
    ys = run_simulated(_ef_two_reduces, w, calib, xs, True)
    for other in ys[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other, ys[0]))
    exact = xs.sum(1)
    resid = (ys[0][0] + ys[0][1]) - exact.sum(0)
    plain = run_simulated(_ef_two_reduces, w, calib, xs, False)[0]
    resid_plain = (plain[0] + plain[1]) - exact.sum(0)
    assert resid.pow(2).mean() < 0.75 * resid_plain.pow(2).mean()
