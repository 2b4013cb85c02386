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

// weighted-'s restore of 8 values y[i] of channels ch + i (mod h), saturated to bf16's
// range, as a bf16 output holds it: on return y[i] lies in [-kBf16Max, kBf16Max] (or is
// NaN) and bf16(y[i]) is bf16(clamp(fl32(y[i] / s), kBf16Max)) of the reference
// (comm/codecs/weighted.py; every caller rounds to bf16 next), with s = scale[ch + i] and
// inv = fl32(1 / s) (normal numbers both; WeightedScheme checks the scales' range).
//
// Why not __fdiv_rn: the division is a subroutine of ~10 instructions, and an exact zero
// dividend (frequent in decoded 4-bit sums) takes its slow path. Measured at one rank on
// one H100, 64 MB (docs/notebook/2026-12-07.md): with this restore the weighted fused
// kernels take 24-28% less time than with __fdiv_rn (weighted-hadamard-int8 6%); the
// bare product would take 27-32% less (9%), but it is not the reference's bits.
//
// Why it is exact: q = fl32(y * inv) lies within 3 units in the last place of fl32(y / s)
// (|y * inv - y / s| < ulp(y / s) for a correctly rounded inv, plus the two roundings), so
// bf16(q) differs from bf16(fl32(y / s)) only where the 16 bits that bf16 drops lie within
// 3 of the tie 0x8000. A chunk with a value within kNearTie of it (about 1.4e-4 of values)
// takes the exact quotients instead; everything else keeps q. NaN stays NaN on either path,
// and +-inf saturates as the quotient would. tests/test_codec_cuda_source.py checks values
// at and around the ties bit for bit.
//
// The saturation is the identity wherever |q| <= kBf16Max, so a chunk is clamped only
// where some |q| is larger (one compare a value, accumulated with the tie test's, in
// place of two min/max a value); clamping q or the quotient gives the same bf16 value, as
// the two differ only near a tie and kBf16Max is none.
constexpr uint32_t kNearTie = 4;
__device__ __forceinline__ bool near_bf16_tie(float q) {
  // the dropped 16 bits shifted to the top, so that the window's wrap is the register's:
  // two instructions a value (LEA, and ISETP accumulating the chunk's predicate)
  return __float_as_uint(q) * 65536u + ((kNearTie - 0x8000u) << 16) <=
         ((2 * kNearTie) << 16 | 0xFFFFu);
}

struct Unscale {
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
    bool near = false, big = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      q[i] = __fmul_rn(y[i], r[i]);
      near |= near_bf16_tie(q[i]);
      big |= fabsf(q[i]) > kBf16Max;   // false for NaN, which stays
    }
    if (near | big) {   // rare (see above)
      if (near) {       // the chunk's exact quotients
        float s[8];
        chunk_scales(scale, h, ch, s);
#pragma unroll
        for (int i = 0; i < 8; ++i) q[i] = __fdiv_rn(y[i], s[i]);
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) q[i] = clamp_keep_nan(q[i], kBf16Max);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = q[i];
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
// on one H100, 64 MB, 6 blocks per SM, three alternating runs of each build
// (docs/notebook/2026-12-07.md): weighted-hadamard-int8 -3.3%, weighted-hadamard-int4
// -2.3%, its one-shot kernel -4.7%, weighted-int8 -1.4%; the unweighted rows within 0.7%.
template <bool SCALE, int G, typename Fn>
__device__ __forceinline__ void each_live_chunk(const Tile<G>& t, int64_t f0, int64_t n,
                                                const Channels<G>& ch,
                                                const float* __restrict__ scale,
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
      fn(k, f, Unscale{scale, inv, h, (int64_t)ch.near(k), cur});
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    const int64_t f = f0 + t.col(k);
    if (f >= n) continue;
    fn(k, f, Unscale{scale, inv, h, SCALE ? ch.at(k) : 0});
  }
}

}  // namespace
