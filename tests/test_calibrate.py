"""Calibration of outlier-int4: EMA statistics, planted outlier channels, file validation.

Tiny random models only (tests/tiny_configs.py); the calibration text is generated here.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from megatron_lite.comm.calibration import CalibrationError, load_calibration
from megatron_lite.lab.calibration import ChannelStats, RecordingCommunicator
from megatron_lite.comm.simulate import run_simulated
from tests._dist import run_distributed
from tests.conftest import make_char_tokenizer, run_tool

PLANTED = (5, 40)
REPO = Path(__file__).resolve().parents[1]


def load_tool(name):
    """tools/<name>.py as a module, to call its ``main(argv)`` in-process (a subprocess
    costs seconds of imports per call on a loaded 2-core machine)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_main(name, args, capsys):
    """(exit code, stderr) of tools/<name>.py main(args) run in this process."""
    capsys.readouterr()
    rc = load_tool(name).main([str(a) for a in args])
    return rc, capsys.readouterr().err        # hidden channels made into outliers of every row-parallel output


def _text(path, n_chars=6000, seed=0):
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while cats sleep on warm mats".split()
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(words)
        out.append(w)
        size += len(w) + 1
    path.write_text(" ".join(out))
    return str(path)


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """Tiny llama whose o_proj / down_proj output rows PLANTED are scaled by 30: those
    channels of every rank's partial sum have a ~30x wider range."""
    from tests.tiny_configs import make_hf_model
    model = make_hf_model("llama", seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight[list(PLANTED)] *= 30.0
    out = tmp_path_factory.mktemp("planted")
    model.save_pretrained(str(out))
    make_char_tokenizer().save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    return _text(tmp_path_factory.mktemp("calib-text") / "calib.txt")


# ----------------------------------------------------------------------- statistics
def test_ema_is_per_sequence_and_batch_independent():
    torch.manual_seed(0)
    xs = torch.randn(5, 7, 4)          # 5 sequences, 7 tokens, 4 channels
    a, b = ChannelStats(1, decay=0.75), ChannelStats(1, decay=0.75)
    a.update_partial("s", 0, xs)       # one batch of 5
    for i in range(5):                 # five batches of 1
        b.update_partial("s", 0, xs[i:i + 1])
    want = xs[0].amax(0)
    for i in range(1, 5):
        want = 0.75 * want + 0.25 * xs[i].amax(0)
    assert torch.allclose(a.rs_max["s"][0], want, rtol=0, atol=1e-6)
    assert torch.equal(a.rs_max["s"], b.rs_max["s"]) and torch.equal(a.rs_min["s"], b.rs_min["s"])
    assert a.rs_seen["s"][0] == 5


def _record(comm, partials):
    stats = ChannelStats(comm.world_size, decay=0.5)
    rec = RecordingCommunicator(comm, stats)
    y = rec.all_reduce(partials[comm.rank].clone(), "site.a")
    return stats, y


def test_recording_communicator_sees_each_partial_and_the_sum():
    torch.manual_seed(1)
    partials = torch.randn(3, 2, 6, 8)           # 3 ranks, [B=2, T=6, H=8]
    stats = ChannelStats(3, decay=0.5)

    def fn(comm):
        rec = RecordingCommunicator(comm, stats)
        return rec.all_reduce(partials[comm.rank].clone(), "site.a")
    ys = run_simulated(fn, 3)
    total = partials.sum(0)
    assert torch.allclose(ys[0], total, atol=1e-6)
    for r in range(3):
        seq_max = partials[r].amax(1)            # [B, H]
        assert torch.allclose(stats.rs_max["site.a"][r], 0.5 * seq_max[0] + 0.5 * seq_max[1])
    seq_min = ys[0].amin(1)
    assert torch.allclose(stats.ag_min["site.a"], 0.5 * seq_min[0] + 0.5 * seq_min[1])


def _real_record(rank, world_size, partials):
    from megatron_lite.comm.communicator import DistCommunicator
    comm = DistCommunicator()
    stats = ChannelStats(world_size, decay=0.5)
    rec = RecordingCommunicator(comm, stats)
    rec.all_reduce(partials[rank].clone(), "site.a")
    stats.merge_ranks(comm)
    return stats.rs_min["site.a"], stats.rs_max["site.a"]


def test_real_ranks_merge_to_the_simulated_statistics():
    torch.manual_seed(2)
    partials = torch.randn(2, 3, 5, 8)
    res = run_distributed(_real_record, 2, partials)
    sim = ChannelStats(2, decay=0.5)

    def fn(comm):
        RecordingCommunicator(comm, sim).all_reduce(partials[comm.rank].clone(), "site.a")
    run_simulated(fn, 2)
    for lo, hi in res:
        assert torch.equal(lo, sim.rs_min["site.a"]) and torch.equal(hi, sim.rs_max["site.a"])


# ------------------------------------------------------------------------ the tool
def _calibrate(ckpt, text, out, tp=2, extra=()):
    """The real CLI, in a subprocess."""
    return run_tool(["tools/calibrate.py", "--ckpt", ckpt, "--text", text, "--tp", str(tp),
                     "--out", out, "--num-seqs", "8", "--seq-len", "48", "--no-progress",
                     *extra])


def test_calibrate_finds_planted_outlier_channels(planted_dir, text_file, tmp_path):
    out = tmp_path / "calib.safetensors"
    r = _calibrate(planted_dir, text_file, out)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stderr and "k = 2 (1 per rank)" in r.stderr
    calib = load_calibration(str(out))
    m = calib.meta
    assert (m["tp"], m["hidden"], m["k"], m["k_per_rank"]) == (2, 64, 1, 1)
    assert m["model"] == planted_dir.name and m["num_seqs"] == 8
    row_sites = [s for s in calib.sites if s != "embed_tokens"]
    assert len(row_sites) == 2 * 3
    for s in row_sites:
        # k = hidden/64 = 1, rounded up to TP 2: exactly the two planted channels.
        assert calib.sites[s].outlier_idx.tolist() == list(PLANTED), s
        sc = calib.sites[s]
        normal = [c for c in range(64) if c not in PLANTED]
        # Static steps: max(|min|,|max|)/7 of the statistics, positive, and far smaller on
        # typical channels than the planted ones would need.
        assert (sc.rs_scale[:, normal] > 0).all() and (sc.ag_scale[normal] > 0).all()
        assert sc.rs_scale[:, list(PLANTED)].min() > 10 * sc.rs_scale[:, normal].median()
    calib.check(tp=2)
    with pytest.raises(CalibrationError, match="TP 2, but this run has TP 4"):
        calib.check(tp=4)


def test_calibrate_k_flag_and_bad_input(planted_dir, text_file, tmp_path, capsys):
    out = tmp_path / "k4.safetensors"
    common = ["--ckpt", planted_dir, "--text", text_file, "--num-seqs", "8", "--seq-len", "48",
              "--no-progress"]
    rc, err = run_main("calibrate", common + ["--tp", "2", "--out", out, "--k", "4"], capsys)
    assert rc == 0, err
    idx = load_calibration(str(out)).sites["layers.1.mlp.down_proj"].outlier_idx.tolist()
    assert len(idx) == 4 and set(PLANTED) <= set(idx)

    bad = tmp_path / "bad.safetensors"
    cases = [
        (["--tp", "3"], "TP size 3"),                                 # 4 heads: no TP 3
        (["--tp", "1"], "TP 1 has no all-reduce"),
        (["--tp", "2", "--k", "64"], "leaves no int4 channels"),
        (["--tp", "2", "--num-seqs", "500"], "windows of 48 tokens"),
        (["--tp", "2", "--decay", "1.5"], "--decay"),
        (["--tp", "2", "--seq-len", "512"], "exceeds the model's 256 positions"),
        (["--tp", "2", "--text", tmp_path / "none.txt"], "file not found"),
        (["--tp", "2", "--ckpt", tmp_path / "nodir"], "does not exist"),
    ]
    for extra, msg in cases:
        rc, err = run_main("calibrate", common + ["--out", bad] + extra, capsys)
        assert rc == 1 and err.startswith("error:"), (extra, err)
        assert msg in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not bad.exists()


def test_evaluate_rejects_calibration_of_other_model_or_tp(planted_dir, text_file, tmp_path,
                                                          tiny_hf_dir, capsys):
    out = tmp_path / "calib.safetensors"
    common = ["--ckpt", planted_dir, "--text", text_file, "--num-seqs", "8", "--seq-len", "48",
              "--no-progress", "--tp", "2", "--out", out]
    assert run_main("calibrate", common, capsys)[0] == 0
    base = ["--comm", "outlier-int4", "--calibration", out, "--text", text_file,
            "--window", "32", "--max-tokens", "62", "--no-progress"]
    gem = tiny_hf_dir("gemma3_text")
    js = tmp_path / "o.json"
    for extra, msg in [(["--ckpt", planted_dir, "--tp", "4"], "made for TP 2"),
                       (["--ckpt", gem, "--tp", "2"], "made for model"),
                       (["--ckpt", planted_dir, "--tp", "2", "--calibration",
                         tmp_path / "missing.safetensors"], "not found")]:
        rc, err = run_main("evaluate", base + extra + ["--json", js], capsys)
        assert rc == 1 and err.startswith("error:") and msg in err, (extra, err)
        assert len(err.strip().splitlines()) == 1 and not js.exists()
    # tools/generate.py checks the file against the model and the world size (1 here) before
    # any weights load, in one line that names the flag.
    from megatron_lite.cli.generate import main as generate
    capsys.readouterr()
    rc = generate(["--ckpt", str(planted_dir), "--prompt", "x", "--comm", "outlier-int4",
                   "--calibration", str(out)])
    cap = capsys.readouterr()
    assert rc == 1 and cap.out == "" and cap.err == (
        f"error: --comm 'outlier-int4,calibration={out}': calibration was made for TP 2, but "
        "this run has TP 1; rerun tools/calibrate.py with --tp 1\n")
    # The matching model/TP works end to end and the outlier codec costs little.
    rc, err = run_main("evaluate", base + ["--ckpt", planted_dir, "--tp", "2", "--json", js],
                       capsys)
    assert rc == 0, err
    import json
    rows = json.loads(js.read_text())["rows"]
    assert [x["codec"] for x in rows] == ["bf16", "outlier-int4"]
    # k = 2 of 64 channels at TP 2: 1 bf16 channel per 32-channel chunk.
    assert rows[1]["bits_per_value"] == pytest.approx(4 + 12 * 1 / 32)
    assert 0 < rows[1]["kl"] < 0.05
    # Same architecture with other weights passes the fingerprint check (it is
    # architectural, so a calibration survives e.g. a re-export of the same model).
    rc, err = run_main("evaluate", base + ["--ckpt", tiny_hf_dir("llama"), "--tp", "2"], capsys)
    assert rc == 0, err
