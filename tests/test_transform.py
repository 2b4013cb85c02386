"""klt codecs (comm/codecs/klt.py, calibration: lab/transform.py): per-rank calibrated
transform coding, one-shot only, with an exact (thread- and BLAS-independent) product.

Tables come from TransformStats on synthetic low-rank partial sums (as a row-parallel
shard's partials are: x_r = a_r B_r with a narrow B_r), or from the real calibrate CLI
on a tiny model.
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from megatron_lite.comm.algorithms import one_shot_all_reduce, two_step_all_reduce
from megatron_lite.comm.build import build_communicator
from megatron_lite.comm.calibration import CalibrationError, load_calibration
from megatron_lite.comm.codecs import CodecError, CodecSpec, GroupCodec, codec_bits, parse_codec_spec
from megatron_lite.comm.codecs.klt import (MAX_BITS, TransformScheme, allocate, exact_matmul,
                                           model_budgets)
from megatron_lite.comm.feedback import ErrorFeedbackCommunicator
from megatron_lite.comm.router import SiteCodecs
from megatron_lite.comm.simulate import run_simulated
from megatron_lite.comm.spec import format_comm, parse_comm
from megatron_lite.lab.transform import TransformStats, basis, coefficient_weight, loss_scale
from tests._dist import run_distributed
from tests.test_calibrate import planted_dir, run_main, text_file  # noqa: F401  (fixtures)

H = 128
SITES = ("layers.0.self_attn.o_proj", "layers.0.mlp.down_proj")


def _sampler(world, seed=0):
    """Per-rank partial sums of rank 12 + 8 r, with a decaying spectrum (row-parallel
    shards' partials live in their weight's column space)."""
    g = torch.Generator().manual_seed(seed)
    mix = [torch.randn(12 + 8 * r, H, generator=g)
           * torch.linspace(3.0, 0.2, 12 + 8 * r)[:, None] for r in range(world)]

    def sample(rows):
        return [torch.randn(rows, m.shape[0], generator=g) @ m for m in mix]
    return sample


def _tables(world, groups=(32, 64), seed=0):
    sample = _sampler(world, seed)
    st = TransformStats(world, groups)
    for site in SITES:
        for r, x in enumerate(sample(400)):
            st.update(site, r, x)
    fisher = torch.rand(H, generator=torch.Generator().manual_seed(seed + 1)) + 0.05
    st.make_bases({s: fisher for s in SITES})
    for site in SITES:
        for r, x in enumerate(sample(200)):
            st.update(site, r, x)
    return st, sample, fisher


def _scheme(spec, st, site=SITES[0]):
    d, q, errs, _ = st.tables(site)
    cs = parse_codec_spec(spec)
    return TransformScheme(cs, d, q, errs[cs.group_size])


def _own_error(sch, x, rank):
    """Rank ``rank``'s error part of the one-shot sum of message ``x``, in x's layout."""
    chunks, restore = sch.chunk(x, sch.world_size)
    return restore(sch.own_error(chunks, None, rank))


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_exact_product_is_the_same_on_any_thread_count_and_blocking(restore_threads):
    """exact_matmul's slice products are exact in fp64, so neither the BLAS's blocking nor
    the thread count can change a bit: the whole product, row by row and column by column,
    on 1, 2 and 4 threads, are equal; and it is the correctly rounded product to within
    the dropped tail (2^-42 of a row's max)."""
    g = torch.Generator().manual_seed(5)
    for m, k, n in [(300, 640, 200), (37, 96, 640), (5, 2048, 64)]:
        a = torch.randn(m, k, generator=g) * torch.logspace(-6, 6, k)
        b = torch.randn(k, n, generator=g) / k ** 0.5
        outs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(exact_matmul(a, b))
            outs.append(torch.cat([exact_matmul(a[i:i + 7], b) for i in range(0, m, 7)]))
        outs.append(torch.cat([exact_matmul(a, b[:, j:j + 5]) for j in range(0, n, 5)], 1))
        for o in outs[1:]:
            assert torch.equal(o, outs[0]), (m, k, n)
        ref = a.double() @ b.double()
        tail = a.double().abs().amax(1, keepdim=True) * b.double().abs().sum(0) * 2.0 ** -40
        assert ((outs[0].double() - ref).abs() <= ref.abs() * 2.0 ** -24 + tail).all()
    # non-finite rows stay non-finite, the others are untouched
    a = torch.randn(3, 64, generator=g)
    a[1, 5] = float("nan")
    a[2, 0] = float("inf")
    y = exact_matmul(a, torch.randn(64, 8, generator=g))
    assert torch.isnan(y[1:]).all() and torch.isfinite(y[0]).all()


def test_klt_bytes_and_sums_do_not_depend_on_the_thread_count(restore_threads):
    st, sample, _ = _tables(2, seed=11)
    sch = _scheme("klt4:32", st)
    xs = sample(40)
    got = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        bufs = [sch.encode_partial(x, r) for r, x in enumerate(xs)]
        got.append((bufs, [sch.decode_partial(b, r) for r, b in enumerate(bufs)]))
    for bufs, dec in got[1:]:
        assert all(torch.equal(a, b) for a, b in zip(bufs, got[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(dec, got[0][1]))


# --------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("bits", [1, 6, 7])
def test_group_codec_bit_planes_for_6_and_7_bits(bits):
    c = GroupCodec(f"int{bits}", bits, "asym", 32)
    x = torch.randn(3, 256) * 5
    buf = c.encode(x)
    assert buf.dtype == torch.uint8 and buf.shape == (3, 256 * bits // 8 + 2 * 2 * 8)
    y = c.decode(buf, 256)
    assert ((y - x).abs() <= c.error_bound(x)).all()
    assert c.bits_per_value == bits + 1.0
    # layout: bit planes of 4, 2 and 1 bits, low bits first, each packed LSB-first
    # (golden bytes worked out by hand)
    q, golden = {1: ([1, 0, 0, 1, 1, 0, 1, 0], [0x59]),
                 6: ([63, 1, 2, 3, 4, 5, 6, 7], [0x1F, 0x32, 0x54, 0x76, 0x03, 0x00]),
                 7: ([127, 1, 2, 3, 4, 5, 6, 64],
                     [0x1F, 0x32, 0x54, 0x06, 0x03, 0x00, 0x81])}[bits]
    q = torch.tensor([q], dtype=torch.int32)
    assert c._pack(q).tolist() == [golden]
    assert torch.equal(c._unpack(torch.tensor([golden], dtype=torch.uint8), 8), q)


def test_basis_is_orthonormal_sorted_and_signed():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(500, 24, generator=g) @ torch.randn(24, H, generator=g)
    cov = (a.T.double() @ a.double()) / 500
    d = coefficient_weight(torch.rand(H, generator=g))
    q = basis(cov, d)
    assert torch.allclose(q.T @ q, torch.eye(H), atol=1e-5)
    lam = torch.diagonal(q.double().T @ (cov * d.double()[:, None] * d.double()) @ q.double())
    assert (lam[1:] <= lam[:-1] + 1e-9 * lam[0]).all()
    assert lam[24:].max() < 1e-9 * lam[0]                      # rank 24: the rest is empty
    top = q.abs().argmax(0)
    assert (q[top, torch.arange(H)] > 0).all()
    # weight: geometric mean 1, floor and range
    w = coefficient_weight(torch.tensor([0.0, 1.0, 4.0, 16.0]))
    assert abs(float(w.log().mean())) < 1e-6 and (w > 0).all()
    with pytest.raises(CodecError, match="non-negative"):
        coefficient_weight(torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize("group", [32, 64, 128])
def test_allocation_is_the_exact_knapsack_optimum(group):
    torch.manual_seed(group)
    for _ in range(30):
        ng = 3
        e = torch.rand(ng, MAX_BITS + 1).cumsum(1).flip(1) * torch.rand(ng, 1) * 10
        e[:, 1] = e[:, 0] * torch.rand(ng) * 2                 # 1 bit may be worse than 0
        budget = float(torch.rand(1) * 6 + 0.5)
        bits = allocate(e, group, budget)

        def cost(bb):
            return sum(0 if b == 0 else group * b + 32 for b in bb)
        assert cost(bits) <= budget * ng * group
        opt = min(sum(float(e[g, b]) for g, b in enumerate(bb))
                  for bb in itertools.product(range(MAX_BITS + 1), repeat=ng)
                  if cost(bb) <= budget * ng * group)
        got = sum(float(e[g, b]) for g, b in enumerate(bits))
        assert got <= opt * (1 + 1e-12) + 1e-12


def _site_curve(errors, group, units):
    """Least summed error of a site's ranks at a cap of ``units`` 32-bit units (brute force)."""
    w, ng, _ = errors.shape
    tot = 0.0
    for r in range(w):
        tot += min(sum(float(errors[r, g, b]) for g, b in enumerate(bb))
                   for bb in itertools.product(range(MAX_BITS + 1), repeat=ng)
                   if sum(0 if b == 0 else (group * b + 32) // 32 for b in bb) <= units)
    return tot


def test_model_budgets_are_the_exact_optimum_over_sites():
    """Three sites (TP 2, two groups of 32 each): model_budgets' split of the summed
    budget equals the brute-force optimum over every split, stays within the budget, and
    keeps a 2-bit group per site; a site whose errors weigh more (its loss scale) gets
    more bits."""
    group, budget = 32, 3.25
    g = torch.Generator().manual_seed(3)
    for trial in range(4):
        tables = {}
        for i in range(3):
            e = torch.rand(2, 2, MAX_BITS + 1, generator=g).cumsum(-1).flip(-1).double()
            e = e * 4.0 ** -torch.arange(MAX_BITS + 1, dtype=torch.float64)  # ~4x per bit
            tables[f"layers.{i}.mlp.down_proj"] = (e, float(10 ** (3 * torch.rand(1, generator=g))))
        got = model_budgets(tables, group, budget)
        units = {s: round(b * 64 / 32) for s, b in got.items()}      # H = 64
        assert all(abs(got[s] * 64 / 32 - units[s]) < 1e-9 for s in got)
        total = int(budget * 64 / 32) * 3
        assert sum(units.values()) <= total and min(units.values()) >= (2 * group + 32) // 32
        names = sorted(tables)
        curves = {s: [_site_curve(tables[s][0], group, u) * tables[s][1]
                      for u in range(total + 1)] for s in names}
        best = min(sum(curves[s][u] for s, u in zip(names, us))
                   for us in itertools.product(range(3, total + 1), repeat=3)
                   if sum(us) <= total)
        mine = sum(curves[s][units[s]] for s in names)
        assert mine <= best * (1 + 1e-9), (trial, mine, best)
    # scale one site's errors up: its share grows, the others' shrink or stay
    base = model_budgets(tables, group, budget)
    heavy = dict(tables)
    s0 = names[0]
    heavy[s0] = (tables[s0][0], tables[s0][1] * 1e4)
    more = model_budgets(heavy, group, budget)
    assert more[s0] > base[s0] and all(more[s] <= base[s] for s in names[1:])
    with pytest.raises(CodecError, match="below one 2-bit group"):
        model_budgets(tables, group, 0.5)
    # the loss scale: F = scale * d**2 (d normalised to geometric mean 1)
    f = torch.rand(64, generator=g) + 0.01
    assert torch.allclose(loss_scale(f) * coefficient_weight(f).double() ** 2, f.double(),
                          rtol=1e-5)


# --------------------------------------------------------------------------- the codec
def test_scheme_bits_layout_and_gain_over_a_group_codec():
    st, sample, fisher = _tables(2)
    sch = _scheme("klt4:32", st)
    assert sch.bits_per_value <= 4.25 and sch.bits_per_value == 8 * sch.row_bytes / H
    assert codec_bits("klt4:32") == 4.25 and codec_bits("klt3:64") == 3.25
    # the low-energy tail gets no bits; the top groups more than 4
    for r in range(2):
        assert sch.bits[r][0] > 4 and sch.bits[r][-1] == 0, sch.bits
    xs = sample(64)
    int4 = GroupCodec("int4", 4, "asym", 128)                  # the same 4.25 bits/value
    for r, x in enumerate(xs):
        buf = sch.encode_partial(x.reshape(4, 16, H), r)
        assert buf.dtype == torch.uint8 and buf.shape == (64, sch.row_bytes)
        y = sch.decode_partial(buf, r)
        e_klt = ((y - x) ** 2 * fisher).sum()
        e_int4 = ((int4.decode(int4.encode(x), H) - x) ** 2 * fisher).sum()
        assert e_klt < 0.1 * e_int4, (r, float(e_klt / e_int4))
        err = _own_error(sch, x, r)
        assert torch.equal(err, y - x)


def test_non_finite_rows_stay_loud_and_alone():
    st, sample, _ = _tables(2)
    sch = _scheme("klt4:64", st)
    x = sample(4)[1].clone()
    x[1, 7] = float("nan")
    x[2, 0] = float("inf")
    y = sch.decode_partial(sch.encode_partial(x, 1), 1)
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all()
    assert torch.isfinite(y[[0, 3]]).all()
    err = _own_error(sch, x, 1)
    assert torch.isfinite(err).all() and (err[1] == 0).all()


def _one_shot(comm, sch, xs, dtype):
    return one_shot_all_reduce(comm, xs[comm.rank].to(dtype), sch)


def _one_shot_real(rank, world, sch, xs, dtype):
    from megatron_lite.comm.communicator import DistCommunicator
    return _one_shot(DistCommunicator(), sch, xs, dtype)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_one_shot_gloo_equals_simulation_and_the_definition(world):
    st, sample, _ = _tables(world, seed=world)
    sch = _scheme("klt4:32", st)
    xs = torch.stack(sample(10)).reshape(world, 2, 5, H)
    empty = run_simulated(_one_shot, world, sch, xs[:, :, :0], torch.float16)
    assert all(y.shape == (2, 0, H) and y.dtype == torch.float16 for y in empty)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sim = run_simulated(_one_shot, world, sch, xs, dtype)
        real = run_distributed(_one_shot_real, world, sch, xs, dtype)
        acc = sch.decode_partial(sch.encode_partial(xs[0].to(dtype), 0), 0)
        for r in range(1, world):
            acc = acc + sch.decode_partial(sch.encode_partial(xs[r].to(dtype), r), r)
        want = acc.to(dtype).reshape(2, 5, H)
        for y in sim + real:
            assert y.dtype == dtype and torch.equal(y, want)
        exact = xs.sum(0)
        assert (want.float() - exact).norm() < 0.05 * exact.norm()


def test_uneven_ranks_pad_and_a_dead_rank_still_carries_nan():
    """Ranks with different row lengths pad to the longest in the all-gather; a rank whose
    calibration saw only zeros keeps one 2-bit group, so its NaN stays loud."""
    st, sample, _ = _tables(3, seed=9)
    d, q, errs, _ = st.tables(SITES[0])
    e = errs[32].clone()
    e[1] *= torch.tensor([1.0, 1e-6, 1e-6, 1e-6]).double()[:, None].float()  # little to code
    e[2] = 0.0                                                   # a dead shard
    sch = TransformScheme(parse_codec_spec("klt4:32"), d, q, e)
    nbytes = [sum(c.encoded_nbytes(n) for c, n in sch._parts[r]) for r in range(3)]
    assert len(set(nbytes)) == 3 and sch.bits[2] == [2, 0, 0, 0], (nbytes, sch.bits)
    xs = torch.stack(sample(6))
    xs[2] = 0.0
    xs[2, 4, 3] = float("nan")
    ys = run_simulated(_one_shot, 3, sch, xs, torch.float32)
    want = sum(sch.decode_partial(sch.encode_partial(xs[r], r), r) for r in range(3))
    for y in ys:
        assert torch.equal(torch.nan_to_num(y, nan=7.0), torch.nan_to_num(want, nan=7.0))
    assert torch.isnan(ys[0][4]).all() and torch.isfinite(ys[0][[0, 1, 2, 3, 5]]).all()


def test_config_and_scheme_refusals(tmp_path):
    st, sample, _ = _tables(2)
    sch = _scheme("klt4:32", st)
    with pytest.raises(CodecError, match="needs algo=one-shot"):
        parse_comm("klt4:64", calibration="x.safetensors")
    with pytest.raises(CodecError, match="needs a calibration file"):
        parse_comm("klt4:64,algo=one-shot")
    with pytest.raises(CodecError, match="budget=model .* needs a klt codec"):
        parse_comm("int4:64,budget=model")
    with pytest.raises(CodecError, match="budget='bits': expected one of site, model"):
        parse_comm("klt4:64,algo=one-shot,budget=bits", calibration="x.safetensors")
    cfg = parse_comm("klt4:64,algo=one-shot,budget=model", calibration="x.safetensors")
    assert format_comm(cfg, with_calibration=False) == "klt4:64,algo=one-shot,budget=model"
    with pytest.raises(CodecError, match="unknown codec"):
        parse_codec_spec("klt9")
    with pytest.raises(CodecError, match="channels"):
        sch.encode_partial(torch.randn(2, 64), 0)
    with pytest.raises(Exception, match="calibrated for TP 2, the group has 3 ranks"):
        run_simulated(_one_shot, 3, sch, torch.randn(3, 2, H), torch.float32)
    with pytest.raises(Exception, match="needs algo=one-shot"):
        run_simulated(lambda c: two_step_all_reduce(c, torch.randn(2, H), sch), 2)
    d, q, errs, _ = st.tables(SITES[0])
    with pytest.raises(CodecError, match="does not divide"):
        TransformScheme(CodecSpec("klt4", 256), d, q, errs[32])


# --------------------------------------------------------------------- the real tools
def _two_sites(comm, spec, calib, xs):
    c = build_communicator(comm, spec, calibration=calib)
    c.all_reduce(xs[0][comm.rank], "embed_tokens")
    return [c.all_reduce(xs[i + 1][comm.rank], s) for i, s in enumerate(SITES_TINY)]


def _two_sites_real(rank, world, spec, calib, xs):
    from megatron_lite.comm.communicator import DistCommunicator
    return _two_sites(DistCommunicator(), spec, calib, xs)


SITES_TINY = ("layers.0.self_attn.o_proj", "layers.0.mlp.down_proj")


def test_calibrate_transform_then_evaluate_and_feedback(planted_dir, text_file, tmp_path,  # noqa: F811
                                                         capsys):
    out = tmp_path / "klt.safetensors"
    common = ["--ckpt", planted_dir, "--text", text_file, "--tp", "2", "--num-seqs", "8",
              "--seq-len", "48", "--no-progress", "--scale-seqs", "4"]
    rc, err = run_main("calibrate", common + ["--out", out, "--transform",
                                              "--transform-seqs", "4"], capsys)
    assert rc == 0, err
    calib = load_calibration(str(out))
    assert calib.meta["transform"]["table_seqs"] == 4
    sc = calib.sites["layers.1.mlp.down_proj"]
    assert sc.klt_basis.shape == (2, 64, 64) and sorted(sc.klt_errors) == [32, 64]
    assert torch.allclose(sc.klt_basis[0].T @ sc.klt_basis[0], torch.eye(64), atol=1e-5)
    assert calib.sites["embed_tokens"].klt_basis is None
    assert calib.meta["transform"]["groups"] == [32, 64]          # the sizes dividing 64
    scales = {s: c.klt_loss_scale for s, c in calib.sites.items() if c.klt_basis is not None}
    assert len(scales) == 6 and all(0 < v < float("inf") for v in scales.values())

    # corrupt tables are refused at load, in one line naming the site and the problem
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(out), framework="pt") as f:
        meta, tens = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    site = "layers.0.mlp.down_proj"
    nan_err = dict(tens)
    nan_err[f"{site}.klt_errors_g32"] = tens[f"{site}.klt_errors_g32"].clone()
    nan_err[f"{site}.klt_errors_g32"][0, 0, 3] = float("nan")
    inf_w = dict(tens)
    inf_w[f"{site}.klt_weight"] = tens[f"{site}.klt_weight"].clone()
    inf_w[f"{site}.klt_weight"][5] = float("inf")
    no_err = {k: v for k, v in tens.items() if not k.startswith(f"{site}.klt_errors")}
    bad_key = dict(no_err)
    bad_key[f"{site}.klt_errors_g48"] = tens[f"{site}.klt_errors_g32"]
    neg_scale = dict(tens)
    neg_scale[f"{site}.klt_loss_scale"] = -tens[f"{site}.klt_loss_scale"]
    for i, (t, msg) in enumerate([(nan_err, "group size 32 is not finite"),
                                  (inf_w, "klt_weight is missing or not a finite"),
                                  (no_err, "klt tables incomplete"),
                                  (bad_key, "names no group size"),
                                  (neg_scale, "klt_loss_scale is not one finite positive")]):
        path = tmp_path / f"corrupt{i}.safetensors"
        save_file(t, str(path), metadata=meta)
        with pytest.raises(CalibrationError, match=msg):
            load_calibration(str(path))

    # bad input: one line, nothing written
    bad = tmp_path / "bad.safetensors"
    for extra, msg in [(["--transform", "--scale-seqs", "0"], "--transform needs channel"),
                       (["--transform", "--transform-seqs", "0"], "--transform-seqs")]:
        rc, err = run_main("calibrate", common + ["--out", bad] + extra, capsys)
        assert rc == 1 and msg in err and len(err.strip().splitlines()) == 1, err
        assert not bad.exists()

    js = tmp_path / "e.json"
    base = ["--ckpt", planted_dir, "--tp", "2", "--text", text_file, "--window", "32",
            "--max-tokens", "124", "--no-progress", "--json", js, "--calibration", out]
    rc, err = run_main("evaluate", base + ["--comm", "int4:64,algo=one-shot",
                                           "--comm", "klt4:32,algo=one-shot",
                                           "--comm", "ef+klt4:32,algo=one-shot",
                                           "--comm", "klt4:32,algo=one-shot,budget=model"],
                       capsys)
    assert rc == 0, err
    rows = {r["codec"]: r for r in json.loads(js.read_text())["rows"]}
    k4 = rows["klt4:32,algo=one-shot"]
    assert 3.5 <= k4["bits_per_value"] <= 4.25      # hidden 64: two groups of 32
    assert k4["kl"] < 0.05 * rows["int4:64,algo=one-shot"]["kl"]
    # measured: int4:64 one-shot 0.187, klt4:32 0.0032, ef+klt4:32 0.0024
    assert 0 < rows["ef+klt4:32,algo=one-shot"]["kl"] < k4["kl"]
    # budget=model: the run's mean stays within the budget, the sites' shares differ,
    # and the predicted (table) loss is no more than with one budget per site
    km = rows["klt4:32,algo=one-shot,budget=model"]
    assert km["bits_per_value"] <= 4.25 and km["kl"] > 0
    cfg_m = SiteCodecs(parse_comm("klt4:32,algo=one-shot,budget=model", calibration=str(out)))
    cfg_s = SiteCodecs(parse_comm("klt4:32,algo=one-shot", calibration=str(out)))
    shares = cfg_m.model_budgets(parse_codec_spec("klt4:32"))
    assert len(shares) == 6 and len(set(shares.values())) > 1
    assert sum(shares.values()) / 6 <= 4.25 + 1e-9

    def predicted(cfg):
        tot = 0.0
        for s in shares:
            sch, sc = cfg.scheme_for(s), calib.sites[s]
            tot += sc.klt_loss_scale * sum(float(sc.klt_errors[32][r, g, b])
                                           for r in range(2) for g, b in enumerate(sch.bits[r]))
        return tot
    assert predicted(cfg_m) <= predicted(cfg_s)

    # A file without tables is refused in one line; two-step is refused.
    plain = tmp_path / "plain.safetensors"
    assert run_main("calibrate", common + ["--out", plain], capsys)[0] == 0
    js.unlink()
    rc, err = run_main("evaluate", base[:-1] + [plain, "--comm", "klt4:64,algo=one-shot"],
                       capsys)
    assert rc == 1 and "no transform tables" in err and len(err.strip().splitlines()) == 1, err
    rc, err = run_main("evaluate", base + ["--comm", "klt4:64"], capsys)
    assert rc == 1 and "needs algo=one-shot" in err, err
    assert not js.exists()
    cfg = SiteCodecs(parse_comm("klt4:128,algo=one-shot", calibration=str(out)))
    with pytest.raises(CalibrationError, match="no transform tables for group size 128"):
        cfg.scheme_for("layers.0.mlp.down_proj")
    # budget=model with a file from before the loss scales: one line, nothing written
    old = tmp_path / "old.safetensors"
    save_file({k: v for k, v in tens.items() if not k.endswith("klt_loss_scale")}, str(old),
              metadata=meta)
    rc, err = run_main("evaluate", base[:-1] + [old, "--comm",
                                                "klt4:32,algo=one-shot,budget=model"], capsys)
    assert rc == 1 and "budget=model needs" in err and "rerun tools/calibrate.py" in err, err
    assert len(err.strip().splitlines()) == 1 and not js.exists()

    # Real gloo ranks equal simulated ranks bit for bit, with and without feedback; the
    # feedback's second reduce pays the first one's error.
    torch.manual_seed(0)
    xs = torch.randn(3, 2, 6, 64)
    for spec in ("klt4:32,algo=one-shot", "ef+klt4:32,algo=one-shot",
                 "klt4:32,algo=one-shot,budget=model"):
        sim = run_simulated(_two_sites, 2, spec, str(out), xs)
        real = run_distributed(_two_sites_real, 2, spec, str(out), xs)
        for r in sim[1:] + real:
            assert all(torch.equal(a, b) for a, b in zip(r, sim[0])), spec
    # Feedback (pre-norm rule): rank r's second message is x2_r minus its own coding
    # error of the first; the second sum is exactly the klt sum of those messages.
    plain_y = run_simulated(_two_sites, 2, "klt4:32,algo=one-shot", str(out), xs)[0]
    ef_y = run_simulated(_two_sites, 2, "ef+klt4:32,algo=one-shot", str(out), xs)[0]
    assert torch.equal(ef_y[0], plain_y[0])
    cfg = SiteCodecs(parse_comm("klt4:32,algo=one-shot", calibration=str(out)))
    s1, s2 = (cfg.scheme_for(s) for s in SITES_TINY)
    want = sum(s2.decode_partial(s2.encode_partial(xs[2][r] - _own_error(s1, xs[1][r], r), r), r)
               for r in range(2))
    assert torch.equal(ef_y[1], want.reshape(ef_y[1].shape))
    assert not torch.equal(ef_y[1], plain_y[1])


def test_ef_on_klt_explains_its_path(planted_dir, text_file, tmp_path, capsys):  # noqa: F811
    from megatron_lite.comm.simulate import make_thread_communicators
    out = tmp_path / "klt.safetensors"
    rc, err = run_main("calibrate", ["--ckpt", planted_dir, "--text", text_file, "--tp", "2",
                                     "--num-seqs", "4", "--seq-len", "48", "--no-progress",
                                     "--scale-seqs", "2", "--transform", "--transform-seqs",
                                     "2", "--out", out], capsys)
    assert rc == 0, err
    c = build_communicator(make_thread_communicators(2)[0], "ef+klt4:64,algo=one-shot",
                           calibration=str(out))
    assert isinstance(c, ErrorFeedbackCommunicator)
    x = torch.zeros(3, 64)
    assert c.explain(x, "layers.0.mlp.down_proj").split("; transport ")[0] == \
        "error feedback, portable one-shot with klt4:64"
