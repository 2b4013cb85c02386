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
