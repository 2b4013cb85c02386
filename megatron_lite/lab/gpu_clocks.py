"""The SM clock and board power while a timed region runs, sampled by ``nvidia-smi``.

A compute-bound kernel runs at the speed of the SM clock, and an H100 or H200 lowers that
clock when the board reaches its power limit (``clocks_event_reasons.sw_power_cap``). The
same GEMM kernel can then take longer inside a long prefill than in a short probe of the
matmul rate. The benchmarks record the clocks next to their times, so that such a
difference is a number in the JSON rather than a guess.

``nvidia-smi --query-gpu ... -lms PERIOD`` prints one line per period; a reader thread
stamps each line with the host clock, and ``summary`` keeps the lines stamped inside the
region. The timers synchronise the device before and after the region, so host time and
device time cover the same work. Where there is no GPU or no ``nvidia-smi``, ``summary``
returns None. ``power.draw`` is nvidia-smi's reading, averaged over about a second on
Hopper (``nvidia-smi --help-query-gpu``), so a region shorter than that reads low; the
clock and the power-cap flag are the instantaneous ones.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time

# field -> key of the summary; the event reasons read "Active" / "Not Active"
_FIELDS = (("clocks.sm", "sm_MHz"), ("power.draw", "power_W"),
           ("clocks_event_reasons.sw_power_cap", "power_cap"),
           ("clocks_event_reasons.hw_slowdown", "hw_slowdown"),
           ("temperature.gpu", "temp_C"))


def _gpu_id(device) -> str | None:
    import torch
    try:
        return f"GPU-{torch.cuda.get_device_properties(device).uuid}"
    except (AttributeError, RuntimeError):
        return None


class ClockSampler:
    """``with ClockSampler(device) as s: <timed work>``, then ``s.summary()``: the
    median SM clock (MHz) and board power (W) over the samples taken inside the block, the
    share of them with the power cap active, the hottest temperature, and their count."""

    def __init__(self, device, period_ms: int = 20):
        self.cmd, self.lines = None, []
        self.t0 = self.t1 = None
        self._proc = self._thread = None
        self._first = threading.Event()
        gid = _gpu_id(device) if getattr(device, "type", "cpu") == "cuda" else None
        exe = shutil.which("nvidia-smi")
        if gid is not None and exe is not None:
            self.cmd = [exe, "-i", gid, "--query-gpu=" + ",".join(f for f, _ in _FIELDS),
                        "--format=csv,noheader,nounits", "-lms", str(period_ms)]

    def _read(self):
        for line in self._proc.stdout:
            self.lines.append((time.monotonic(), line.strip()))
            self._first.set()
        self._first.set()   # the process ended (an unknown field ends it at once)

    def __enter__(self):
        if self.cmd is not None:
            try:
                self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                              stderr=subprocess.DEVNULL, text=True)
            except OSError:   # not runnable here: no samples, and the timing goes on
                self._proc = None
        if self._proc is not None:
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
            self._first.wait(timeout=10.0)   # nvidia-smi takes a moment to start
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.t1 = time.monotonic()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._thread.join(timeout=5.0)
        return False

    def summary(self) -> dict | None:
        if self.t0 is None or self.t1 is None:   # not run (yet)
            return None
        return summarize(self.lines, self.t0, self.t1)


def summarize(lines: list[tuple[float, str]], t0: float, t1: float) -> dict | None:
    """The summary of the ``(host time, nvidia-smi line)`` samples stamped within
    ``[t0, t1]``; lines that do not parse (``[N/A]``, an error message) are skipped, and
    None is returned where none is left."""
    rows = []
    for t, line in lines:
        parts = [p.strip() for p in line.split(",")]
        if not (t0 <= t <= t1) or len(parts) != len(_FIELDS):
            continue
        try:
            rows.append(dict(sm_MHz=float(parts[0]), power_W=float(parts[1]),
                             power_cap=parts[2] == "Active",
                             hw_slowdown=parts[3] == "Active", temp_C=float(parts[4])))
        except ValueError:   # "[N/A]" and the like
            continue
    if not rows:
        return None
    return dict(sm_MHz=statistics.median(r["sm_MHz"] for r in rows),
                power_W=statistics.median(r["power_W"] for r in rows),
                power_cap_share=sum(r["power_cap"] for r in rows) / len(rows),
                hw_slowdown_share=sum(r["hw_slowdown"] for r in rows) / len(rows),
                max_temp_C=max(r["temp_C"] for r in rows), samples=len(rows))


def clocks_label(c: dict | None) -> str:
    """One line of a table: ``1755 MHz, 690 W, power cap 80%`` (empty without samples)."""
    if not c:
        return ""
    return (f"{c['sm_MHz']:.0f} MHz, {c['power_W']:.0f} W, power cap "
            f"{100 * c['power_cap_share']:.0f}% of {c['samples']} samples")
