"""tools/bench_codec_kernels.py on the CPU: the Triton path under the interpreter end to
end (table, JSON, plot; the bit-for-bit check against the reference runs first), and
one-line errors with exit status 2 for bad arguments. Its speeds come from a GPU
(docs/results/codec_kernels.md); here only the tool's behaviour is checked."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_tool

pytest.importorskip("triton")

SMOKE = ["tools/bench_codec_kernels.py", "--min-size", "16KB", "--max-size", "32KB",
         "--rows", "2", "--channels", "256", "--iters", "1", "--graph-calls", "1"]


def test_bench_codec_kernels_interpreter_smoke(tmp_path):
    out = tmp_path / "codec.json"
    proc = run_tool(SMOKE + ["--codec", "int4:128", "--codec", "weighted-hadamard-int8:128",
                             "--json", str(out)], env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert data["copy_TBps"] > 0 and [c["bytes"] for c in data["copy"]] == [16384, 32768]
    got = {(r["codec"], r["op"], r["bytes"]) for r in data["rows"]}
    assert got == {(c, op, b) for c in ("int4:128", "weighted-hadamard-int8:128")
                   for op in ("quantize", "dequantize", "dequantize_sum", "error")
                   for b in (16384, 32768)}
    for r in data["rows"]:
        assert r["impl"] == "triton" and r["us"] > 0 and r["TBps"] > 0
        # TBps = traffic / time, with traffic at least the bf16 input read once
        assert r["TBps"] * r["us"] * 1e6 >= r["bytes"] * 0.99
    assert "16 KB: bf16 copy" in proc.stdout and "weighted-hadamard-int8:128" in proc.stdout


@pytest.mark.parametrize("args,msg", [
    (["--codec", "nope:128"], "--codec 'nope:128'"),
    (["--codec", "outlier-int4:128"], "no kernel"),
    (["--min-size", "1000B"], "--min-size must be a multiple"),
    (["--min-size", "64MB", "--max-size", "1MB"], "<= --max-size"),
    (["--max-size", "lots"], "bad size"),
    (["--rows", "0"], "must be >= 1"),
    (["--impl", "cuda"], "--impl cuda needs a CUDA GPU"),
])
def test_bench_codec_kernels_bad_arguments(args, msg):
    proc = run_tool(["tools/bench_codec_kernels.py"] + args, env={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 2, (proc.stdout[-500:], proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and msg in last, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_bench_codec_kernels_needs_a_gpu_or_the_interpreter():
    proc = run_tool(["tools/bench_codec_kernels.py"], env={"TRITON_INTERPRET": "0",
                                                          "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: needs a CUDA GPU")
