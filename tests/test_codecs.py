"""Reference codecs (megatron_lite/comm/codecs/group.py, outlier.py) and the calibration
file (comm/calibration.py): bit counts, byte
layout, error bounds over fuzzed inputs, exactness of constant groups, round-half-even,
NaN/Inf rules, bad specs, and the outlier calibration file."""
import json
import math
import os

import pytest
import torch

from megatron_lite.comm.calibration import CalibrationError, load_calibration, model_fingerprint
from megatron_lite.comm.codecs import (BF16_MAX, FP16_MAX, GROUP_SIZES, CodecError,
                                       get_codec, get_scheme, parse_codec_spec)
from megatron_lite.lab.calibration import build_calibration

PLAIN = ["int8", "int6-sym", "int5", "int4", "int4-sym", "int3", "int2", "fp8"]
BITS = {"int8": (8, 1), "int5": (5, 2), "int4": (4, 2), "int4-sym": (4, 1), "int6-sym": (6, 1), "int3": (3, 2),
        "int2": (2, 2), "fp8": (8, 1)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _out_round(y, dtype):
    """Half an ulp of the output dtype (0 for fp32)."""
    if dtype == torch.bfloat16:
        return y.abs() * 2.0 ** -8 + 2.0 ** -134
    if dtype == torch.float16:
        return y.abs() * 2.0 ** -11 + 2.0 ** -25
    return torch.zeros_like(y)


# ----------------------------------------------------------------------------- bit counts
@pytest.mark.parametrize("name", PLAIN)
@pytest.mark.parametrize("g", GROUP_SIZES)
def test_bits_per_value_exact(name, g):
    c = get_codec(f"{name}:{g}")
    bits, nmeta = BITS[name]
    assert c.bits_per_value == bits + 16 * nmeta / g
    for n in (g, 3 * g, 1024 if 1024 % g == 0 else 4 * g):
        assert c.encoded_nbytes(n) * 8 / n == c.bits_per_value
        buf = c.encode(torch.randn(n))
        assert buf.dtype == torch.uint8 and buf.numel() == c.encoded_nbytes(n)


def test_bits_table_values():
    assert get_codec("int4:128").bits_per_value == 4.25
    assert get_codec("int4").bits_per_value == 4.25  # default group 128
    assert get_codec("int8:128").bits_per_value == 8.125
    assert get_codec("int3:128").bits_per_value == 3.25
    assert get_codec("int5:128").bits_per_value == 5.25
    assert get_codec("bf16").bits_per_value == 16
    mixed = get_scheme("int4-int8:128")
    assert mixed.rs.spec == "int4:128" and mixed.ag.spec == "int8:128"
    assert mixed.bits_per_value == (4.25 + 8.125) / 2 and mixed.traits.two_stage
    assert get_scheme("int6").spec == "int4-int8:128"
    assert get_scheme("int4:128").bits_per_value == 4.25 and not get_scheme("int4").traits.two_stage


# ----------------------------------------------------------------------------- layout
def test_layout_int4_pinned():
    # Group [0, 1, ..., 15] x 2 (g=32): m = 0, s = 1 exactly, codes = the values.
    x = torch.arange(32, dtype=torch.float32) % 16
    buf = get_codec("int4:32").encode(x)
    assert buf.numel() == 16 + 2 + 2
    expect = [(2 * i % 16) | ((2 * i + 1) % 16) << 4 for i in range(16)]
    assert buf[:16].tolist() == expect                       # low nibble = even index
    assert buf[16:18].view(torch.bfloat16).item() == 1.0     # step s
    assert buf[18:20].view(torch.bfloat16).item() == 0.0     # offset m


def test_layout_int3_planes_and_int2():
    x = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] * 4, dtype=torch.float32)
    buf = get_codec("int3:32").encode(x)
    assert buf[16 // 2 + 4:].view(torch.bfloat16).tolist() == [1.0, 0.0]  # s = 1, m = 0
    lo, hi = buf[:8].tolist(), buf[8:12].tolist()
    q = [int(v) for v in x]
    assert lo == [sum((q[4 * i + j] & 3) << (2 * j) for j in range(4)) for i in range(8)]
    assert hi == [sum(((q[8 * i + j] >> 2) & 1) << j for j in range(8)) for i in range(4)]
    x2 = torch.tensor([0, 1, 2, 3] * 8, dtype=torch.float32)
    buf2 = get_codec("int2:32").encode(x2)
    assert buf2[:8].tolist() == [0b11100100] * 8
    assert buf2[8:].view(torch.bfloat16).tolist() == [1.0, 0.0]


def test_layout_int5_planes():
    x = torch.arange(32, dtype=torch.float32)               # codes 0..31: s = 1, m = 0
    buf = get_codec("int5:32").encode(x)
    assert buf.numel() == 16 + 4 + 4
    assert buf[20:].view(torch.bfloat16).tolist() == [1.0, 0.0]
    q = list(range(32))
    assert buf[:16].tolist() == [(q[2 * i] & 15) | (q[2 * i + 1] & 15) << 4 for i in range(16)]
    assert buf[16:20].tolist() == [sum(((q[8 * i + j] >> 4) & 1) << j for j in range(8))
                                   for i in range(4)]
    assert torch.equal(get_codec("int5:32").decode(buf, 32), x)


def test_layout_symmetric_pinned():
    x = torch.tensor([-127.0, -1.0, 0.0, 1.0, 127.0] + [0.0] * 27)
    buf = get_codec("int8:32").encode(x)
    assert buf[:5].view(torch.int8).tolist() == [-127, -1, 0, 1, 127]
    assert buf[32:].view(torch.bfloat16).item() == 127.0
    buf4 = get_codec("int4-sym:32").encode(torch.tensor([-7.0, -1.0, 0.0, 7.0] + [0.0] * 28))
    assert buf4[:2].tolist() == [(1) | (7 << 4), (8) | (15 << 4)]  # offset binary q + 8
    # int6-sym: offset binary q + 32 in two planes, the low 4 bits (as int4) then bits 4-5
    # (as int2, value i at bit 2 * (i % 4) of byte i // 4)
    q6 = [-31, -1, 0, 31, 5, -6, 17, -17] + [0] * 24
    buf6 = get_codec("int6-sym:32").encode(torch.tensor(q6, dtype=torch.float32))
    u = [v + 32 for v in q6]
    assert buf6[:16].tolist() == [(u[2 * i] & 15) | (u[2 * i + 1] & 15) << 4 for i in range(16)]
    assert buf6[16:24].tolist() == [sum(((u[4 * i + j] >> 4) & 3) << (2 * j) for j in range(4))
                                    for i in range(8)]
    assert buf6[24:].view(torch.bfloat16).item() == 31.0
    assert get_codec("int6-sym:32").decode(buf6, 32).tolist() == [float(v) for v in q6]
    buf8 = get_codec("fp8:32").encode(torch.tensor([448.0, -2.0] + [0.0] * 30))
    assert buf8[:2].view(torch.float8_e4m3fn).float().tolist() == [448.0, -2.0]


def test_batched_encode_equals_rows():
    x = torch.randn(3, 4, 256)
    for spec in PLAIN + ["bf16"]:
        c = get_codec(spec + (":64" if spec != "bf16" else ""))
        whole = c.encode(x)
        rows = torch.stack([torch.stack([c.encode(x[i, j]) for j in range(4)]) for i in range(3)])
        assert torch.equal(whole, rows), spec
        assert torch.equal(c.decode(whole, 256), c.decode(rows, 256))


# ----------------------------------------------------------------------------- fuzz
def _fuzz_inputs(gen, n, dtype):
    finfo_max = FP16_MAX if dtype == torch.float16 else BF16_MAX
    cases = [
        torch.randn(n, generator=gen),
        torch.randn(n, generator=gen) ** 3 * 50,                         # heavy tails
        torch.randn(n, generator=gen) * 1e-3 + 1000.0,                   # offset groups
        torch.randn(n, generator=gen) * 10.0 ** torch.randint(-30, 30, (n,), generator=gen),
        torch.rand(n, generator=gen) * finfo_max * torch.sign(torch.randn(n, generator=gen)),
        torch.randn(n, generator=gen) * 1e-39,                           # fp32/bf16 denormals
        torch.randn(n, generator=gen) * 1e-6,                            # fp16 denormals
    ]
    return [c.clamp(-finfo_max, finfo_max).to(dtype) for c in cases]


@pytest.mark.parametrize("name", PLAIN + ["bf16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_fuzz_error_within_bound(name, dtype):
    gen = torch.Generator().manual_seed(hash((name, str(dtype))) % 2 ** 31)
    for g in GROUP_SIZES if name != "bf16" else (None,):
        c = get_codec(name if g is None else f"{name}:{g}")
        for n in (256, 1280):
            for x in _fuzz_inputs(gen, n, dtype):
                xf = x.float()
                buf = c.encode(x)
                assert torch.equal(buf, c.encode(x)), "encode must be deterministic"
                y32 = c.decode(buf, n, torch.float32)
                eb = c.error_bound(x)
                finite = torch.isfinite(eb)
                assert finite.all(), "fuzz inputs are finite"
                err = (y32 - xf).abs()
                assert (err <= eb).all(), (c.spec, dtype, (err / eb).max().item())
                y = c.decode(buf, n, dtype)
                assert y.dtype == dtype and torch.isfinite(y).all()
                err_out = (y.float() - xf).abs()
                assert (err_out <= eb + _out_round(y32, dtype)).all(), (c.spec, dtype)


def _random_bit_patterns(gen, n, dtype, denormal_only=False):
    """Every finite value of the dtype is equally likely per bit pattern; optionally only
    the denormal/zero patterns (exponent field 0)."""
    if dtype == torch.float32:
        bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=gen, dtype=torch.int64)
        bits = bits.to(torch.int32)
        if denormal_only:
            bits = bits & (-2 ** 31 | 0x007FFFFF)
    else:
        bits = torch.randint(-2 ** 15, 2 ** 15 - 1, (n,), generator=gen, dtype=torch.int32)
        bits = bits.to(torch.int16)
        if denormal_only:
            bits = bits & (-2 ** 15 | (0x007F if dtype == torch.bfloat16 else 0x03FF))
    x = bits.view(dtype)
    ok = torch.isfinite(x) & (x.float().abs() <= BF16_MAX)
    return torch.where(ok, x, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_fuzz_random_bit_patterns(dtype):
    """Groups mixing every exponent (1e-45 next to 1e38), and all-denormal groups."""
    gen = torch.Generator().manual_seed(17)
    for denormal_only in (False, True):
        x = _random_bit_patterns(gen, 1 << 13, dtype, denormal_only)
        for name in PLAIN + ["bf16"]:
            for g in (32, 256):
                c = get_codec(name if name == "bf16" else f"{name}:{g}")
                buf = c.encode(x)
                y32 = c.decode(buf, x.numel())
                assert ((y32 - x.float()).abs() <= c.error_bound(x)).all(), (c.spec, dtype)
                y = c.decode(buf, x.numel(), dtype)
                assert torch.isfinite(y).all(), (c.spec, dtype)


@pytest.mark.parametrize("name", PLAIN)
def test_error_bound_is_tight(name):
    """The bound is the analytic half step, not a loose envelope: errors reach > 40% of it."""
    c = get_codec(f"{name}:128")
    x = torch.randn(128 * 64)
    ratio = ((c.decode(c.encode(x), x.numel()) - x).abs() / c.error_bound(x)).max().item()
    assert 0.4 < ratio <= 1.0


@pytest.mark.parametrize("name", PLAIN + ["bf16"])
def test_nonfinite_groups_decode_to_nan(name):
    c = get_codec(name if name == "bf16" else f"{name}:64")
    x = torch.randn(512)
    x[3], x[130], x[300] = math.nan, math.inf, -math.inf
    for dtype in DTYPES:
        y = c.decode(c.encode(x.to(dtype)), 512, dtype)
        if name == "bf16":  # element-wise pass-through
            assert math.isnan(y[3]) and y[130] == math.inf and y[300] == -math.inf
            assert torch.isfinite(y[[0, 129, 511]]).all()
            continue
        for grp in (0, 2, 4):
            assert torch.isnan(y[grp * 64:(grp + 1) * 64]).all(), (name, dtype, grp)
        for grp in (1, 3, 5, 6, 7):
            assert torch.isfinite(y[grp * 64:(grp + 1) * 64]).all(), (name, dtype, grp)
    # fp32 beyond the bf16 range counts as overflow
    big = torch.zeros(64)
    big[5] = 3.4e38
    if name != "bf16":
        assert torch.isnan(c.decode(c.encode(big), 64)).all()


@pytest.mark.parametrize("name", PLAIN + ["bf16"])
def test_constant_and_zero_groups_exact(name):
    c = get_codec(name if name == "bf16" else f"{name}:32")
    values = [0.0, -0.0, 1.0, -1.0, 1.0078125, 3.140625, -2.5e-3, 7.0e4, -1.5e20,
              9.2e-41, -1.2e-38, 1e-30, BF16_MAX, -BF16_MAX]
    for v in values:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.full((64,), v, dtype=torch.bfloat16).to(dtype)
            y = c.decode(c.encode(x), 64, dtype)
            assert torch.equal(y, x), (name, v, dtype, y[0].item())
    # fp16 constants that bf16 can hold (and every zero group)
    for v in (0.0, 0.5, -96.0, 65280.0, 2.0 ** -20):
        x = torch.full((64,), v, dtype=torch.float16)
        assert torch.equal(c.decode(c.encode(x), 64, torch.float16), x), (name, v)


def test_fp16_extremes_do_not_overflow():
    x = torch.tensor([FP16_MAX, -FP16_MAX] * 64, dtype=torch.float16)
    for name in PLAIN:
        c = get_codec(f"{name}:128")
        y = c.decode(c.encode(x), 128, torch.float16)
        assert torch.isfinite(y).all(), name
        assert ((y.float() - x.float()).abs() <= c.error_bound(x) + 32).all(), name


def test_bf16_max_range_group():
    x = torch.tensor([BF16_MAX, -BF16_MAX, 1.0, 0.0] * 32)
    for name in PLAIN:
        c = get_codec(f"{name}:128")
        for dtype in (torch.float32, torch.bfloat16):
            y = c.decode(c.encode(x), 128, dtype)
            assert torch.isfinite(y).all(), name
            assert ((y.float() - x).abs() <= c.error_bound(x) + _out_round(y.float(), dtype)).all()


# ----------------------------------------------------------------------------- rounding
def test_round_half_even_asymmetric():
    c = get_codec("int4:32")
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 12.5, 13.5])
    x = torch.cat([torch.tensor([0.0, 15.0]), ties, torch.full((24,), 7.0)])
    buf = c.encode(x)
    assert buf[16:].view(torch.bfloat16).tolist() == [1.0, 0.0]  # s = 1, m = 0
    y = c.decode(buf, 32)
    assert y[2:8].tolist() == [0.0, 2.0, 2.0, 4.0, 12.0, 14.0]


def test_round_half_even_symmetric_and_fp8():
    x = torch.cat([torch.tensor([127.0, 0.5, 1.5, 2.5, -2.5, -3.5]), torch.zeros(26)])
    y = get_codec("int8:32").decode(get_codec("int8:32").encode(x), 32)
    assert y[:6].tolist() == [127.0, 0.0, 2.0, 2.0, -2.0, -4.0]
    # e4m3 spacing is 2 in [16, 32): 17 -> 16, 19 -> 20, 21 -> 20 (ties to even mantissa)
    xf = torch.cat([torch.tensor([448.0, 17.0, 19.0, 21.0, -17.0]), torch.zeros(27)])
    yf = get_codec("fp8:32").decode(get_codec("fp8:32").encode(xf), 32)
    assert yf[:5].tolist() == [448.0, 16.0, 20.0, 20.0, -16.0]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec,msg", [
    ("int7", "unknown codec"), ("int4:100", "does not fit"), ("int4:0", "does not fit"),
    ("int4:", "does not fit"), ("int4:abc", "does not fit"), ("bf16:128", "takes no group"),
    ("", "bad codec spec"), ("int4:128:2", "does not fit"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(CodecError, match=msg):
        parse_codec_spec(spec)


def test_bad_codec_input():
    c = get_codec("int4:128")
    with pytest.raises(CodecError, match="multiple of the group size"):
        c.encode(torch.randn(100))
    with pytest.raises(CodecError, match="float tensor"):
        c.encode(torch.arange(128))
    with pytest.raises(CodecError, match="expected 68 uint8 bytes"):
        c.decode(torch.zeros(67, dtype=torch.uint8), 128)
    with pytest.raises(CodecError, match="calibration"):
        get_scheme("outlier-int4")
    with pytest.raises(CodecError, match="not a one-stage group codec"):
        get_codec("int4-int8")


# ----------------------------------------------------------------------------- outlier
def _toy_stats(w, h, hot):
    amp = torch.ones(h)
    amp[hot] = 40.0
    return {"rs_min": -3 * amp.expand(w, h).clone(), "rs_max": 3 * amp.expand(w, h).clone(),
            "ag_min": -6 * amp, "ag_max": 6 * amp}


def test_calibration_roundtrip_and_checks(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 96, "num_hidden_layers": 2}
    stats = {f"layers.{i}.mlp.down_proj": _toy_stats(3, 96, [5, 50, 90]) for i in range(2)}
    cal = build_calibration(stats, k=2, tp=3, model="toy", fingerprint=model_fingerprint(cfg))
    path = str(tmp_path / "calib.safetensors")
    cal.save(path)
    assert [p for p in os.listdir(tmp_path)] == ["calib.safetensors"]  # no temp left
    loaded = load_calibration(path)
    assert loaded.tp == 3 and loaded.k_per_rank == 1 and loaded.hidden == 96
    assert loaded.site("layers.1.mlp.down_proj").outlier_idx.tolist() == [5, 50, 90]
    loaded.check(tp=3, hf_config=cfg)
    with pytest.raises(CalibrationError, match="made for TP 3"):
        loaded.check(tp=4)
    with pytest.raises(CalibrationError, match="made for model 'toy'"):
        loaded.check(hf_config=dict(cfg, hidden_size=128))
    with pytest.raises(CalibrationError, match="no site"):
        loaded.site("layers.7.mlp.down_proj")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="not a megatron_lite calibration"):
        load_calibration(str(bad))
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(str(tmp_path / "missing.safetensors"))
    # a file whose index tensor disagrees with its header is rejected before use
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    tensors["layers.0.mlp.down_proj.outlier_idx"] = torch.tensor([5, 5, 90], dtype=torch.int32)
    save_file(tensors, str(tmp_path / "dup.safetensors"), metadata=meta)
    with pytest.raises(CalibrationError, match="inconsistent"):
        load_calibration(str(tmp_path / "dup.safetensors"))
    assert json.loads(meta["megatron_lite"])["format"] == "megatron_lite.calibration"


@pytest.mark.parametrize("spec", ["outlier-int4", "outlier-int4:32"])
def test_outlier_codec_chunks(spec):
    w, h, t = 4, 128, 5
    cal = build_calibration({"s": _toy_stats(w, h, [3, 64, 65, 127, 9])}, k=5, tp=w,
                            model="toy", fingerprint="x")
    c = get_scheme(spec, cal, "s")
    assert cal.k_per_rank == 2 and c.nn == 30
    # every chunk holds 2 outlier channels at its end, and perm is a permutation
    assert sorted(c.perm.tolist()) == list(range(h))
    outl = set(cal.site("s").outlier_idx.tolist())
    for j in range(w):
        chunk = c.perm[j * 32:(j + 1) * 32].tolist()
        assert set(chunk[30:]) <= outl and not set(chunk[:30]) & outl
    amp = torch.ones(h)
    amp[[3, 64, 65, 127, 9]] = 40.0
    x = (torch.randn(t, h) * 2 * amp).to(torch.bfloat16)
    x[1, 3] = math.inf      # outlier channel: passes through bf16
    x[2, 10] = math.nan     # int4 channel: NaN
    chunks, restore = c.chunk(x, w)
    assert torch.equal(restore(chunks).view(torch.int16), x.view(torch.int16))  # bitwise (NaN)
    for j in range(w):
        step = c.rs_step[1, j]
        buf = c.encode_chunk(chunks[j], step)
        assert buf.numel() == c.chunk_nbytes(chunks.shape[1])
        y = c.decode_chunk(buf, chunks.shape[1], step, torch.float32)
        eb = c.chunk_error_bound(chunks[j], step)
        fin = torch.isfinite(eb)  # non-finite where the input is (or its dynamic group)
        assert ((y - chunks[j].float()).abs()[fin] <= eb[fin]).all()
        assert torch.isnan(y[~fin]).all() or torch.isinf(y[~fin]).all()
    yfull = restore(torch.stack([c.decode_chunk(c.encode_chunk(chunks[j], c.rs_step[1, j]),
                                                chunks.shape[1], c.rs_step[1, j], torch.bfloat16)
                                 for j in range(w)]))
    assert yfull[1, 3] == math.inf and math.isnan(yfull[2, 10])
    if spec == "outlier-int4":
        assert torch.isfinite(yfull[2, 11]) and c.bits_per_value == 4 + 12 * 2 / 32
    # nominal figure of the paper: k = H/64 -> 4.1875 bits
    big = build_calibration({"s": _toy_stats(4, 4096, [1])}, k=64, tp=4, model="m",
                            fingerprint="x")
    assert get_scheme("outlier-int4", big, "s").bits_per_value == 4.1875
