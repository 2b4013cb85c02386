# scratch: kernel variants for the A/B (applied to a copy of the tree on the device)
import sys
from pathlib import Path
variant, root = sys.argv[1], Path(sys.argv[2])
ts, osq = root / "kernels/csrc/two_shot.cu", root / "kernels/csrc/one_shot_q.cu"
def sub(p, old, new):
    s = p.read_text(); assert s.count(old) == 1, (p, old); p.write_text(s.replace(old, new))
if "5" in variant:   # weighted- kernels at 5 blocks per SM (96 registers, no spills)
    sub(ts, "__launch_bounds__(kMaxTwoShotThreads, kTileBlocksPerSM) two_shot_kernel",
        "__launch_bounds__(kMaxTwoShotThreads, SCALE ? 5 : kTileBlocksPerSM) two_shot_kernel")
    sub(osq, "__launch_bounds__(kMaxTwoShotThreads, ERR ? 4 : kTileBlocksPerSM)",
        "__launch_bounds__(kMaxTwoShotThreads, ERR ? 4 : SCALE ? 5 : kTileBlocksPerSM)")
if "g" in variant:   # peers and arguments read from the parameter bank, no local copy
    sub(ts, """    int* status, Peers peers, const float* __restrict__ scale, const float* __restrict__ inv,
    TwoShotArgs a) {""", """    int* status, const __grid_constant__ Peers peers, const float* __restrict__ scale,
    const float* __restrict__ inv, const __grid_constant__ TwoShotArgs a) {""")
    sub(osq, """    uint8_t* ws, int* cnt, int* status, Peers peers, const float* __restrict__ scale,
    const float* __restrict__ inv, OneShotQArgs a) {""", """    uint8_t* ws, int* cnt, int* status, const __grid_constant__ Peers peers,
    const float* __restrict__ scale, const float* __restrict__ inv,
    const __grid_constant__ OneShotQArgs a) {""")
print("patched", variant, root)
