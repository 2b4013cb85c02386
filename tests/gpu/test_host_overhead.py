"""GPU: ``tools/bench_allreduce.py --host-overhead`` on one GPU times the host's own work.
The calls are timed behind a spin kernel, so a slow kernel cannot pass for host time: the
fused path's whole call stays far below a kernel made to take milliseconds, the device
time per call is reported beside it, and the output is checked before any timing."""
import json

import pytest

from tests.conftest import run_tool
from tests.gpu._harness import needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda]


def test_host_time_is_not_device_time(tmp_path):
    out = tmp_path / "h.json"
    # 256 MiB: the fused kernel takes far longer on the device than its launch on the host
    r = run_tool(["torchrun", "--nproc_per_node=1", "tools/bench_allreduce.py",
                  "--host-overhead", "--min-size", "256MB", "--max-size", "256MB",
                  "--comm", "int8:128,path=fused", "--json", out])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["host_overhead"]["int8:128,path=fused"]
    assert "fused" in res["path"] and res["ranks_identical"], res
    assert 0 < res["rel_err"] < 0.02, res
    assert res["uncovered_batches"] <= 5, res
    # the device needs hundreds of microseconds per 256 MiB call; the host's launch path does
    # not grow with the message
    assert res["gpu_us"] > 2 * res["call_us"], res
