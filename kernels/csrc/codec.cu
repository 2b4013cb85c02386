// CUDA C++ kernels of the integer group codecs (symmetric int8:G and int4-sym:G,
// asymmetric int4:G; G = 64 or 128), with the hadamard- rotation and the weighted-
// channel scales folded in: quantize, dequantize, dequantize-and-sum, and error
// feedback's error part. kernels/codec_cuda.py builds this file on first use and says
// which codecs and layouts it takes.
//
// The arithmetic is that of kernels/quant.py (itself a copy of the reference,
// megatron_lite/comm/codecs/group.py), step for step: every product, sum and quotient is
// an explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn, and
// __fmaf_rn only where its product is exact), which nvcc never contracts, so codes,
// metadata and decoded values are the reference's bits. bf16 conversions are integer ops
// (round to nearest even; NaN becomes 0x7FC0, as c10 does).
//
// These kernels are bound by instruction issue, not by memory (docs/notebook/), so the
// code avoids the instructions that issue slowly on sm_90: rounding and int<->float
// conversions are float additions against 2^23 (see rint_bits, code_value), the
// butterflies that cross lanes are one FMA each, and a thread holds 32 values of one
// group so that warp shuffles are few per value (see Tile).
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "codec_tile.cuh"
#include "codec_weighted.cuh"
#include "entry.h"

namespace {

constexpr int kThreads = 256;

// Tile vb covers blockDim.x * kVals values of one row (blockDim.x: threads_for): the
// row's block vb % bpr; the row is vb / bpr, uniform in the block (no 64-bit division per
// thread).
template <int G>
__device__ __forceinline__ Tile<G> tile_at(int64_t n, uint32_t bpr, uint32_t vb) {
  Tile<G> t;
  uint32_t row = vb / bpr;
  uint32_t b = vb - row * bpr;
  int64_t gi = ((int64_t)b * blockDim.x + threadIdx.x) / Tile<G>::LPG;
  t.row = row;
  t.g0 = gi * G;
  t.sub = threadIdx.x & (Tile<G>::LPG - 1);
  t.live = t.g0 < n;
  return t;
}

// The block's own tile (one tile per block).
template <int G>
__device__ __forceinline__ Tile<G> tile_of(int64_t n, uint32_t bpr) {
  return tile_at<G>(n, bpr, blockIdx.x);
}

// Tile vb of a grid of `tiles` per block (decode_kernel): not live at or past nblk.
template <int G>
__device__ __forceinline__ Tile<G> tile_of(int64_t n, uint32_t bpr, uint32_t vb,
                                           uint32_t nblk) {
  Tile<G> t = tile_at<G>(n, bpr, vb);
  t.live = vb < nblk && t.live;
  return t;
}

// A warp's tile, 32 * kVals consecutive values of one row, through shared memory: each
// global load or store instruction of the warp then covers 512 contiguous bytes. The Tile
// layout's own accesses cover, per instruction, 16 pieces of 32 bytes at G = 64 (bf16),
// one per 128-byte line, and at fp32 every other 16 bytes of the lines they touch. Slots
// are the tile's 16-byte words in row order; slot s sits at s ^ mask, the mask made of the
// group's index within a quarter warp put into the slot bits that a group's lanes do not
// vary, so that neither the Tile-ordered nor the row-ordered accesses of a quarter warp (8
// lanes, one shared-memory wavefront of 128 bytes) meet a bank conflict.
//
// Where it pays, measured on an H100 at 64 MB against the direct accesses
// (docs/notebook/2026-12-06.md, fourth part): at G = 64 every store (int4:64 dequantize
// 1.87 -> 2.50 TB/s, error part 1.87 -> 2.83, hadamard-int4:64 dequantize 1.85 -> 2.75)
// and every load (int4:64 quantize 2.73 -> 2.88); at G = 128 the fp32 stores of a
// dequantize (rotated: 2.60 -> 2.74) and of the unrotated error part (int4:128 2.50 ->
// 2.81). Elsewhere at G = 128 it cost 2-9% (bf16 stores, loads, the sums and the rotated
// error part, whose instruction issue is the limit), so those keep the direct accesses.
__device__ __forceinline__ uint4* stage_words() {
  __shared__ uint4 words[kThreads * kVals * 4 / 16];   // fp32 values: 32 KB per block
  return words + (threadIdx.x / 32) * (32 * kVals * 4 / 16);
}

template <typename T, int G>
struct Stage {
  using I = Io<T>;
  static constexpr int W = I::kWords;                 // slots per chunk of 8 values
  static constexpr int LPG = Tile<G>::LPG;
  static constexpr int SG = LPG * kChunks * W;        // slots per group
  static constexpr int ROUNDS = kChunks * W;          // a warp's row-ordered accesses
  static constexpr int LO = W == 1 ? 0 : 1;           // log2 W: the slot bits of W
  static constexpr int LW = LPG == 2 ? 1 : 2;         // log2 LPG: the bits of a group's lanes
  static_assert(LPG == 2 || LPG == 4, "G = 64 or 128");

  static __device__ __forceinline__ int at(int s) {
    const int jq = (s / SG) & (8 / LPG - 1);
    int m = 0, b = 0;
#pragma unroll
    for (int bit = 0; bit < 3; ++bit) {
      if (bit < LO || bit >= LO + LW) {
        m |= ((jq >> b) & 1) << bit;
        ++b;
      }
    }
    return s ^ m;
  }
  // slot of word h of this lane's chunk k (lane: t.sub of group j of the warp)
  static __device__ __forceinline__ int mine(int j, int sub, int k, int h) {
    return at(j * SG + (k * LPG + sub) * W + h);
  }
  // the warp's first value in its row, from any of its lanes' tiles
  static __device__ __forceinline__ int64_t base(const Tile<G>& t) {
    return t.g0 - (int64_t)((threadIdx.x & 31) / LPG) * G;
  }

  // v (every lane of the warp, live or not) to the row `row` of n values: the live
  // groups. The kernel's last use of the words (no barrier after it).
  template <bool CS = false>
  static __device__ __forceinline__ void store(T* row, int64_t n, const Tile<G>& t,
                                               const float v[kChunks][8]) {
    uint4* w = stage_words();
    const int lane = threadIdx.x & 31, j = lane / LPG;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      uint4 p[W];
      I::pack(v[k], p);
#pragma unroll
      for (int h = 0; h < W; ++h) w[mine(j, t.sub, k, h)] = p[h];
    }
    __syncwarp();
    const int64_t b0 = base(t);
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int s = r * 32 + lane;
      if (b0 + (int64_t)(s / SG) * G >= n) continue;
      uint4* dst = reinterpret_cast<uint4*>(row + b0 + s * (8 / W));
      if constexpr (CS) __stcs(dst, w[at(s)]);
      else *dst = w[at(s)];
    }
  }

  // the row's values of this lane's chunks into v (0 past the row's end)
  static __device__ __forceinline__ void load(const T* row, int64_t n, const Tile<G>& t,
                                              float v[kChunks][8]) {
    uint4* w = stage_words();
    const int lane = threadIdx.x & 31, j = lane / LPG;
    const int64_t b0 = base(t);
#pragma unroll
    for (int r = 0; r < ROUNDS; ++r) {
      const int s = r * 32 + lane;
      w[at(s)] = b0 + (int64_t)(s / SG) * G < n
                     ? __ldcs(reinterpret_cast<const uint4*>(row + b0 + s * (8 / W)))
                     : make_uint4(0u, 0u, 0u, 0u);
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      uint4 p[W];
#pragma unroll
      for (int h = 0; h < W; ++h) p[h] = w[mine(j, t.sub, k, h)];
      I::unpack(p, v[k]);
    }
    __syncwarp();   // every lane has read before the words are written again
  }
};

// 4 blocks per SM: 64 registers. Without the bound scale_share's straight-line code takes
// 70-80 registers in 7 of the weighted kernels (3 blocks per SM); with it no quantize
// kernel spills (ptxas -v, sm_90).
template <typename T, int KIND, int BITS, int G, bool ROT, bool SCALE>
__global__ void __launch_bounds__(kThreads, 4) quantize_kernel(
    const T* __restrict__ x, uint8_t* __restrict__ buf, const float* __restrict__ scale,
    int64_t h, int64_t n, int64_t nbytes_row, float c2, float rscale, uint32_t bpr) {
  const Tile<G> t = tile_of<G>(n, bpr);
  float v[kChunks][8];
  if constexpr (G == 64) {
    Stage<T, G>::load(x + t.row * n, n, t, v);
  } else {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if (t.live) {
        Io<T>::load(x + t.row * n + t.col(k), v[k]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[k][i] = 0.0f;
      }
    }
  }
  if (SCALE && t.live) scale_share<G>(v, scale, h, Channels<G>(t.row * n + t.col(0), h));
  if (ROT) fwht<G>(v, t.sub, rscale);
  const Coded c = encode_group<KIND, BITS, G>(v, c2);
  if (!t.live) return;   // after the group's last shuffle
  store_group<KIND, BITS, G>(c, t, buf, Where<BITS, G>(t.row, t.g0, n, nbytes_row));
}

// v (this lane's chunks of tile t) to the row `row` of n values: through Stage where
// `stage` (every lane of the warp calls it, live or not), else the live lanes' direct
// 16-byte stores; CS: streaming stores (st.global.cs).
template <bool CS, typename T, int G>
__device__ __forceinline__ void store_values(T* row, int64_t n, const Tile<G>& t,
                                             const float v[kChunks][8], bool stage) {
  if (stage) {
    Stage<T, G>::template store<CS>(row, n, t, v);
    return;
  }
  if (!t.live) return;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) Io<T>::template store<CS>(row + t.col(k), v[k]);
}

// out[o] = sum over r = 0 .. per-1 of decode(buf[o*so + r*sr]) (fp32, in r order), then,
// with ROT, rotated back (not clamped again): kernels/quant.py's dequantize (so = per,
// sr = 1), or, with so = 1 and sr = outs, the one-shot all-reduce's sum over the ranks of
// each chunk of a gathered [ranks, chunks, bytes] buffer, in one launch.
template <typename T, int KIND, int BITS, int G, bool ROT>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(
    const uint8_t* __restrict__ buf, T* __restrict__ out, int64_t per, int64_t so,
    int64_t sr, int64_t n, int64_t nbytes_row, float lim, float rscale, uint32_t bpr) {
  const Tile<G> t = tile_of<G>(n, bpr);   // t.row: the output row o
  float acc[kChunks][8];
  if (t.live) {
    decode_sum<KIND, BITS, G, BITS == 4 && G == 128>(per, lim, [&](int64_t r,
                                                               Packed<KIND, BITS, G>& p) {
      p.template load<true>(buf, t, Where<BITS, G>(t.row * so + r * sr, t.g0, n, nbytes_row));
    }, acc);
  } else {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[k][i] = 0.0f;
    }
  }
  if (ROT) fwht<G>(acc, t.sub, rscale);
  // A plain dequantize (per = 1) streams its values out (st.global.cs: evict first).
  // Measured on an H100 at 64 MB, every value store streamed against none (one call,
  // docs/notebook/2026-12-06.md): the dequantizes 2-12% faster (int8:128 2.52 -> 2.57
  // TB/s, int4:128 2.58 -> 2.90, int4:64 2.53 -> 2.64, hadamard-int4:128 2.74 -> 2.80),
  // the sums of 4 rows up to 2% slower (int4:64 2.45 -> 2.41), so the sums keep the
  // plain stores. weighted-hadamard-int5:64 is the one dequantize streaming costs at 64 MB
  // (2.62 -> 2.52 TB/s), and it gains 17-18% at 16 and 32 MB
  // (docs/notebook/logs/2026-12-07-dequantize-stores-ab-h100.txt), so it streams too.
  const bool stage = G == 64 || (sizeof(T) == 4 && per == 1);   // see Stage
  if (per == 1) {
    store_values<true>(out + t.row * n, n, t, acc, stage);
  } else {
    store_values<false>(out + t.row * n, n, t, acc, stage);
  }
}

// dequantize_kernel for int5 without the rotation or a sum (per = 1): out[r] =
// decode(buf[r]) chunk by chunk, so that a thread holds 8 decoded values at a time, not
// 32 (40 to 48 registers instead of 80), and each block does `tiles` tiles (tiles_for),
// loading tile i + 1's codes before it decodes tile i. Measured on an H100 at 64 MB: int5
// 41.3 -> 35.3 us; the same kernel made int4 15-34% and int8 5% slower
// (docs/notebook/2026-12-06.md), so they keep dequantize_kernel.
template <typename T, int KIND, int BITS, int G>
__global__ void __launch_bounds__(kThreads) decode_kernel(
    const uint8_t* __restrict__ buf, T* __restrict__ out, int64_t n, int64_t nbytes_row,
    float lim, uint32_t bpr, uint32_t nblk, uint32_t tiles) {
  const uint32_t vb = blockIdx.x * tiles;
  Tile<G> t = tile_of<G>(n, bpr, vb, nblk);
  Packed<KIND, BITS, G> p;
  if (t.live) p.template load<true>(buf, t, Where<BITS, G>(t.row, t.g0, n, nbytes_row));
  for (uint32_t i = 0; i < tiles; ++i) {
    const Packed<KIND, BITS, G> cur = p;
    const Tile<G> at = t;
    if (i + 1 < tiles) {
      t = tile_of<G>(n, bpr, vb + i + 1, nblk);
      if (t.live) p.template load<true>(buf, t, Where<BITS, G>(t.row, t.g0, n, nbytes_row));
    }
    if (!at.live) continue;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      float y[8];
      decode_chunk<KIND, BITS, G>(cur, k, lim, y);
      Io<T>::store(out + at.row * n + at.col(k), y);
    }
  }
}

// out[r] = nan_to_num(rot(decode(buf[r]) - rot(x[r]))), fp32: the error part of
// Scheme.own_error (kernels/quant.py's error_part)
template <typename T, int KIND, int BITS, int G, bool ROT>
__global__ void __launch_bounds__(kThreads) error_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ buf, float* __restrict__ out,
    int64_t n, int64_t nbytes_row, float rscale, uint32_t bpr) {
  const Tile<G> t = tile_of<G>(n, bpr);
  float v[kChunks][8];
  Packed<KIND, BITS, G> p;
  if constexpr (G == 64) {
    Stage<T, G>::load(x + t.row * n, n, t, v);
    if (t.live) p.template load<true>(buf, t, Where<BITS, G>(t.row, t.g0, n, nbytes_row));
  } else if (t.live) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) Io<T>::load(x + t.row * n + t.col(k), v[k]);
    p.template load<true>(buf, t, Where<BITS, G>(t.row, t.g0, n, nbytes_row));
  } else {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[k][i] = 0.0f;
    }
  }
  if (ROT) fwht<G>(v, t.sub, rscale);
  // v becomes decode - v chunk by chunk (8 decoded values live at a time, not 32: see
  // decode_chunk); lanes past the row's end hold 0 - 0
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    float y[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (t.live) decode_chunk<KIND, BITS, G>(p, k, kBf16Max, y);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[k][i] = __fsub_rn(y[i], v[k][i]);
  }
  if (ROT) fwht<G>(v, t.sub, rscale);
  constexpr bool stage = G == 64 || !ROT;   // see Stage
  if (!stage && !t.live) return;
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      v[k][i] = ((v[k][i] != v[k][i]) || fabsf(v[k][i]) > kFp32Max) ? 0.0f : v[k][i];
    if constexpr (!stage) Io<float>::store(out + t.row * n + t.col(k), v[k]);
  }
  if constexpr (stage) Stage<float, G>::store(out + t.row * n, n, t, v);
}

// Blocks per row of n values at `threads` per block (the grid: rows * that, at most
// 2^31 - 1 blocks).
uint32_t blocks_per_row(int64_t n, int threads) {
  int64_t per = (int64_t)threads * kVals;
  return (uint32_t)((n + per - 1) / per);
}

// Threads per block: kThreads, or fewer where blocks of kThreads would leave SMs idle. A
// thread's share is fixed (kVals values, the Tile layout), so a small message has few
// threads, and in blocks of 256 they land on a fraction of the SMs: a 1 MB dequantize-
// and-sum of 4 rows is 16 blocks on an H100's 132 SMs, and ran at half of Triton's speed
// (docs/results/codec_kernels.md). Smaller blocks spread the same threads over more SMs,
// and with them more loads in flight. kFillBlocks: two blocks for each SM of an H100 or
// H200 (132); past it every block keeps kThreads.
constexpr int64_t kFillBlocks = 2 * 132;
int threads_for(int64_t rows, int64_t n) {
  int th = kThreads;
  while (th > 32 && rows * (int64_t)blocks_per_row(n, th) < kFillBlocks) th /= 2;
  return th;
}

// Tiles per block of decode_kernel: two where the grid of one tile per block is at
// least 4 kFillBlocks (about 17 MB of bf16 at 256 threads), so that halving it still
// fills every SM; one below, where a small message needs every block it can get.
uint32_t tiles_for(int64_t nblk) { return nblk >= 4 * kFillBlocks ? 2u : 1u; }

}  // namespace

// Entry points (pointers and the stream as integers; kernels/codec_cuda.py checks every
// argument). Each returns a cudaError_t code, 0 on success.
int ml_codec_quantize(int64_t x, int64_t buf, int64_t scale, int64_t h, int64_t rows,
                      int64_t n, int64_t nb, int64_t dtype, int64_t kind, int64_t bits,
                      int64_t g, bool rot, double c2, double rscale, int64_t stream) {
  const float* sp = reinterpret_cast<const float*>(scale);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int th = threads_for(rows, n);
  uint32_t bpr = blocks_per_row(n, th);
  int64_t nblk = rows * bpr;
  if (nblk > 0x7FFFFFFFll) return (int)cudaErrorInvalidConfiguration;
  return (int)with_dtype((int)dtype, [&](auto z) {
    using T = decltype(z);
    const T* xp = reinterpret_cast<const T*>(x);
    uint8_t* bp = reinterpret_cast<uint8_t*>(buf);
    return dispatch((int)kind, (int)bits, (int)g, rot, [&](auto k, auto b, auto gg, auto r) {
      constexpr int K = decltype(k)::value, B = decltype(b)::value, G = decltype(gg)::value;
      constexpr bool R = decltype(r)::value;
      auto kernel = sp ? quantize_kernel<T, K, B, G, R, true>
                       : quantize_kernel<T, K, B, G, R, false>;
      return launch(kernel, nblk, th, st, xp, bp, sp, h, n, nb, (float)c2, (float)rscale,
                    bpr);
    });
  });
}

int ml_codec_dequantize(int64_t buf, int64_t out, int64_t outs, int64_t per, int64_t so,
                        int64_t sr, int64_t n, int64_t nb, int64_t dtype, int64_t kind,
                        int64_t bits, int64_t g, bool rot, double lim, double rscale,
                        int64_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int th = threads_for(outs, n);
  uint32_t bpr = blocks_per_row(n, th);
  int64_t nblk = outs * bpr;
  if (nblk > 0x7FFFFFFFll) return (int)cudaErrorInvalidConfiguration;
  return (int)with_dtype((int)dtype, [&](auto z) {
    using T = decltype(z);
    const uint8_t* bp = reinterpret_cast<const uint8_t*>(buf);
    T* op = reinterpret_cast<T*>(out);
    if (kind == kAsym && bits == 5 && !rot && per == 1) {   // so = sr = 1
      if (g != 128 && g != 64) return cudaErrorInvalidValue;
      const uint32_t tiles = tiles_for(nblk);
      const int64_t grid = (nblk + tiles - 1) / tiles;
      auto kernel = g == 128 ? decode_kernel<T, kAsym, 5, 128> : decode_kernel<T, kAsym, 5, 64>;
      return launch(kernel, grid, th, st, bp, op, n, nb, (float)lim, bpr, (uint32_t)nblk,
                    tiles);
    }
    return dispatch((int)kind, (int)bits, (int)g, rot, [&](auto k, auto b, auto gg, auto r) {
      constexpr int K = decltype(k)::value, B = decltype(b)::value, G = decltype(gg)::value;
      return launch(dequantize_kernel<T, K, B, G, decltype(r)::value>, nblk, th, st, bp,
                    op, per, so, sr, n, nb, (float)lim, (float)rscale, bpr);
    });
  });
}

int ml_codec_error(int64_t x, int64_t buf, int64_t out, int64_t rows, int64_t n, int64_t nb,
                   int64_t dtype, int64_t kind, int64_t bits, int64_t g, bool rot,
                   double rscale, int64_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  const int th = threads_for(rows, n);
  uint32_t bpr = blocks_per_row(n, th);
  int64_t nblk = rows * bpr;
  if (nblk > 0x7FFFFFFFll) return (int)cudaErrorInvalidConfiguration;
  return (int)with_dtype((int)dtype, [&](auto z) {
    using T = decltype(z);
    const T* xp = reinterpret_cast<const T*>(x);
    const uint8_t* bp = reinterpret_cast<const uint8_t*>(buf);
    float* op = reinterpret_cast<float*>(out);
    return dispatch((int)kind, (int)bits, (int)g, rot, [&](auto k, auto b, auto gg, auto r) {
      constexpr int K = decltype(k)::value, B = decltype(b)::value, G = decltype(gg)::value;
      return launch(error_kernel<T, K, B, G, decltype(r)::value>, nblk, th, st, xp, bp,
                    op, n, nb, (float)rscale, bpr);
    });
  });
}
