"""Round every site's weighted- channel scales to the nearest power of two (in log2), keep
everything else of the calibration file: the accuracy side of exact-product scaling."""
import sys, torch
from megatron_lite.comm.calibration import load_calibration
cal = load_calibration(sys.argv[1])
ratios = []
for name, sc in cal.sites.items():
    if sc.channel_scale is not None:
        s = sc.channel_scale.float()
        p = torch.exp2(torch.round(torch.log2(s)))
        ratios.append((p / s).log2().abs().max().item())
        sc.channel_scale = p
cal.save(sys.argv[2])
print(f"sites {len(ratios)}, max |log2(p/s)| {max(ratios):.3f}")
