# scratch: variant "c" -- the restore's per-chunk channel by one 32-bit compare and select
# (as scale_share does in the first stage) instead of Channels::at's 64-bit loop, where
# h >= G (every model); the loop stays for h < G. Same channels, so the same bits.
import sys
from pathlib import Path
p = Path(sys.argv[1]) / "kernels/csrc/codec_weighted.cuh"
s = p.read_text()
old = """#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t f = f0 + t.col(k);
    if (f >= n) continue;
    fn(k, f, Unscale{scale, inv, h, SCALE ? ch.at(k) : 0});
  }
}"""
new = """  if (SCALE && h >= G && h < 0x7FFFFFFFll) {   // chunk k's channel wraps h at most once
    const uint32_t c0 = (uint32_t)ch.c0, hh = (uint32_t)h;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const int64_t f = f0 + t.col(k);
      if (f >= n) continue;
      uint32_t c = c0 + k * Tile<G>::STRIDE;
      c = c >= hh ? c - hh : c;
      fn(k, f, Unscale{scale, inv, h, (int64_t)c});
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t f = f0 + t.col(k);
    if (f >= n) continue;
    fn(k, f, Unscale{scale, inv, h, SCALE ? ch.at(k) : 0});
  }
}"""
assert s.count(old) == 1
p.write_text(s.replace(old, new))
print("patched c", p)
