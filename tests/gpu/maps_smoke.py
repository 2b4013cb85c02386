"""GPU smoke of kernels/maps.py against comm/rotation.fwht (compile errors print whole)."""
import os, sys, torch, traceback
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import megatron_lite
megatron_lite.__path__.append(REPO)      # kernels/ installs as megatron_lite.kernels
from megatron_lite.kernels import maps
from megatron_lite.comm.rotation import fwht
ok = True
for g in (32, 64, 128, 256):
    for n in (1, 1000, 1 << 20):
        x = torch.randn(n, device="cuda").to(torch.bfloat16)
        s = torch.rand(16, device="cuda") + 0.5 if n % 16 == 0 else None
        try:
            got = maps.map_in(x, g, s)
            xs = (x.float().view(-1, 16) * s).view(-1) if s is not None else x.float()
            want = fwht(torch.nn.functional.pad(xs, (0, -n % g)), g)
            same = torch.equal(got.view(torch.int32), want.view(torch.int32))
        except Exception:
            traceback.print_exc(); same = False
        ok &= same
        print("map_in", g, n, s is not None, same)
print("ALL", ok)
