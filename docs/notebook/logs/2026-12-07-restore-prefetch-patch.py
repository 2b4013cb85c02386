# scratch: variant "p" -- the restore's reciprocal scales of chunk k + 1 loaded before
# chunk k is unscaled and stored (a software pipeline of one chunk), where h >= G, 8 | h
# and the scales are 16-byte aligned (every model): in the committed kernels each chunk's
# two 16-byte loads sit behind the previous chunk's rare-path branch, which the compiler
# does not hoist loads across (SASS, sm_90), so every chunk waits out a load's latency.
# Same products, so the same bits.
import sys
from pathlib import Path
p = Path(sys.argv[1]) / "kernels/csrc/codec_weighted.cuh"
s = p.read_text()
old = """struct Unscale {
  const float* __restrict__ scale;   // s
  const float* __restrict__ inv;     // fl32(1 / s)
  int64_t h, ch;
  __device__ __forceinline__ void operator()(float y[8]) const {
    float r[8], q[8];
    chunk_scales(inv, h, ch, r);
"""
new = """struct Unscale {
  const float* __restrict__ scale;   // s
  const float* __restrict__ inv;     // fl32(1 / s)
  int64_t h, ch;
  const float* pre = nullptr;        // the chunk's fl32(1 / s), loaded ahead, or null
  __device__ __forceinline__ void operator()(float y[8]) const {
    float r[8], q[8];
    if (pre) {
#pragma unroll
      for (int i = 0; i < 8; ++i) r[i] = pre[i];
    } else {
      chunk_scales(inv, h, ch, r);
    }
"""
assert old in s
s = s.replace(old, new)
old = """#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t f = f0 + t.col(k);
    if (f >= n) continue;
    fn(k, f, Unscale{scale, inv, h, SCALE ? ch.at(k) : 0});
  }
}"""
new = """  if (SCALE && h >= G && h < 0x7FFFFFFFll && (h & 7) == 0 &&
      (reinterpret_cast<uintptr_t>(inv) & 15) == 0) {
    const uint32_t c0 = (uint32_t)ch.c0, hh = (uint32_t)h;   // c < 2h < 2^32
    auto chan = [&](int k) {
      uint32_t c = c0 + k * Tile<G>::STRIDE;
      return c >= hh ? c - hh : c;
    };
    float nxt[8];
    chunk_scales(inv, h, chan(0), nxt);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      float cur[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) cur[i] = nxt[i];
      if (k + 1 < kChunks) chunk_scales(inv, h, chan(k + 1), nxt);
      const int64_t f = f0 + t.col(k);
      if (f >= n) continue;
      fn(k, f, Unscale{scale, inv, h, (int64_t)chan(k), cur});
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
assert old in s
s = s.replace(old, new)
p.write_text(s)
print("patched p", p)
