"""docs/results/ is generated from the committed JSON (tools/make_results.py): the pages
are up to date, and the recommendation is machine-readable in the documented shape."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_lite.comm.spec import parse_comm
from tests.test_calibrate import load_tool

REPO = Path(__file__).resolve().parents[1]


def test_results_pages_are_generated_from_the_committed_json(capsys):
    rc = load_tool("make_results").main(["--check"])
    assert rc == 0, capsys.readouterr().err


def test_recommended_json_names_parseable_specs_and_a_calibration_command():
    doc = json.loads((REPO / "docs" / "results" / "recommended.json").read_text())
    assert doc["off"] == "native"
    for row in ("safe", "balanced", "aggressive"):
        assert row in doc and row in doc["holds"]
        if doc[row] is not None:
            parse_comm(doc[row], calibration="x.safetensors")   # one grammar: it parses
    cmd = doc["calibration"]
    assert cmd.startswith("python tools/calibrate.py")
    assert all(f"{{{k}}}" in cmd for k in ("ckpt", "text", "tp", "out"))


def test_every_results_source_exists_and_every_link_resolves():
    src = json.loads((REPO / "docs" / "results" / "sources.json").read_text())
    for kind in ("accuracy", "allreduce", "generate"):
        for e in src[kind]:
            for f in [e["file"]] + e.get("with", []):
                assert (REPO / "docs" / "results" / "data" / kind / f).is_file(), f
    for e in src.get("codec_kernels", []):     # named from docs/results/ itself
        d = json.loads((REPO / "docs" / "results" / e["file"]).read_text())
        assert {"device", "date", "copy_TBps", "rows"} <= set(d), e["file"]
        assert all({"codec", "op", "bytes", "us", "TBps"} <= set(r) for r in d["rows"])
    import re
    for page in list((REPO / "docs").rglob("*.md")) + [REPO / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), (str(page.relative_to(REPO)), target)


def _task_run(tmp_path, acc_ref, acc_spec, spec):
    d = tmp_path / "data" / "accuracy"
    d.mkdir(parents=True)
    tasks = {t: {"n": 1000} for t in acc_ref}
    rows = [{"codec": c, "tasks": {t: {"accuracy": a[t], "delta": a[t] - acc_ref[t],
                                       "delta_se": 0.002} for t in a}}
            for c, a in (("bf16", acc_ref), (spec, acc_spec))]
    (d / "gemma-3-270m-tp4-x-tasks.details.json").write_text(
        json.dumps({"text_tokens": 0, "tasks": tasks, "rows": rows}))


def test_task_lines_judge_the_row_bar_on_every_task(tmp_path, monkeypatch):
    from megatron_lite.lab import results as mr
    spec = "weighted-hadamard-int8:128"
    _task_run(tmp_path, {"lambada": 0.400, "arc": 0.500, "hella": 0.600},
              {"lambada": 0.399, "arc": 0.496, "hella": 0.580}, spec)
    cfg = {"rows": {"safe": {"max_task_drop_pct": 0.5}}}
    line = mr._task_lines({"safe": spec}, cfg, tmp_path)
    assert "lambada 99.75% of bf16 (-0.10 ± 0.20 pp, 1000 items)" in line
    # arc: -0.40 pp against a 0.25 pp bar, within two standard errors (0.40 pp) of it;
    # hella: -2.00 pp against 0.30 pp, well past it
    assert "**misses** the 0.5% bar on arc, hella (by less than two standard errors on " \
           "arc: not resolved by these items)" in line and "lambada," not in line
    assert "bar" not in mr._task_lines({"safe": spec}, {"rows": {}}, tmp_path)   # no bar
    cfg["rows"]["safe"]["max_task_drop_pct"] = 1.0
    line = mr._task_lines({"safe": spec}, cfg, tmp_path)
    assert "**misses** the 1.0% bar on hella (`data" in line
    cfg["rows"]["safe"]["max_task_drop_pct"] = 4.0
    assert "within 4.0% of bf16 on every task" in mr._task_lines({"safe": spec}, cfg, tmp_path)


def test_generate_floor_table_and_host_section(tmp_path, monkeypatch):
    """The generate page's ``native``-against-floors table (graphed and eager rows of the
    same case side by side) and the all-reduce page's host-cost section."""
    mr = load_tool("make_results")
    monkeypatch.setattr(mr, "RESULTS", tmp_path)
    rows = [dict(phase="prefill", batch=1, tokens=512, comm="native", ms=2.0, graph=True,
                 flops=1e12, floor_ms=1.6),
            dict(phase="prefill", batch=1, tokens=512, comm="native", ms=4.0, graph=False,
                 extra=True, flops=1e12, floor_ms=1.6),
            dict(phase="decode", batch=1, tokens=1024, comm="native", ms=3.0, graph=True,
                 floor_ms=2.5)]
    gen = dict(shape="llama3-8b", tp=1, device="H200", date="2026-12-05", context=1024,
               compiled_decode=True, matmul_TFLOPs=625.0, tpot_floor_ms=2.4,
               streamed_weight_bytes_per_gpu=16e9, hbm_GBps=4000, rows=rows)
    (tmp_path / "data" / "generate").mkdir(parents=True)
    (tmp_path / "data" / "generate" / "g.json").write_text(json.dumps(gen))
    page = mr.generate_page([{"title": "t", "file": "g.json"}])
    assert "| TTFT 512x1 | 1.600 | 2.000 (graphed) | 1.25x | 4.000 (2.50x) |" in page
    assert "| TPOT batch 1 | 2.500 | 3.000 (compiled + graphed) | 1.20x | - |" in page
    assert "(625 TFLOP/s over 10 products)" in page and "sustained" not in page
    # a run that sampled the clocks and timed the sustained matmul rate
    rows[0]["clocks"] = dict(sm_MHz=1680.0, power_W=622.0, power_cap_share=1.0,
                             hw_slowdown_share=0.0, max_temp_C=57.0, samples=86)
    gen.update(matmul_sustained_TFLOPs=500.0,
               matmul_sustained_clocks=dict(rows[0]["clocks"], sm_MHz=1590.0,
                                            power_cap_share=0.69))
    (tmp_path / "data" / "generate" / "g.json").write_text(json.dumps(gen))
    page = mr.generate_page([{"title": "t", "file": "g.json"}])
    # 1e12 FLOP at 500 TFLOP/s: 2 ms, so 2.0 ms is 1.00x of the sustained rate
    assert ("| TTFT 512x1 | 1.600 | 2.000 (graphed) | 1.25x | 4.000 (2.50x) | 1.00x | "
            "1680 MHz, cap 100% |") in page
    assert "| TPOT batch 1 | 2.500 | 3.000 (compiled + graphed) | 1.20x | - | - | - |" in page
    assert "500 TFLOP/s (1590 MHz, cap 69% of the samples)" in page
    host = dict(world=1, device="H200", torch="2.11", date="2026-12-05",
                host_overhead_note="one rank: route",
                host_overhead={"int4:128,path=fused": dict(dispatch_us=2.04, call_us=17.96,
                                                           backend="auto", rel_err=0.1)})
    (tmp_path / "data" / "allreduce").mkdir(parents=True)
    (tmp_path / "data" / "allreduce" / "h.json").write_text(json.dumps(host))
    sec = mr._host_section([{"title": "one H200", "file": "h.json"}])
    assert "| `int4:128,path=fused` | auto | 2.0 | 18.0 | - | 1.00e-01 |" in sec
    assert "one rank: route." in sec and mr._host_section([]) == ""
    assert "Timed without holding the GPU" in sec      # a run of the older method says so
    host["host_overhead"]["int4:128,path=fused"].update(gpu_us=41.26, uncovered_batches=0)
    (tmp_path / "data" / "allreduce" / "h.json").write_text(json.dumps(host))
    sec = mr._host_section([{"title": "one H200", "file": "h.json"}])
    assert "| `int4:128,path=fused` | auto | 2.0 | 18.0 | 41.3 | 1.00e-01 |" in sec
    assert "Timed without holding the GPU" not in sec


def test_a_row_holds_only_within_its_task_bar():
    """A recommended row with a task bar holds only if the spec's largest sample of every
    task stays within it; a smaller sample of the same task does not count."""
    from megatron_lite.lab import results as mr
    tasks = {("m", 4, "a"): {"lambada": (98.9, 5153, "f")},
             ("m", 4, "b"): {"lambada": (100.2, 3000, "g"), "arc": (99.6, 570, "g")}}
    assert mr.task_misses(tasks, "a", 0.5) == ["lambada 98.90% of bf16 (5153 items)"]
    assert mr.task_misses(tasks, "b", 0.5) == []
    assert mr.task_misses(tasks, "a", None) == []            # a row without a task bar
    assert mr.task_misses(tasks, "b", 0.3) == ["arc 99.60% of bf16 (570 items)"]
    real = mr.task_index(REPO / "docs" / "results")
    doc = json.loads((REPO / "docs" / "results" / "recommended.json").read_text())
    src = json.loads((REPO / "docs" / "results" / "sources.json").read_text())["recommend"]
    for row, bar in src["rows"].items():
        if doc["holds"][row]:
            assert not mr.task_misses(real, doc[row], bar.get("max_task_drop_pct")), row
