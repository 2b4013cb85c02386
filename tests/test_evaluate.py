"""Evaluation: data loading, metric definitions, writers, and evaluate on tiny models.

Never touches /work/shared/data: inputs are written into tmp_path, and the tokenizer is a
byte-level BPE trained in memory on a few sentences.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_lite.lab.eval import data as D
from megatron_lite.lab.eval import metrics as M
from megatron_lite.lab.eval import report as R
from megatron_lite.lab.eval.evaluator import run_study, summarize

CORPUS = ["the quick brown fox jumps over the lazy dog. " * 3,
          "a b c d e the fox and the dog sat on a mat while the cat ran away."]


def make_tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "nobos"])
def tok(request):
    return make_tokenizer(request.param)


def write_jsonl(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return str(path)


# ------------------------------------------------------------------------------- data
def test_text_windows_are_whole_nonoverlapping_and_prefixed(tok, tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("\n\n".join(CORPUS * 20))
    full = tok(p.read_text(), add_special_tokens=False)["input_ids"]
    bos = D.bos_prefix(tok)
    tw = D.load_text_windows(tok, str(p), window=16, max_tokens=60)
    assert len(tw.windows) == 60 // 15 == 4
    assert tw.num_tokens == 4 * 15
    chunk = 16 - len(bos)
    for i, w in enumerate(tw.windows):
        assert len(w.ids) == 16 and (w.start, w.end) == (1, 16)
        assert w.ids == bos + full[i * chunk:(i + 1) * chunk]
    # No cap: every whole window of the file, and only whole ones.
    tw_all = D.load_text_windows(tok, str(p), window=16, max_tokens=None)
    assert len(tw_all.windows) == len(full) // chunk


def test_encode_pair_splits_continuation_like_lm_eval(tok):
    s = D.encode_pair(tok, "the quick brown", " fox")
    assert tok.decode(s.ids[s.start:]) == " fox"
    assert s.ids[:s.start] == tok("the quick brown")["input_ids"]
    # A trailing space of the context moves into the continuation.
    s2 = D.encode_pair(tok, "the quick brown ", "fox")
    assert s2.ids == s.ids and s2.start == s.start


def test_load_tasks_tell_cloze_from_mc(tok, tmp_path):
    cl = write_jsonl(tmp_path / "cl.jsonl", [{"context": "the lazy", "target": " dog"}] * 3)
    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"id": 0, "contexts": ["the quick", "the quick"], "continuations": [" fox", " cat"],
         "label": 1}] * 5)
    t1 = D.load_task(tok, cl)
    t2 = D.load_task(tok, mc, limit=2)
    assert (t1.name, t1.kind, len(t1.items)) == ("cl", "cloze", 3)
    assert (t2.name, t2.kind, len(t2.items)) == ("mc", "mc", 2)
    assert t2.items[0].num_chars == [4, 4] and t2.items[0].label == 1
    assert len(t2.sequences()) == 4


@pytest.mark.parametrize("lines,msg", [
    (['{"question": 1}'], "expected keys"),
    (['{"context": "a", "target": " b"}', '{"contexts": ["a","a"], "continuations": '
      '[" b"," c"], "label": 0}'], "mc item in a cloze file"),
    (['{"contexts": ["a","a"], "continuations": [" b"," c"], "label": 2}'], "out of range"),
    (['{"contexts": ["a"], "continuations": [" b", " c"], "label": 0}'], "equal length"),
    (['not json'], "invalid JSON"),
    ([], "empty task file"),
])
def test_bad_task_files(tok, tmp_path, lines, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines))
    with pytest.raises(D.EvalDataError, match=msg):
        D.load_task(tok, str(p))


def test_missing_files_and_bad_sizes(tok, tmp_path):
    with pytest.raises(D.EvalDataError, match="file not found"):
        D.load_task(tok, str(tmp_path / "nope.jsonl"))
    with pytest.raises(D.EvalDataError, match="file not found"):
        D.load_text_windows(tok, str(tmp_path / "nope.txt"), 16, 100)
    p = tmp_path / "short.txt"
    p.write_text("the fox")
    with pytest.raises(D.EvalDataError, match="fewer than one window"):
        D.load_text_windows(tok, str(p), 64, 100)


def test_specs_differing_only_in_calibration_are_refused():
    """A row is named by its spec without the calibration file, so two specs that differ
    only there would share one row (and one calibration): refused, with both named; the
    same spec twice is one row."""
    from megatron_lite.lab.eval.study import _canonical_comms
    names, _ = _canonical_comms(["weighted-int8:128,calibration=a.safetensors"] * 2, None)
    assert names == ["bf16", "weighted-int8:128"]
    with pytest.raises(D.EvalDataError, match="weighted-int8:128 with different calibration"):
        _canonical_comms(["weighted-int8:128,calibration=a.safetensors",
                          "weighted-int8:128,calibration=b.safetensors"], None)
    with pytest.raises(D.EvalDataError, match="different calibration"):   # one via the flag
        _canonical_comms(["weighted-int8:128", "weighted-int8:128,calibration=b.safetensors"],
                         "a.safetensors")


def test_batches_by_length_respects_budget_and_covers_all():
    seqs = [D.Sequence_([0] * n, 1, n) for n in (5, 9, 3, 9, 7, 2, 8)]
    batches = D.batches_by_length(seqs, max_batch_tokens=18)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert max(len(seqs[i].ids) for i in b) * len(b) <= 18
    assert batches[0] == [1, 3]              # the two longest first, input order on ties
    # The rows budget: spans of 8, 8, 7, 6, ... rows; at most 14 rows per batch.
    batches = D.batches_by_length(seqs, max_batch_tokens=100, max_batch_rows=14)
    for b in batches:
        assert max(seqs[i].end - seqs[i].start for i in b) * len(b) <= 14 or len(b) == 1
    assert sorted(i for b in batches for i in b) == list(range(7))


# ---------------------------------------------------------------------------- metrics
def test_score_targets_and_compare_rows_against_hand_computation():
    torch.manual_seed(0)
    pred = torch.randn(5, 11)
    tgt = [1, 4, 1, 5, 9]
    sc = M.score_targets(pred, tgt)
    lp = torch.log_softmax(pred, -1)
    want = -sum(lp[i, t].item() for i, t in enumerate(tgt))
    assert sc.n == 5 and sc.nll == pytest.approx(want, rel=1e-6)
    assert sc.greedy_ok == all(pred[i].argmax().item() == t for i, t in enumerate(tgt))
    assert M.score_targets(pred, pred.argmax(-1).tolist()).greedy_ok
    assert not M.score_targets(pred, (pred.argmax(-1) + 1).tolist()).greedy_ok
    # KL against itself is 0 with full agreement; against a perturbation matches the formula.
    ref = M.ref_log_probs(pred)
    kl, agree = M.compare_rows(pred, ref)
    assert kl == pytest.approx(0.0, abs=1e-6) and agree == 5
    other = pred + 0.3 * torch.randn(5, 11)
    kl2, agree2 = M.compare_rows(other, ref)
    lq = torch.log_softmax(other, -1)
    want_kl = (ref.exp() * (ref - lq)).sum().item()
    assert kl2 == pytest.approx(want_kl, rel=1e-5) and kl2 > 0
    assert agree2 == int((other.argmax(-1) == pred.argmax(-1)).sum())


def test_kl_ignores_minus_inf_padding_logits():
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 0.0, float("-inf")]])
    kl, _ = M.compare_rows(logits, M.ref_log_probs(logits))
    assert kl == 0.0


def test_mc_predictions_per_char_normalisation_and_ties():
    # raw prefers the short choice; per char prefers the long one.
    assert M.mc_predictions([-2.0, -3.0], [2, 10]) == (0, 1)
    assert M.mc_predictions([-1.0, -1.0], [3, 3]) == (0, 0)


def test_paired_delta_and_ppl_se():
    pdlt = M.paired_delta([1, 0, 1, 1], [1, 1, 0, 1])
    assert pdlt.delta == 0.0 and pdlt.n == 4
    assert pdlt.se == pytest.approx(math.sqrt((2 / 3) / 4))
    pct, se = M.delta_ppl_pct_with_se([10.0, 20.0], [10.0, 20.0], [5, 5])
    assert pct == 0.0 and se == 0.0
    pct, se = M.delta_ppl_pct_with_se([10.0, 20.0], [11.0, 21.0], [5, 5])
    assert pct == pytest.approx(100 * math.expm1(0.2)) and se == 0.0


# ------------------------------------------------------------------ study loop on a toy
def _toy_forward(vocab):
    """A fixed 'model': logits depend on the current token only; codec c adds a fixed
    perturbation whose size grows with c (codec 0 = reference, exact). Batch-independent,
    so batched and unbatched runs must agree."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, vocab, generator=g) * 3
    noise = torch.randn(8, vocab, vocab, generator=g)

    def forward(c, ids, rows=None):
        out = table[ids] + 0.5 * c * noise[c][ids]
        if rows is not None:
            out = out[torch.arange(out.shape[0])[:, None], rows]
        return out
    return forward


def test_run_study_reference_row_is_exact_and_noise_hurts(tok, tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("\n\n".join(CORPUS * 20))
    text = D.load_text_windows(tok, str(p), window=12, max_tokens=110)
    cl = D.load_task(tok, write_jsonl(tmp_path / "cl.jsonl",
                                      [{"context": "the lazy", "target": " dog"},
                                       {"context": "a b c", "target": " d e"}]))
    mc = D.load_task(tok, write_jsonl(tmp_path / "mc.jsonl", [
        {"contexts": ["the quick", "the quick", "the"], "continuations": [" fox", " cat", " mat"],
         "label": 0}, {"contexts": ["the", "a"], "continuations": [" dog", " b c"], "label": 1}]))
    names = ["bf16", "noisy1", "noisy4"]
    fwd = _toy_forward(len(tok))
    stats = run_study(fwd, names, text, [cl, mc], max_batch_tokens=40, progress=False)
    rows = summarize(names, [16.0, 8.0, 4.0], stats, text, [cl, mc])
    ref, r1, r4 = rows
    assert ref["delta_ppl_pct"] == 0.0 and ref["kl"] == 0.0 and ref["top1_agreement"] == 1.0
    assert ref["tasks"]["cl"]["delta"] == 0.0 and ref["tasks"]["mc"]["delta"] == 0.0
    assert 0 < r1["kl"] < r4["kl"] and r4["top1_agreement"] < 1.0
    assert ref["text_tokens"] == 110 // 11 * 11
    # The study's numbers equal a direct, unbatched computation.
    def pred(c, s):
        return fwd(c, torch.tensor([s.ids]))[0, s.start - 1:s.end - 1]

    nll = sum(M.score_targets(pred(0, w), w.ids[w.start:]).nll for w in text.windows)
    assert ref["ppl"] == pytest.approx(math.exp(nll / text.num_tokens), rel=1e-6)
    klsum = sum(M.compare_rows(pred(2, w), M.ref_log_probs(pred(0, w)))[0]
                for w in text.windows)
    assert r4["kl"] == pytest.approx(klsum / text.num_tokens, rel=1e-5)
    mc_ll = []
    for it in mc.items:
        ll = [-M.score_targets(pred(0, s), s.ids[s.start:s.end]).nll for s in it.choices]
        mc_ll.append(M.mc_predictions(ll, it.num_chars))
    cl_ok = [M.score_targets(pred(1, it.seq), it.seq.ids[it.seq.start:]).greedy_ok
             for it in cl.items]
    assert r1["tasks"]["cl"]["accuracy"] == sum(cl_ok) / 2
    want = sum(float(norm == it.label) for (_, norm), it in zip(mc_ll, mc.items)) / 2
    assert ref["tasks"]["mc"]["accuracy"] == want


# ---------------------------------------------------------------------------- writers
def _rows():
    return [{"codec": "bf16", "bits_per_value": 16.0, "ppl": 10.0, "delta_ppl_pct": 0.0,
             "delta_ppl_pct_se": 0.0, "kl": 0.0, "top1_agreement": 1.0,
             "tasks": {"lam": {"accuracy": 0.5, "delta": 0.0, "delta_se": 0.0, "n": 10}}},
            {"codec": "int4:128", "bits_per_value": 4.25, "ppl": 10.2, "delta_ppl_pct": 2.0,
             "delta_ppl_pct_se": 0.1, "kl": 0.01, "top1_agreement": 0.97,
             "tasks": {"lam": {"accuracy": 0.4, "delta": -0.1, "delta_se": 0.05, "n": 10}}}]


def test_json_has_exactly_the_issue_schema(tmp_path):
    doc = R.json_doc("tiny", 2, True, _rows())
    out = tmp_path / "r.json"
    R.write_json(str(out), doc)
    got = json.loads(out.read_text())
    assert list(got) == ["model", "tp", "simulated", "rows"]
    assert got["rows"][1] == {"codec": "int4:128", "bits_per_value": 4.25, "ppl": 10.2,
                              "delta_ppl_pct": 2.0, "kl": 0.01, "top1_agreement": 0.97,
                              "tasks": {"lam": 0.4}}
    bad = dict(doc, rows=doc["rows"][1:])
    with pytest.raises(ValueError, match="bf16"):
        R.validate_json_doc(bad)
    with pytest.raises(ValueError, match="row keys"):
        R.validate_json_doc(dict(doc, rows=[dict(doc["rows"][0], extra=1)]))


def test_markdown_and_plot(tmp_path):
    md = R.markdown_table(_rows(), {"lam": {"kind": "cloze", "n": 10}})
    lines = md.strip().splitlines()
    assert len(lines) == 4 and "`int4:128`" in lines[3] and "+2.000 ± 0.100" in lines[3]
    assert "-10.00 ± 5.00" in lines[3] and "80.00" in lines[3]
    png = tmp_path / "p.png"
    R.plot(_rows(), str(png), "tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ bit allocation
def test_allocate_is_the_knapsack_optimum_on_a_small_case():
    import itertools

    from megatron_lite.lab.eval.sensitivity import allocate, comm_string
    bits = {"c3": 3.0, "c4": 4.0, "c8": 8.0}
    sens = {"a": {"c3": 4.0, "c4": 1.0, "c8": 0.0},       # sensitive: wants c8
            "b": {"c3": 0.2, "c4": 0.05, "c8": 0.0},
            "c": {"c3": 0.3, "c4": 0.1, "c8": 0.0},
            "d": {"c3": 0.1, "c4": 0.02, "c8": 0.0}}
    choice, mean_bits, pred = allocate(sens, bits, budget=4.5)
    best = min((sum(sens[s][c] for s, c in zip(sens, combo)), combo)
               for combo in itertools.product(bits, repeat=4)
               if sum(bits[c] for c in combo) / 4 <= 4.5)
    assert pred == pytest.approx(best[0]) and mean_bits <= 4.5
    assert choice["a"] == "c8"
    assert choice == {"a": "c8", "b": "c3", "c": "c4", "d": "c3"}
    assert comm_string(choice, list(sens)) == "c3,a=c8,c=c4"
    # Plenty of budget: everything at the best codec; too little: a clear error.
    assert set(allocate(sens, bits, 8.0)[0].values()) == {"c8"}
    with pytest.raises(ValueError, match="below the cheapest"):
        allocate(sens, bits, 2.5)


# ------------------------------------------------------------ tiny models, end to end
import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while cats sleep on warm mats".split()


def _run_evaluate(args, capsys):
    spec = importlib.util.spec_from_file_location("tool_evaluate", REPO / "tools" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    capsys.readouterr()
    rc = mod.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    import random
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("eval-inputs")
    (d / "text.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(900)))
    write_jsonl(d / "cloze.jsonl", [{"context": " ".join(rng.choice(WORDS) for _ in range(12)),
                                     "target": " " + rng.choice(WORDS)} for _ in range(12)])
    write_jsonl(d / "mc.jsonl", [{"contexts": [" ".join(rng.choice(WORDS) for _ in range(8))] * 3,
                                  "continuations": [" " + rng.choice(WORDS) for _ in range(3)],
                                  "label": i % 3} for i in range(10)])
    return d


def test_evaluate_cli_reference_row_int8_close_and_schema(tiny_hf_dir, tiny_inputs, tmp_path,
                                                          capsys):
    d = tiny_inputs
    js, det, png, md = (tmp_path / n for n in ("r.json", "d.json", "p.png", "t.md"))
    rc, out, err = _run_evaluate(
        ["--ckpt", tiny_hf_dir("gemma3_text"), "--tp", "2", "--comm", "int8", "--comm", "int2:32",
         "--comm", "bf16", "--text", d / "text.txt", "--window", "64", "--max-tokens", "630",
         "--task", d / "cloze.jsonl", "--task", d / "mc.jsonl", "--task-limit", "8",
         "--json", js, "--details", det, "--plot", png, "--markdown", md, "--no-progress"], capsys)
    assert rc == 0, err
    doc = json.loads(js.read_text())
    R.validate_json_doc(doc)
    assert (doc["model"], doc["tp"], doc["simulated"]) == (tiny_hf_dir("gemma3_text").name, 2, True)
    assert [r["codec"] for r in doc["rows"]] == ["bf16", "int8:128", "int2:32"]   # bf16 once, first
    ref, i8, i2 = doc["rows"]
    assert (ref["delta_ppl_pct"], ref["kl"], ref["top1_agreement"]) == (0.0, 0.0, 1.0)
    assert ref["bits_per_value"] == 16.0 and i8["bits_per_value"] == 8.125
    assert set(ref["tasks"]) == {"cloze", "mc"}
    assert abs(i8["delta_ppl_pct"]) < 0.5 and i8["kl"] < 2e-3 and i8["top1_agreement"] > 0.9
    assert i2["kl"] > 20 * i8["kl"]
    details = json.loads(det.read_text())
    assert details["text_tokens"] == 10 * 63 and details["tasks"]["mc"]["n"] == 8
    assert details["tasks"]["cloze"]["primary"] == "acc"
    assert md.read_text() in out and png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra,msg", [
    (["--comm", "int7"], "unknown codec"),
    (["--comm", "int4:100"], "does not fit"),
    (["--comm", "native"], "not a codec"),
    (["--comm", "outlier-int4"], "needs a calibration file"),
    (["--text", "/nonexistent/x.txt"], "file not found"),
    (["--task", "/nonexistent/t.jsonl"], "file not found"),
    (["--tp", "3"], "TP size 3"),
    (["--window", "1"], "--window"),
])
def test_evaluate_cli_bad_input(tiny_hf_dir, tiny_inputs, tmp_path, capsys, extra, msg):
    js = tmp_path / "r.json"
    base = ["--ckpt", tiny_hf_dir("llama"), "--tp", "2", "--text", tiny_inputs / "text.txt",
            "--json", js, "--no-progress"]
    rc, out, err = _run_evaluate(base + extra, capsys)
    assert rc == 1 and err.startswith("error:") and msg in err, err
    assert len(err.strip().splitlines()) == 1 and not js.exists() and out == ""
    rc, _, err = _run_evaluate(["--ckpt", tmp_path / "none", "--tp", "2", "--text",
                                tiny_inputs / "text.txt"], capsys)
    assert rc == 1 and "does not exist" in err


SWITCH_SPECS = ["bf16", "int4:32", "hadamard-int4:32", "ef+int4:32"]


def _logits_all_codecs(comm, ckpt, ids, rows):
    from megatron_lite.comm.build import build_communicator
    from megatron_lite.comm.feedback import ErrorFeedbackCommunicator
    from megatron_lite.lab.eval.runner import CodecSwitch, load_rank_engine, rank_logits
    comms = [ErrorFeedbackCommunicator(build_communicator(comm, s[3:])) if s.startswith("ef+")
             else build_communicator(comm, s) for s in SWITCH_SPECS]
    switch = CodecSwitch(comm, comms)
    engine = load_rank_engine(str(ckpt), switch)
    out = []
    for i in range(len(SWITCH_SPECS)):
        switch.active = i
        out.append((rank_logits(engine, ids), rank_logits(engine, ids, rows)))
    return out


def _gloo_logits(rank, world_size, ckpt, ids, rows):
    from megatron_lite.comm.communicator import DistCommunicator
    return _logits_all_codecs(DistCommunicator(), ckpt, ids, rows)


def test_simulated_equals_gloo_bit_for_bit_and_rows_match(tiny_hf_dir):
    from megatron_lite.comm.simulate import run_simulated
    from tests._dist import run_distributed
    ckpt = tiny_hf_dir("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 99, (2, 40), generator=g)
    rows = torch.tensor([[3, 9, 39], [0, 20, 20]])
    sim = run_simulated(_logits_all_codecs, 2, ckpt, ids, rows)
    real = run_distributed(_gloo_logits, 2, ckpt, ids, rows)
    for rank_out in sim[1:] + real:
        for (full, sel), (full0, sel0) in zip(rank_out, sim[0]):
            assert torch.equal(full, full0) and torch.equal(sel, sel0)
    b = torch.arange(2)[:, None]
    for (full, sel), spec in zip(sim[0], SWITCH_SPECS):
        assert sel.shape == (2, 3, full.shape[-1])
        assert torch.allclose(sel, full[b, rows], atol=1e-5), spec
    assert not torch.equal(sim[0][0][0], sim[0][1][0])    # the codecs do differ


def test_evaluate_under_torchrun_equals_simulated(tiny_hf_dir, tiny_inputs, tmp_path, capsys):
    from tests.conftest import run_tool
    d = tiny_inputs
    args = ["--ckpt", tiny_hf_dir("gemma3_text"), "--tp", "2", "--comm", "int4:32",
            "--comm", "ef+hadamard-int4:32", "--text", d / "text.txt", "--window", "64",
            "--max-tokens", "252", "--task", d / "mc.jsonl", "--task-limit", "4", "--no-progress"]
    rc, _, err = _run_evaluate(args + ["--json", tmp_path / "sim.json"], capsys)
    assert rc == 0, err
    r = run_tool(["torchrun", "--nproc_per_node=2", "tools/evaluate.py"]
                 + [str(a) for a in args] + ["--json", str(tmp_path / "real.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    sim, real = (json.loads((tmp_path / n).read_text()) for n in ("sim.json", "real.json"))
    assert sim["simulated"] and not real["simulated"]
    assert sim["rows"] == real["rows"]          # bit-exact simulation => identical numbers


def test_sensitivity_under_torchrun_equals_simulated(tiny_hf_dir, tiny_inputs, tmp_path):
    """tools/sensitivity.py at real TP 2 (torchrun, gloo) measures the same per-site KLs
    as simulated TP 2, and only rank 0 allocates (the other rank used to crash there)."""
    from tests.conftest import run_tool
    args = ["--ckpt", tiny_hf_dir("gemma3_text"), "--tp", "2", "--text",
            tiny_inputs / "text.txt", "--comm", "int4:32", "--comm", "int8:32",
            "--num-seqs", "2", "--seq-len", "32", "--budget", "6", "--no-progress"]
    sim = run_tool(["tools/sensitivity.py"] + args + ["--out", tmp_path / "sim.json"],
                   timeout=600)
    assert sim.returncode == 0, sim.stderr[-2000:]
    real = run_tool(["torchrun", "--nproc_per_node=2", "tools/sensitivity.py"] + args
                    + ["--out", tmp_path / "real.json"], timeout=600)
    assert real.returncode == 0, real.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("sim.json", "real.json"))
    # Bit-for-bit equality of simulated and real TP is asserted where it is made: the
    # all-reduce (tests/test_allreduce.py) and whole evaluation tables
    # (test_evaluate_under_torchrun_equals_simulated). Here the two per-site KL tables
    # differed once in six full CI runs (2026-11-29), by 0.5% on every site, and never
    # in 15 standalone repetitions; undiagnosed (docs/accuracy.md, "Not done"). This test
    # is about the torchrun path of the tool, so it allows that.
    assert a["kl"].keys() == b["kl"].keys()
    for site, v in a["kl"].items():
        assert v.keys() == b["kl"][site].keys()
        for codec, kl in v.items():
            assert b["kl"][site][codec] == pytest.approx(kl, rel=0.02, abs=1e-7), (site, codec)
    assert len(a["kl"]) >= 4 and all(v["int4:32"] > v["int8:32"] >= 0 for v in a["kl"].values())
    assert real.stdout.strip().splitlines() == [b["comm"]]    # printed once, by rank 0
