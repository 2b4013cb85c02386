// The quantized two-shot all-reduce in one launch, on the codec kernels' group code
// (codec_tile.cuh, codec_weighted.cuh), over the symmetric workspace of
// kernels/workspace.py: the protocol of kernels/fused_allreduce.py's Triton kernel (same
// flags, epochs, slots and barriers), for bf16 messages and the one-stage codecs codec.cu
// takes. kernels/codec_cuda.py says when it runs. Block b of every rank owns tiles b,
// b + grid, ... of every chunk (chunk j: values [j*chunk, (j+1)*chunk), reduced by rank
// j); a tile is blockDim.x * 32 values, whole groups, stored as one row of the codec
// layout, zeros past the message:
//
//   1. encode (scale, rotate) each chunk j's tiles into rank j's recv[me];  barrier 2
//   2. decode recv[0..W-1] of my tiles, sum in fp32 in rank order, encode the sum into
//      every rank's gather[me];                                              barrier 3
//   3. decode gather[0..W-1] into the output (rotate back, unscale, saturate).
//
// Every rank decodes the same bytes in the same order, so ranks agree bitwise, and the
// result is comm/algorithms.py's two-step all-reduce, bit for bit.
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "codec_tile.cuh"
#include "codec_weighted.cuh"
#include "entry.h"
#include "peers.cuh"

namespace {

struct TwoShotArgs {
  int64_t n, chunk, tiles, tile_bytes;           // message, chunk and tile geometry
  int64_t flag_off, recv_off, gather_off, slot;  // workspace layout (bytes)
  int rank, world, maxb;
  int64_t h, spin;
  float c2, rscale, out_lim, lim_rot;            // codec; the step-3 saturations
};

template <int KIND, int BITS, int G, bool ROT, bool SCALE>
__global__ void __launch_bounds__(kMaxTwoShotThreads, kTileBlocksPerSM) two_shot_kernel(
    const Bf16Bits* __restrict__ x, Bf16Bits* __restrict__ out, uint8_t* ws, int* cnt,
    int* status, const __grid_constant__ Peers peers, const float* __restrict__ scale,
    const float* __restrict__ inv, const __grid_constant__ TwoShotArgs a) {
  const int64_t tile = (int64_t)blockDim.x * kVals;
  const int b = blockIdx.x, nb = gridDim.x;
  const int epoch = cnt[b] + 1;
  const Tile<G> t = tile_lane<G>();
  const Where<BITS, G> at(0, t.g0, tile, a.tile_bytes);   // within a stored tile

  // 1. my tiles of every chunk j, encoded into rank j's recv[me]
  for (int64_t tt = b; tt < a.tiles; tt += nb) {
    for (int j = 0; j < a.world; ++j) {
      const int64_t f0 = j * a.chunk + tt * tile;
      const Channels<G> ch(SCALE ? f0 + t.col(0) : 0, SCALE ? a.h : 1);
      float v[kChunks][8];
      load_mapped_share<G, ROT, SCALE>(x, a.n, f0, t, scale, a.h, ch, a.rscale, v);
      const Coded c = encode_group<KIND, BITS, G>(v, a.c2);
      store_group<KIND, BITS, G>(c, t, ws + peers.delta[j] + a.recv_off + a.rank * a.slot +
                                           tt * a.tile_bytes, at);
    }
  }
  block_barrier(ws, peers, a.flag_off, 2, a.rank, a.world, a.maxb, b, epoch, status, a.spin);

  // 2. my chunk: every rank's copy decoded (saturated to bf16's range, as the reference's
  //    fp32 decode), summed in rank order, encoded into every rank's gather[me]
  for (int64_t tt = b; tt < a.tiles; tt += nb) {
    const uint8_t* src = ws + a.recv_off + tt * a.tile_bytes;
    float acc[kChunks][8];
    decode_sum<KIND, BITS, G>(a.world, kBf16Max, [&](int64_t s, Packed<KIND, BITS, G>& p) {
      p.load(src + s * a.slot, t, at);
    }, acc);
    const Coded c = encode_group<KIND, BITS, G>(acc, a.c2);
    for (int j = 0; j < a.world; ++j)
      store_group<KIND, BITS, G>(c, t, ws + peers.delta[j] + a.gather_off + a.rank * a.slot +
                                           tt * a.tile_bytes, at);
  }
  block_barrier(ws, peers, a.flag_off, 3, a.rank, a.world, a.maxb, b, epoch, status, a.spin);

  // 3. every owner's reduced tiles into the output
  for (int64_t tt = b; tt < a.tiles; tt += nb) {
    Packed<KIND, BITS, G> q;   // the next owner's codes, loaded a step ahead (decode_sum)
    q.load(ws + a.gather_off + tt * a.tile_bytes, t, at);
    for (int o = 0; o < a.world; ++o) {
      const Packed<KIND, BITS, G> p = q;
      if (o + 1 < a.world) q.load(ws + a.gather_off + (o + 1) * a.slot + tt * a.tile_bytes, t, at);
      float y[kChunks][8];
      decode<KIND, BITS, G>(p, a.out_lim, y);
      if (ROT) {   // back from the rotated basis, saturated (kernels/maps.py)
        fwht<G>(y, t.sub, a.rscale);
#pragma unroll
        for (int k = 0; k < kChunks; ++k) {
#pragma unroll
          for (int i = 0; i < 8; ++i) y[k][i] = clamp_keep_nan(y[k][i], a.lim_rot);
        }
      }
      const int64_t f0 = o * a.chunk + tt * tile;
      const Channels<G> ch(SCALE ? f0 + t.col(0) : 0, SCALE ? a.h : 1);
      each_live_chunk<SCALE>(t, f0, a.n, ch, scale, inv, a.h,
                             [&](int k, int64_t f, const Unscale& unscale) {
        if (SCALE) unscale(y[k]);   // saturated to bf16's range as well
        Io<Bf16Bits>::store(out + f, y[k]);
      });
    }
  }
  if (threadIdx.x == 0) cnt[b] = epoch;
}

// One element of the one-shot kernel, as its raw bits U: read as fp32 (exact) and the
// fp32 sum written back rounded to nearest even (kernels/quant.py's load_f32 / cast_out).
template <typename T> struct Elt;
template <> struct Elt<Bf16Bits> {
  using U = uint16_t;
  static __device__ __forceinline__ float f32(U u) { return bits_f((uint32_t)u << 16); }
  static __device__ __forceinline__ U bits(float v) { return (U)bf16_bits(v); }
};
template <> struct Elt<__half> {
  using U = uint16_t;
  static __device__ __forceinline__ float f32(U u) {
    return __half2float(*reinterpret_cast<const __half*>(&u));
  }
  static __device__ __forceinline__ U bits(float v) {
    __half h = __float2half_rn(v);
    return *reinterpret_cast<const U*>(&h);
  }
};
template <> struct Elt<float> {
  using U = uint32_t;
  static __device__ __forceinline__ float f32(U u) { return bits_f(u); }
  static __device__ __forceinline__ U bits(float v) { return __float_as_uint(v); }
};

constexpr int kOneShotThreads = 256;

// kernels/fused_allreduce.py's one-shot all-reduce (_one_shot_kernel), the same protocol
// over the same workspace and the same bits, launched through the extension rather than
// Triton's Python launcher (with the Triton kernel an eager call took 44 us of host time:
// docs/notebook/2026-12-05.md). Block b owns elements
// [b * block_elems, (b + 1) * block_elems) of the message: it stores them, as raw bits,
// into slot [parity][me] of every rank, meets the blocks b of the other ranks at the
// barrier of row `parity`, and sums the W slots in fp32 in rank order 0 .. W-1. Blocks
// past the message only meet at the barrier. 16-byte accesses (8 bf16 / fp16 or 4 fp32
// values); data_off and slot_bytes are multiples of 16 (the launcher checks).
template <typename T>
__global__ void __launch_bounds__(kOneShotThreads) one_shot_kernel(
    const T* __restrict__ x, T* __restrict__ out, uint8_t* ws, int* cnt, int* status,
    const __grid_constant__ Peers peers, int64_t n, int64_t block_elems, int64_t flag_off,
    int64_t data_off, int64_t slot_bytes, int rank, int world, int maxb, int64_t spin) {
  using U = typename Elt<T>::U;
  constexpr int V = 16 / sizeof(U);
  const int b = blockIdx.x;
  const int epoch = cnt[b] + 1;
  const int par = epoch & 1;
  const int64_t lo = (int64_t)b * block_elems;
  const int64_t hi = lo + block_elems < n ? lo + block_elems : n;
  const int64_t step = (int64_t)blockDim.x * V;
  const U* xs = reinterpret_cast<const U*>(x);
  const int64_t mine = data_off + ((int64_t)par * world + rank) * slot_bytes;
  for (int64_t i = lo + (int64_t)threadIdx.x * V; i < hi; i += step) {
    if (i + V <= hi) {
      const uint4 v = __ldcs(reinterpret_cast<const uint4*>(xs + i));
      for (int j = 0; j < world; ++j)
        *reinterpret_cast<uint4*>(ws + peers.delta[j] + mine + i * (int64_t)sizeof(U)) = v;
    } else {   // the message's last, partial vector
      for (int64_t e = i; e < hi; ++e) {
        const U v = xs[e];
        for (int j = 0; j < world; ++j)
          *reinterpret_cast<U*>(ws + peers.delta[j] + mine + e * (int64_t)sizeof(U)) = v;
      }
    }
  }
  block_barrier(ws, peers, flag_off, par, rank, world, maxb, b, epoch, status, spin);
  const uint8_t* base = ws + data_off + (int64_t)par * world * slot_bytes;
  U* os = reinterpret_cast<U*>(out);
  for (int64_t i = lo + (int64_t)threadIdx.x * V; i < hi; i += step) {
    const int m = i + V <= hi ? V : (int)(hi - i);
    float acc[V];
    for (int src = 0; src < world; ++src) {   // fixed order: every rank gets the same bits
      const U* p = reinterpret_cast<const U*>(base + src * slot_bytes) + i;
      U u[V];
      if (m == V) {
        const uint4 v = __ldcg(reinterpret_cast<const uint4*>(p));
        const U* w = reinterpret_cast<const U*>(&v);
#pragma unroll
        for (int e = 0; e < V; ++e) u[e] = w[e];
      } else {
        for (int e = 0; e < m; ++e) u[e] = __ldcg(p + e);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        if (e < m) acc[e] = src == 0 ? Elt<T>::f32(u[e]) : __fadd_rn(acc[e], Elt<T>::f32(u[e]));
      }
    }
    if (m == V) {
      U r[V];
#pragma unroll
      for (int e = 0; e < V; ++e) r[e] = Elt<T>::bits(acc[e]);
      *reinterpret_cast<uint4*>(os + i) = *reinterpret_cast<const uint4*>(r);
    } else {
      for (int e = 0; e < m; ++e) os[i + e] = Elt<T>::bits(acc[e]);
    }
  }
  if (threadIdx.x == 0) cnt[b] = epoch;
}

}  // namespace

// Entry points (pointers as integers; kernels/codec_cuda.py checks every argument). A
// prepare returns the launch's handle (>= 0) or minus a cudaError_t code.
int64_t ml_one_shot_prepare(int64_t ws, int64_t cnt, int64_t status,
                            std::vector<int64_t> deltas, int64_t n, int64_t block_elems,
                            int64_t flag_off, int64_t data_off, int64_t slot_bytes,
                            int64_t rank, int64_t world, int64_t maxb, int64_t dtype,
                            int64_t spin, int64_t grid) {
  Peers peers;
  if (!make_peers(deltas, world, peers) || grid < 1 || grid > maxb || block_elems < 8 ||
      block_elems % 8 || data_off % 16 || slot_bytes % 16)
    return -(int64_t)cudaErrorInvalidValue;
  int64_t handle = -(int64_t)cudaErrorInvalidValue;
  const cudaError_t e = with_dtype((int)dtype, [&](auto z) {
    using T = decltype(z);
    auto kernel = one_shot_kernel<T>;
    // every block spins at the barrier: the grid must be resident at once (see above);
    // the Triton kernel runs the same grid, so refuse rather than shrink it
    const int64_t cap = resident_blocks(kernel, kOneShotThreads);
    if (cap > 0 && grid > cap) return cudaErrorInvalidValue;
    handle = ml_prepared::add([=](int64_t x, int64_t out, int64_t, cudaStream_t st) {
      if ((x | out) % 16) return cudaErrorInvalidValue;
      return launch(kernel, grid, kOneShotThreads, st, reinterpret_cast<const T*>(x),
                    reinterpret_cast<T*>(out), reinterpret_cast<uint8_t*>(ws),
                    reinterpret_cast<int*>(cnt), reinterpret_cast<int*>(status), peers, n,
                    block_elems, flag_off, data_off, slot_bytes, (int)rank, (int)world,
                    (int)maxb, spin);
    });
    return cudaSuccess;
  });
  return e != cudaSuccess ? -(int64_t)e : handle;
}

int64_t ml_two_shot_prepare(int64_t ws, int64_t cnt, int64_t status,
                            std::vector<int64_t> deltas, int64_t scale, int64_t inv,
                            int64_t n, int64_t chunk, int64_t tiles, int64_t tile,
                            int64_t tile_bytes,
                            int64_t flag_off, int64_t recv_off, int64_t gather_off,
                            int64_t slot, int64_t rank, int64_t world, int64_t maxb,
                            int64_t kind, int64_t bits, int64_t g, bool rot, int64_t h,
                            double c2, double rscale, double out_lim, double lim_rot,
                            int64_t spin, int64_t grid) {
  Peers peers;
  if (!make_peers(deltas, world, peers) || !tile_fits(tile) || grid < 1 || grid > maxb)
    return -(int64_t)cudaErrorInvalidValue;
  TwoShotArgs a{n, chunk, tiles, tile_bytes, flag_off, recv_off, gather_off, slot,
                (int)rank, (int)world, (int)maxb, h, spin, (float)c2, (float)rscale,
                (float)out_lim, (float)lim_rot};
  const float* sp = reinterpret_cast<const float*>(scale);
  const float* ip = reinterpret_cast<const float*>(inv);
  if (!sp != !ip) return -(int64_t)cudaErrorInvalidValue;
  uint8_t* wp = reinterpret_cast<uint8_t*>(ws);
  int* cp = reinterpret_cast<int*>(cnt);
  int* stp = reinterpret_cast<int*>(status);
  int64_t handle = -(int64_t)cudaErrorInvalidValue;
  const cudaError_t e = dispatch((int)kind, (int)bits, (int)g, rot,
                                 [&](auto k, auto b, auto gg, auto r) {
    constexpr int K = decltype(k)::value, B = decltype(b)::value, G = decltype(gg)::value;
    constexpr bool R = decltype(r)::value;
    auto kernel = sp ? two_shot_kernel<K, B, G, R, true> : two_shot_kernel<K, B, G, R, false>;
    const int block = (int)(tile / kVals);
    const int64_t gr = resident_grid(kernel, block, grid);
    handle = ml_prepared::add([=](int64_t x, int64_t out, int64_t, cudaStream_t st) {
      if ((x | out) % 16) return cudaErrorInvalidValue;
      return launch(kernel, gr, block, st, reinterpret_cast<const Bf16Bits*>(x),
                    reinterpret_cast<Bf16Bits*>(out), wp, cp, stp, peers, sp, ip, a);
    });
    return cudaSuccess;
  });
  return e != cudaSuccess ? -(int64_t)e : handle;
}

// A prepared launch (ml_*_prepare) on the data at x, out (and err, where the kernel writes
// one) on the stream: a cudaError_t code, 0 on success.
int ml_launch(int64_t handle, int64_t x, int64_t out, int64_t err, int64_t stream) {
  return ml_prepared::call(handle, x, out, err, stream);
}

// Frees a prepared launch's slot for the next ml_*_prepare (kernels/codec_cuda.py calls it
// when no launch holds the handle): 0, or cudaErrorInvalidValue for a handle that holds
// none.
int ml_release(int64_t handle) { return ml_prepared::release(handle); }
