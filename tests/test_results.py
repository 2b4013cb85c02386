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
