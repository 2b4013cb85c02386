"""Quantized all-reduce (two-step and one-shot) on real gloo ranks (world sizes 2, 3, 4):
ranks bitwise identical, error within the analytic bound of the algorithm, equal bit for
bit to the thread simulation; plus CommSpec parsing and site resolution."""
import math

import pytest
import torch

from megatron_lite.comm.algorithms import Algo
from megatron_lite.comm.build import build_communicator
from megatron_lite.comm.calibration import CalibrationError
from megatron_lite.comm.codecs import CodecError, CodecSpec
from megatron_lite.comm.communicator import DistCommunicator
from megatron_lite.comm.router import QuantizedCommunicator, SiteCodecs
from megatron_lite.comm.simulate import make_thread_communicators, run_simulated
from megatron_lite.comm.spec import CommSpec, Path, format_comm, parse_comm
from megatron_lite.lab.calibration import build_calibration
from tests._dist import run_distributed

H = 192  # hidden size divisible by 2, 3 and 4
HOT = [5, 77, 150]
SITE = "layers.1.mlp.down_proj"
GROUP_SPECS = ["bf16", "int8:128", "int4:128", "int4-sym:64", "int3:32", "int2:256",
               "fp8:128", "int4-int8:128"]
OUTLIER_SPECS = ["outlier-int4", "outlier-int4:64"]
ONE_SHOT = ",algo=one-shot"
ONE_SHOT_SPECS = ["bf16", "int8:128", "int4:128", "int3:32", "fp8:128", "hadamard-int4:64",
                  "hadamard-int8:128", "outlier-int4", "outlier-int4:64"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cases():
    cases = []
    for spec in GROUP_SPECS:
        for dtype in DTYPES:
            for shape in [(1,), (3, 333), (2, 5, H)]:
                cases.append((spec, dtype, shape, None))
    for spec in OUTLIER_SPECS:
        for dtype in DTYPES:
            for shape in [(1, H), (7, H), (2, 3, H)]:
                cases.append((spec, dtype, shape, None))
    for spec in ONE_SHOT_SPECS:
        for dtype in DTYPES:
            shapes = [(1, H), (7, H)] if spec.startswith("outlier") else [(1,), (3, 333)]
            for shape in shapes:
                cases.append((spec + ONE_SHOT, dtype, shape, None))
    cases.append(("int4:128" + ONE_SHOT, torch.bfloat16, (3, 333), "nan"))
    # non-finite inputs on some ranks
    cases.append(("int4:128", torch.bfloat16, (3, 333), "nan"))
    cases.append(("int4-int8:64", torch.float16, (4, H), "nan"))
    cases.append(("outlier-int4", torch.bfloat16, (4, H), "nan"))
    return cases


def _input(case_id, rank, world, spec, dtype, shape, special):
    g = torch.Generator().manual_seed(7919 * case_id + rank)
    x = torch.randn(shape, generator=g)
    if shape[-1] == H:
        amp = torch.ones(H)
        amp[HOT] = 20.0
        x = x * amp
    x = x.to(dtype)
    if special == "nan" and rank == world - 1:
        x.view(-1)[7] = math.nan
    if special == "nan" and rank == 0:
        x.view(-1)[-3] = math.inf
    return x


def _calibration(world, path):
    amp = torch.ones(H)
    amp[HOT] = 20.0
    rs = 3.5 * amp.expand(world, H).clone()
    st = {"rs_min": -rs, "rs_max": rs,
          "ag_min": -3.5 * math.sqrt(world) * amp, "ag_max": 3.5 * math.sqrt(world) * amp}
    cal = build_calibration({SITE: st}, k=3, tp=world, model="toy", fingerprint="toy")
    cal.save(path)
    return path


def _body(comm, cases, calib):
    out = []
    for i, (spec, dtype, shape, special) in enumerate(cases):
        qc = build_communicator(comm, spec, calibration=calib if "outlier" in spec else None)
        x = _input(i, comm.rank, comm.world_size, spec, dtype, shape, special)
        out.append(qc.all_reduce(x, SITE))
    return out


def _dist_entry(rank, world, cases, calib):
    # numpy arrays of the bit patterns: plain pickles (torch tensors would travel through
    # shared memory that dies with the worker process)
    return [_bits(y).numpy() for y in _body(DistCommunicator(), cases, calib)]


def _bits(t):
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}[t.dtype])


def _out_rounding(bound, y):
    yd = y.double()
    if y.dtype == torch.bfloat16:
        bound = bound + yd.abs() * 2.0 ** -8 + 2.0 ** -134
    elif y.dtype == torch.float16:
        bound = bound + yd.abs() * 2.0 ** -11 + 2.0 ** -25
    return bound


def _one_shot_by_hand(scheme, xs, world, dtype):
    """The one-shot algorithm written out: every rank's encoded chunks, decoded and summed
    in rank order, then the scheme's finish. Returns (y, bound on |y - sum x|)."""
    chunks = [scheme.chunk(x, world) for x in xs]
    restore, c = chunks[0][1], chunks[0][0].shape[-1]
    dec = [torch.stack([scheme.rs_decode(scheme.rs_encode(ch, r)[j:j + 1].expand(world, -1),
                                         j, c)[r] for j in range(world)])
           for r, (ch, _) in enumerate(chunks)]
    acc = dec[0].clone()
    for r in range(1, world):
        acc += dec[r]
    y = restore(scheme.finish(acc, dtype))
    b = sum(scheme.rs_error_bound(ch, r).double() for r, (ch, _) in enumerate(chunks))
    # fp32 summation, and the unrotation of hadamard- sums: at most 2^-20 of the group's
    # L2 norm of the summed magnitudes (a quantization step is >= 2^-9 of it)
    mag = sum(d.double().abs() for d in dec)
    g = getattr(scheme, "group_size", None) or 1
    if mag.numel() % g == 0:
        mag = mag.reshape(-1, g).norm(dim=1, keepdim=True).expand(-1, g).reshape(acc.shape)
    bound = restore(b + mag * 2.0 ** -20)
    return y, _out_rounding(bound, y)


def _two_step_bound(scheme, xs, world, y):
    """|y - sum x| bound: RS error of every rank + fp32 summation + AG error + output."""
    chunks = [scheme.chunk(x, world) for x in xs]
    restore = chunks[0][1]
    c = chunks[0][0].shape[-1]
    sends = [scheme.rs_encode(ch, r) for r, (ch, _) in enumerate(chunks)]
    rs_eb = [scheme.rs_error_bound(ch, r) for r, (ch, _) in enumerate(chunks)]
    rows = []
    for j in range(world):
        parts = scheme.rs_decode(torch.stack([s[j] for s in sends]), j, c)
        acc = parts[0].clone()
        for r in range(1, world):
            acc += parts[r]
        b = sum(e[j].double() for e in rs_eb)
        b = b + (world - 1) * 2.0 ** -23 * parts.double().abs().sum(0)
        rows.append(b + scheme.ag_error_bound(acc, j).double())
    return _out_rounding(restore(torch.stack(rows)), y)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_two_step_gloo_matches_simulation_and_bound(world, tmp_path):
    cases = _cases()
    calib = _calibration(world, str(tmp_path / f"calib_tp{world}.safetensors"))
    real = [[torch.from_numpy(a).view(dtype) for a, (_, dtype, _, _) in zip(rank_out, cases)]
            for rank_out in run_distributed(_dist_entry, world, cases, calib)]
    sim = run_simulated(_body, world, cases, calib)
    for i, (spec, dtype, shape, special) in enumerate(cases):
        tag = (world, i, spec, dtype, shape, special)
        y = real[0][i]
        assert y.dtype == dtype and tuple(y.shape) == shape, tag
        for r in range(world):
            assert torch.equal(_bits(real[r][i]), _bits(y)), ("ranks differ",) + tag
            assert torch.equal(_bits(sim[r][i]), _bits(y)), ("simulation differs",) + tag
        xs = [_input(i, r, world, spec, dtype, shape, special) for r in range(world)]
        exact = sum(x.double() for x in xs)
        cfg = parse_comm(spec, calibration=calib if "outlier" in spec else None)
        sch = SiteCodecs(cfg).scheme_for(SITE)
        if cfg.algo == Algo.ONE_SHOT:
            want, bound = _one_shot_by_hand(sch, xs, world, dtype)
            assert torch.equal(_bits(want), _bits(y)), ("one-shot by hand differs",) + tag
        else:
            bound = _two_step_bound(sch, xs, world, y)
        fin = torch.isfinite(bound) & torch.isfinite(y)
        err = (y.double() - exact).abs()
        assert (err[fin] <= bound[fin]).all(), tag + ((err[fin] / bound[fin]).max().item(),)
        if special is None:
            assert fin.all(), tag
        else:  # the NaN/Inf spread stays inside whole groups, identical on every rank
            assert not fin.all() and fin.float().mean() > 0.5, tag
            if not spec.startswith("outlier"):
                g = sch.ag.group_size
                bad = sch.chunk((~fin).float(), world)[0].reshape(-1, g).sum(1)
                real_n = sch.chunk(torch.ones(shape), world)[0].reshape(-1, g).sum(1)
                assert ((bad == 0) | (bad == real_n)).all(), tag  # zero padding aside


def test_int8_error_is_small_and_bf16_is_near_exact(tmp_path):
    """Sanity on magnitudes at W=4 on Gaussian data. int8:128: step ~ absmax/127 ~ 0.022
    per rank, so RS noise sqrt(4 * 0.022^2/12) + AG noise (step ~ 0.047) give ~0.95% of
    the sum's rms (2.0); the bf16 wire adds ~2^-9 relative."""
    def body(comm):
        g = torch.Generator().manual_seed(comm.rank)
        x = torch.randn(4096, generator=g)
        return x, build_communicator(comm, "int8:128").all_reduce(x, SITE), \
            build_communicator(comm, "bf16").all_reduce(x, SITE)
    res = run_simulated(body, 4)
    exact = sum(r[0] for r in res)
    rel8 = ((res[0][1] - exact).norm() / exact.norm()).item()
    rel16 = ((res[0][2] - exact).norm() / exact.norm()).item()
    assert 5e-3 < rel8 < 1.3e-2 and rel16 < 3e-3 and rel16 < rel8 / 3


def test_one_shot_halves_the_error_power_of_two_step():
    """One quantization per value instead of two: for W uncorrelated partials the
    two-step error is the reduce-scatter part (W partials) plus an all-gather part of
    about the same power; one-shot has the first only. Measured ratio ~0.5 at W = 4."""
    def body(comm, spec):
        g = torch.Generator().manual_seed(100 + comm.rank)
        x = torch.randn(64, 640, generator=g)
        return x, build_communicator(comm, spec).all_reduce(x, SITE)
    ratios = {}
    for spec in ["int4:128", "hadamard-int4:128", "int8:128"]:
        two = run_simulated(body, 4, spec)
        one = run_simulated(body, 4, spec + ONE_SHOT)
        exact = sum(r[0].double() for r in two)
        mse = lambda res: (res[0][1].double() - exact).pow(2).mean().item()  # noqa: E731
        ratios[spec] = mse(one) / mse(two)
    assert all(0.35 < r < 0.65 for r in ratios.values()), ratios


def test_one_shot_explain_names_the_algorithm():
    base = make_thread_communicators(1)[0]
    qc = build_communicator(base, "int4:128,algo=one-shot")
    assert qc.spec.algo == Algo.ONE_SHOT
    assert qc.explain(torch.zeros(1000), SITE).split("; transport ")[0] == "one-shot with int4:128"   # portable path


def test_one_shot_bf16_keeps_inf_like_two_step():
    """The bf16 wire carries Inf verbatim; one-shot's finish must keep it (not saturate
    it to the largest finite value), as two-step does."""
    def body(comm, spec):
        x = torch.full((4, 64), 1.0 + comm.rank)
        if comm.rank == 1:
            x[2, 5], x[3, 7] = math.inf, -math.inf
        return build_communicator(comm, spec).all_reduce(x.to(torch.bfloat16), SITE)
    for spec in ("bf16", "bf16,algo=one-shot"):
        y = run_simulated(body, 2, spec)[0].float()
        assert y[2, 5] == math.inf and y[3, 7] == -math.inf, spec
        assert (y[:2] == 3.0).all(), spec


# ----------------------------------------------------------------------------- config
def test_parse_comm_and_site_resolution():
    cfg = parse_comm("int4:128,layers.0.*=int8,layers.-1.*=native,*.o_proj=int8:64,"
                     "min_bytes=64KiB")
    assert cfg.min_bytes == 65536
    sites = SiteCodecs(cfg, num_layers=4)
    spec_for = lambda s: None if sites.codec_for(s) is None else str(sites.codec_for(s))  # noqa
    assert spec_for("layers.0.mlp.down_proj") == "int8:128"     # first match wins
    assert spec_for("layers.3.mlp.down_proj") is None           # layers.-1 -> native
    assert spec_for("layers.2.self_attn.o_proj") == "int8:64"
    assert spec_for("layers.2.mlp.down_proj") == "int4:128"
    assert spec_for("embed_tokens") is None                     # embedding stays native
    assert spec_for(None) is None
    assert str(cfg) == ("int4:128,layers.0.*=int8:128,layers.-1.*=native,*.o_proj=int8:64,"
                        "min_bytes=65536")
    assert parse_comm(str(cfg)) == cfg
    with pytest.raises(CodecError, match="needs num_layers"):
        SiteCodecs(parse_comm("int4,layers.-1.*=int8"))
    emb = SiteCodecs(parse_comm("native,embed_tokens=int8"))
    assert str(emb.codec_for("embed_tokens")) == "int8:128" and emb.codec_for(SITE) is None
    assert str(SiteCodecs(parse_comm("int6")).codec_for(SITE)) == "int4-int8:128"
    typed = CommSpec(codec=CodecSpec("int4", 128),
                     overrides=(("*.down_proj", CodecSpec("int2", 32)),))
    assert str(SiteCodecs(typed).codec_for(SITE)) == "int2:32"
    assert cfg.path == Path.AUTO                                # default: size chooser
    forced = parse_comm("weighted-hadamard-int8:128,path=Fused", calibration="c.st")
    assert forced.path == Path.FUSED
    assert str(forced) == "weighted-hadamard-int8:128,path=fused,calibration=c.st"
    assert format_comm(forced, with_calibration=False) == "weighted-hadamard-int8:128,path=fused"
    assert parse_comm(str(forced)) == forced
    assert parse_comm("int4,path=two-step").path == Path.TWO_STEP
    assert cfg.algo == Algo.TWO_STEP                            # default algorithm
    one = parse_comm("hadamard-int4:128,algo=One-Shot,path=two-step")
    assert one.algo == Algo.ONE_SHOT
    assert str(one) == "hadamard-int4:128,path=two-step,algo=one-shot"
    assert parse_comm(str(one)) == one
    # auto is the chooser's keyword, not the bf16 codec (whose wire format it shares)
    assert parse_comm("auto") != parse_comm("bf16") and str(parse_comm("auto")) == "auto"
    assert parse_comm("auto").codecs() == parse_comm("bf16").codecs()
    assert parse_comm("none").is_native
    ef = parse_comm("ef+hadamard-int4:128,algo=one-shot")
    assert ef.error_feedback and parse_comm(str(ef)) == ef


@pytest.mark.parametrize("spec,msg", [
    ("int9", "unknown codec"), ("int4:100", "does not fit"), ("layers.0.*=int8", "must start"),
    ("int4,layers.0.*", "expected GLOB=CODEC"), ("int4,*.o_proj=int7", "unknown codec"),
    ("int4,min_bytes=lots", "bad size"), ("int4,=int8", "empty site pattern"),
    ("outlier-int4", "needs a calibration file"), ("int4,path=fast", "expected one of auto"),
    ("int4,path", "budget=site|model or calibration=FILE"), ("int4,algo=ring", "expected one of two-step"),
    ("int6,algo=one-shot", "two-stage codec"),
    ("int8,*.o_proj=hadamard-int4-int8:64,algo=one-shot", "two-stage codec"),
    ("int4,path=fused,algo=one-shot", "path=fused runs the fused two-shot kernel"),
])
def test_bad_comm_args(spec, msg):
    with pytest.raises(CodecError, match=msg):
        parse_comm(spec)


def test_build_communicator_and_routing(tmp_path):
    base = make_thread_communicators(1)[0]
    assert build_communicator(base, None) is base
    assert build_communicator(base, "native") is base
    qc = build_communicator(base, "int4:128,min_bytes=1KiB")
    assert isinstance(qc, QuantizedCommunicator)
    assert qc.explain(torch.zeros(1000), SITE).split("; transport ")[0] == "two-step with int4:128"
    assert qc.explain(torch.zeros(100), SITE).startswith("native: 400 B < min_bytes")
    assert qc.explain(torch.zeros(1000), "embed_tokens").split("; transport ")[0] == "native: no codec for this site"

    def body(comm):  # below threshold and the embedding go through the plain fp32 sum
        x = torch.full((100,), 0.1 * (comm.rank + 1))
        small = comm.all_reduce(x, SITE)
        big = comm.all_reduce(torch.full((1000,), 0.1 * (comm.rank + 1)), SITE)
        return small, big
    res = run_simulated(body, 3, wrap=lambda c: build_communicator(c, "int2:32,min_bytes=1KiB"))
    exact = torch.tensor(0.1) + torch.tensor(0.2) + torch.tensor(0.30000001192092896)
    assert torch.equal(res[0][0], torch.full((100,), exact.item()))
    assert torch.equal(res[0][1], res[2][1])

    path = _calibration(2, str(tmp_path / "c2.safetensors"))
    threes = make_thread_communicators(3)
    with pytest.raises(CalibrationError, match="made for TP 2"):
        build_communicator(threes[0], "outlier-int4", calibration=path)
    twos = make_thread_communicators(2)
    with pytest.raises(CalibrationError, match="made for model 'toy'"):
        build_communicator(twos[0], "outlier-int4", calibration=path,
                           hf_config={"model_type": "llama", "hidden_size": H})
    qc = build_communicator(twos[0], "outlier-int4", calibration=path)
    with pytest.raises(CalibrationError, match="no site"):
        qc.sites.scheme_for("layers.9.mlp.down_proj")


def test_kernel_backends_prepare_one_launch_per_kind_of_message():
    """comm/fused.py's ``Launchers``: a kernel backend works out a launch once per
    (shape, dtype, scheme) and reuses it for every later message of that kind, and only
    for that kind."""
    from megatron_lite.comm.codecs import get_scheme
    from megatron_lite.comm.fused import Launchers
    made, launchers = [], Launchers()
    a, b = get_scheme("int4:128"), get_scheme("int8:128")
    x = torch.zeros(4, 256)

    def make(tag):
        def prepare():
            made.append(tag)
            return lambda t: tag
        return prepare
    assert launchers.get(x, a, make("a"))(x) == "a"
    assert launchers.get(torch.ones(4, 256), a, make("again"))(x) == "a"   # same kind
    assert launchers.get(x, b, make("b"))(x) == "b"
    assert launchers.get(x.to(torch.bfloat16), a, make("bf16"))(x) == "bf16"
    assert launchers.get(torch.zeros(2, 256), a, make("shape"))(x) == "shape"
    assert launchers.get(x, None, make("no scheme"))(x) == "no scheme"
    assert made == ["a", "b", "bf16", "shape", "no scheme"]
