// The weighted- codecs' channel scales in the tile kernels (codec.cu's quantize, the
// fused all-reduces of two_shot.cu and one_shot_q.cu): which channel a lane's chunk holds,
// the scaling before the encoder, and the restore after the decoder (Unscale). The same
// arithmetic as comm/codecs/weighted.py's reference, bit for bit.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "codec_tile.cuh"

namespace {

// The channel (flat index mod h) of each chunk of a lane's share, from that of its chunk
// 0: one modulo per thread, not one per chunk (a 32-bit one where both fit: the 64-bit
// remainder is a long instruction sequence on sm_90). A share's chunks lie within G
// values, so chunk k's channel wraps h at most G / h + 1 times.
template <int G>
struct Channels {
  int64_t c0, h;
  __device__ __forceinline__ Channels(int64_t f0, int64_t h_) : h(h_) {
    c0 = f0 < 0xFFFFFFFFll && h < 0xFFFFFFFFll ? (int64_t)((uint32_t)f0 % (uint32_t)h)
                                              : f0 % h;
  }
  __device__ __forceinline__ int64_t at(int k) const {
    int64_t c = c0 + (int64_t)k * Tile<G>::STRIDE;
    while (c >= h) c -= h;
    return c;
  }
  // Where h >= G (every model) a share's channels wrap h at most once, so chunk k's is one
  // 32-bit compare and select (near): straight-line code, which lets the compiler issue
  // the next chunk's loads early, where at's loop is a branch it does not hoist them
  // across (SASS, sm_90).
  __device__ __forceinline__ uint32_t near(int k) const {
    const uint32_t c = (uint32_t)c0 + k * Tile<G>::STRIDE, hh = (uint32_t)h;  // c < 2h < 2^32
    return c >= hh ? c - hh : c;
  }
};

// The weighted- scales of 8 consecutive values from channel ch: s[(ch + i) mod h]. Chunks
// start at multiples of 8, so where 8 divides h (every model's hidden size) a chunk never
// wraps and its scales are two 16-byte loads.
__device__ __forceinline__ void chunk_scales(const float* __restrict__ scale, int64_t h,
                                             int64_t ch, float s[8]) {
  if ((h & 7) == 0 && (reinterpret_cast<uintptr_t>(scale) & 15) == 0) {
    float4 a = __ldg(reinterpret_cast<const float4*>(scale + ch));
    float4 b = __ldg(reinterpret_cast<const float4*>(scale + ch) + 1);
    s[0] = a.x; s[1] = a.y; s[2] = a.z; s[3] = a.w;
    s[4] = b.x; s[5] = b.y; s[6] = b.z; s[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      s[i] = __ldg(scale + ch);
      ch = ch + 1 == h ? 0 : ch + 1;
    }
  }
}

// weighted-: v = fl32(x) * s[ch + i], ch the chunk's channel (Channels).
__device__ __forceinline__ void scale_chunk(float v[8], const float* __restrict__ scale,
                                            int64_t h, int64_t ch) {
  float s[8];
  chunk_scales(scale, h, ch, s);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(v[i], s[i]);
}

// A lane's share of the tile at flat index f0 of the bf16 message x as fp32, zeros at and
// past n (the host sends messages of whole 8-value chunks only), loaded before the
// weighted- scaling (scale_share) touches any of them, rather than each chunk scaled
// right after its own load: at one rank on one H100, 64 MB, 6 blocks per SM, the fused
// weighted- kernels took 6-9% less time (docs/notebook/2026-12-07.md).
template <int G>
__device__ __forceinline__ void load_share(const Bf16Bits* __restrict__ x, int64_t n,
                                           int64_t f0, const Tile<G>& t,
                                           float v[kChunks][8]) {
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t f = f0 + t.col(k);
    if (f < n) {
      Io<Bf16Bits>::load(x + f, v[k]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[k][i] = 0.0f;
    }
  }
}

// weighted- on a lane's whole share: v[k] *= s[ch.at(k) + i] (zeros past the message stay
// zeros: the scales are finite), by Channels::near where it applies, so that the next
// chunk's loads are issued before this chunk's products; Channels::at's loop otherwise.
// Measured against the loop on one H100, 64 MB quantize (docs/notebook/2026-12-07.md):
// weighted-hadamard-int4:128 43.3 -> 42.3 us in one call; the 8-bit weighted kernels
// within the drift between two tables.
template <int G>
__device__ __forceinline__ void scale_share(float v[kChunks][8], const float* __restrict__ scale,
                                            int64_t h, const Channels<G>& ch) {
  if (h >= G && h < 0x7FFFFFFFll && (h & 7) == 0 &&
      (reinterpret_cast<uintptr_t>(scale) & 15) == 0) {   // Channels::near applies
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      const float4* p = reinterpret_cast<const float4*>(scale + ch.near(k));
      const float4 a = __ldg(p), b = __ldg(p + 1);
      const float s[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 8; ++i) v[k][i] = __fmul_rn(v[k][i], s[i]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) scale_chunk(v[k], scale, h, ch.at(k));
  }
}

// A lane's share of the tile at flat index f0 as the encoder takes it: loaded
// (load_share), scaled by the weighted- channel scales (SCALE; h channels, ch from the
// share's first value) and rotated (ROT): the first stage of the fused kernels.
template <int G, bool ROT, bool SCALE>
__device__ __forceinline__ void load_mapped_share(const Bf16Bits* __restrict__ x, int64_t n,
                                                  int64_t f0, const Tile<G>& t,
                                                  const float* __restrict__ scale, int64_t h,
                                                  const Channels<G>& ch, float rscale,
                                                  float v[kChunks][8]) {
  load_share(x, n, f0, t, v);
  if (SCALE) scale_share<G>(v, scale, h, ch);
  if (ROT) fwht<G>(v, t.sub, rscale);
}

// weighted-'s restore of 8 values y[i] of channels ch + i (mod h): y[i] * r[i], with r =
// fl32(1 / s) (KernelPlan.inv_scale), saturated to bf16's range (NaN stays), as
// comm/codecs/weighted.py's reference restores before every caller rounds to bf16.
//
// The reference multiplies by the reciprocals rather than dividing by s, for these
// kernels: __fdiv_rn is a subroutine of ~10 instructions, and an exact zero dividend
// (frequent in decoded 4-bit sums) takes its slow path. Measured at one rank on one H100,
// 64 MB (docs/notebook/2026-12-07.md): the weighted fused kernels took 24-28% less time
// restoring by a product than by __fdiv_rn, even with a test that sent chunks near a bf16
// tie to the division (since removed with the division from the reference).
//
// The saturation is the identity wherever a product lies within kBf16Max, so a chunk is
// clamped only where one is larger (one compare a value, in place of two min/max a value).
struct Unscale {
  const float* __restrict__ inv;     // fl32(1 / s)
  int64_t h, ch;
  const float* pre = nullptr;        // the chunk's fl32(1 / s), loaded ahead, or null
  __device__ __forceinline__ void operator()(float y[8]) const {
    float r[8];
    if (pre) {
#pragma unroll
      for (int i = 0; i < 8; ++i) r[i] = pre[i];
    } else {
      chunk_scales(inv, h, ch, r);
    }
    bool big = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      y[i] = __fmul_rn(y[i], r[i]);
      big |= fabsf(y[i]) > kBf16Max;   // false for NaN, which stays
    }
    if (big) {   // rare
#pragma unroll
      for (int i = 0; i < 8; ++i) y[i] = clamp_keep_nan(y[i], kBf16Max);
    }
  }
};

// fn(k, f, unscale) for each chunk k of a lane's share of the tile at flat index f0 that
// lies in the message (f = its first value's flat index < n), with unscale(y) the
// weighted- restore of its 8 values (Unscale; not to be called without SCALE): where the
// tile kernels map a tile back and store it.
//
// Where Channels::near applies to the reciprocals (every model), the next chunk's
// reciprocals are loaded before this chunk is restored and stored (a one-chunk software
// pipeline): loaded inside Unscale, each chunk's two 16-byte loads sat behind the previous
// chunk's rare-path branch, which the compiler does not hoist loads across (SASS, sm_90),
// so every chunk waited out a load. Same products, so the same bits. Measured at one rank
// on one H100, 64 MB, 6 blocks per SM, three alternating runs of each build, with the
// restore's tie test of the time (docs/notebook/2026-12-07.md): weighted-hadamard-int8
// -3.3%, weighted-hadamard-int4 -2.3%, its one-shot kernel -4.7%, weighted-int8 -1.4%; the
// unweighted rows within 0.7%.
template <bool SCALE, int G, typename Fn>
__device__ __forceinline__ void each_live_chunk(const Tile<G>& t, int64_t f0, int64_t n,
                                                const Channels<G>& ch,
                                                const float* __restrict__ inv, int64_t h,
                                                Fn fn) {
  if (SCALE && h >= G && h < 0x7FFFFFFFll && (h & 7) == 0 &&
      (reinterpret_cast<uintptr_t>(inv) & 15) == 0) {   // as in scale_share
    float nxt[8];
    chunk_scales(inv, h, ch.near(0), nxt);
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      float cur[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) cur[i] = nxt[i];
      if (k + 1 < kChunks) chunk_scales(inv, h, ch.near(k + 1), nxt);
      const int64_t f = f0 + t.col(k);
      if (f >= n) continue;
      fn(k, f, Unscale{inv, h, (int64_t)ch.near(k), cur});
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t f = f0 + t.col(k);
    if (f >= n) continue;
    fn(k, f, Unscale{inv, h, SCALE ? ch.at(k) : 0});
  }
}

}  // namespace
