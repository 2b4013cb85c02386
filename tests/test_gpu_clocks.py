"""lab.gpu_clocks: the nvidia-smi samples of a timed region and their summary."""
import torch

from megatron_lite.lab.gpu_clocks import ClockSampler, clocks_label, summarize


def test_summary_keeps_the_region_and_skips_what_does_not_parse():
    lines = [(0.9, "1980, 300.00, Not Active, Not Active, 40"),   # before the region
             (1.0, "1755, 690.12, Active, Not Active, 61"),
             (1.5, "1605, 699.80, Active, Active, 63"),
             (2.0, "1980, 400.50, Not Active, Not Active, 55"),
             (2.5, "[N/A], 3, Active, Active, 1"),                  # unreadable: skipped
             (2.6, "Failed to initialize NVML"),
             (3.1, "1000, 100, Active, Active, 99")]                # after the region
    s = summarize(lines, 1.0, 3.0)
    assert s == dict(sm_MHz=1755.0, power_W=690.12, power_cap_share=2 / 3,
                     hw_slowdown_share=1 / 3, max_temp_C=63.0, samples=3)
    assert clocks_label(s) == "1755 MHz, 690 W, power cap 67% of 3 samples"
    assert summarize(lines, 5.0, 6.0) is None and clocks_label(None) == ""


def test_no_gpu_no_samples():
    with ClockSampler(torch.device("cpu")) as s:
        torch.ones(4).sum()
    assert s.summary() is None


class _Window:
    """A sampler that records which of the engine's calls ran inside it."""

    def __init__(self, calls):
        self.calls, self.inside, self.seen = calls, False, []

    def __enter__(self):
        self.inside, self.start = True, len(self.calls)
        return self

    def __exit__(self, *exc):
        self.inside, self.seen = False, list(range(self.start, len(self.calls)))
        return False


def test_timers_sample_the_timed_calls_alone():
    """time_prefill / time_decode enter the sampler around their timed calls only: a
    compile or a graph capture in the warm-up must not count among the clock samples."""
    from megatron_lite import Engine
    from megatron_lite.comm.communicator import DistCommunicator
    from megatron_lite.lab.benchmark import Clock, time_decode, time_prefill
    from megatron_lite.lab.random_init import random_model, resolve_shape
    from megatron_lite.parallel_state import TPGroup
    model = random_model(resolve_shape("tiny"), TPGroup(DistCommunicator(None)), device="cpu",
                         dtype=torch.float32)
    engine, calls = Engine(model), []
    prefill, step = engine.prefill, engine.decode_step
    engine.prefill = lambda *a, **k: calls.append("prefill") or prefill(*a, **k)
    engine.decode_step = lambda *a, **k: calls.append("step") or step(*a, **k)
    clock = Clock(torch.device("cpu"))
    w = _Window(calls)
    time_prefill(engine, torch.randint(0, 100, (1, 12)), 3, clock, w)
    assert calls == ["prefill"] * 4 and w.seen == [1, 2, 3]   # the warm-up call outside
    calls.clear()
    w = _Window(calls)
    time_decode(engine, 1, 16, 5, clock, graph=False, sampler=w)
    assert calls == ["step"] * 8 and w.seen == [3, 4, 5, 6, 7]   # 3 warm-up steps outside


def test_sampler_reads_a_running_command_and_survives_a_missing_one():
    """The reader thread stamps each line of the sampling command while it runs (here a
    Python process printing nvidia-smi's line format every 10 ms), the region keeps what
    arrived inside it, and a command that cannot start leaves no samples and no error."""
    import sys
    import time
    s = ClockSampler(torch.device("cpu"))
    s.cmd = [sys.executable, "-u", "-c",
             "import time\nwhile True:\n"
             "    print('1605, 650.5, Active, Not Active, 60', flush=True); time.sleep(0.01)"]
    with s:
        time.sleep(0.3)
    got = s.summary()
    assert got is not None and got["samples"] >= 5 and got["sm_MHz"] == 1605.0
    assert got["power_cap_share"] == 1.0 and s._proc.poll() is not None   # stopped
    s = ClockSampler(torch.device("cpu"))
    s.cmd = ["/nonexistent/nvidia-smi"]
    with s:
        pass
    assert s.summary() is None and ClockSampler(torch.device("cpu")).summary() is None


def test_summary_names_how_each_prefill_ran():
    """bench_generate's summary: a prefill row without a CUDA graph is 'compiled' when the
    run compiled its prefill and 'eager' otherwise; a graphed row carries no label."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate_summary", path)
    bg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bg)
    row = dict(phase="prefill", batch=1, tokens=8192, comm="native", ms=207.2, graph=False,
               floor_ms=167.7, flops=132e12)
    result = dict(shape="llama3-8b", tp=1, device="gpu", context=1024, rows=[row],
                  matmul_TFLOPs=787.0, matmul_sustained_TFLOPs=707.0)
    line = lambda r: next(s for s in bg.summarize(r).splitlines() if s.startswith("  TTFT"))
    assert "native compiled: 207.200 ms = 1.24x floor" in line({**result,
                                                                 "compiled_prefill": True})
    assert "native eager: 207.200 ms" in line(result)
    assert "native: 207.200 ms" in line({**result, "rows": [{**row, "graph": True}]})
    assert "1.11x at the sustained 707 TFLOP/s" in line(result)
