// The one-shot algorithm's quantized all-reduce in one launch (see the kernel), over
// the symmetric workspace of kernels/workspace.py; kernels/codec_cuda.py
// (OneShotQLaunch) says when it runs. Its own translation unit, built in parallel with
// codec.cu and two_shot.cu.
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "codec_tile.cuh"
#include "codec_weighted.cuh"
#include "entry.h"
#include "peers.cuh"

namespace {

// The one-shot algorithm's quantized all-reduce in one launch: comm/algorithms.py's
// one-shot all-reduce with a one-stage group codec (comm/fused.py's
// one_shot_kernels_all_reduce), bit for bit, over the two-shot kernel's recv region and
// protocol (flag rows 2 and 3, the epochs of counters[1]). Block b owns tiles b, b + grid,
// ... of the whole message (a tile as in the two-shot kernel, zeros past the message):
//
//   1. encode (scale, rotate) each of my tiles into recv[me] of every rank; with `err`,
//      this rank's error part of the tile too (Scheme.own_error, restored);  barrier 2
//   2. decode recv[0..W-1] of my tiles, sum in fp32 in rank order, rotate back,
//      saturate, unscale (Unscale), saturate into the output;                barrier 3
//
// Barrier 3 keeps recv whole: no rank's next call (of this kernel or the two-shot one,
// which writes recv first as well) writes it before every rank has read it. Groups fall
// on the same global indices as the reference's chunks (multiples of G), and a group's
// sum is over the same W codes in the same order, so the chunking does not show.
struct OneShotQArgs {
  int64_t n, tiles, tile_bytes;            // message and tile geometry
  int64_t flag_off, recv_off, slot;        // workspace layout (bytes)
  int rank, world, maxb;
  int64_t h, spin;
  float c2, rscale;
};

// (at 80 registers the kernels with the error part spilled up to 140 bytes, the others
// up to 28 (ptxas, nvcc 13.0, sm_90): the former keep 4 blocks per SM, 128 registers)
template <int KIND, int BITS, int G, bool ROT, bool SCALE, bool ERR>
__global__ void __launch_bounds__(kMaxTwoShotThreads, ERR ? 4 : kTileBlocksPerSM)
one_shot_q_kernel(
    const Bf16Bits* __restrict__ x, Bf16Bits* __restrict__ out, float* __restrict__ err,
    uint8_t* ws, int* cnt, int* status, const __grid_constant__ Peers peers,
    const float* __restrict__ scale, const float* __restrict__ inv,
    const __grid_constant__ OneShotQArgs a) {
  const int64_t tile = (int64_t)blockDim.x * kVals;
  const int b = blockIdx.x, nb = gridDim.x;
  const int epoch = cnt[b] + 1;
  const Tile<G> t = tile_lane<G>();
  const Where<BITS, G> at(0, t.g0, tile, a.tile_bytes);   // within a stored tile
  const int64_t h = SCALE ? a.h : 1;

  // 1. my tiles, encoded into every rank's recv[me] (and my error part of them)
  for (int64_t tt = b; tt < a.tiles; tt += nb) {
    const int64_t f0 = tt * tile;
    const Channels<G> ch(SCALE ? f0 + t.col(0) : 0, h);
    float v[kChunks][8];
    load_mapped_share<G, ROT, SCALE>(x, a.n, f0, t, scale, h, ch, a.rscale, v);
    const Coded c = encode_group<KIND, BITS, G>(v, a.c2);
    for (int j = 0; j < a.world; ++j)
      store_group<KIND, BITS, G>(c, t, ws + peers.delta[j] + a.recv_off + a.rank * a.slot +
                                           tt * a.tile_bytes, at);
    if (ERR) {
      // Scheme.own_error of the one-shot algorithm, then the scheme's restore:
      // nan_to_num(rot(decode(code) - rot(xs))), and for weighted- bf16(saturate(. / s)).
      // The encoder changed v, so the values are loaded again (codec.cu's error_kernel,
      // which decodes the stored code: the metadata held here are those bf16 values).
      load_mapped_share<G, ROT, SCALE>(x, a.n, f0, t, scale, h, ch, a.rscale, v);
      Packed<KIND, BITS, G> p;
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        p.w[k][0] = c.w[k][0];
        p.w[k][1] = c.w[k][1];
      }
      p.m0 = c.meta0;
      p.m1 = c.meta1;
#pragma unroll
      for (int k = 0; k < kChunks; ++k) {
        float y[8];
        decode_chunk<KIND, BITS, G>(p, k, kBf16Max, y);
#pragma unroll
        for (int i = 0; i < 8; ++i) v[k][i] = __fsub_rn(y[i], v[k][i]);
      }
      if (ROT) fwht<G>(v, t.sub, a.rscale);
      each_live_chunk<SCALE>(t, f0, a.n, ch, scale, inv, h,
                             [&](int k, int64_t f, const Unscale& unscale) {
#pragma unroll
        for (int i = 0; i < 8; ++i)
          v[k][i] = ((v[k][i] != v[k][i]) || fabsf(v[k][i]) > kFp32Max) ? 0.0f : v[k][i];
        if (SCALE) {
          unscale(v[k]);   // saturated to bf16's range as well
#pragma unroll
          for (int i = 0; i < 8; ++i) v[k][i] = bits_f(bf16_bits(v[k][i]) << 16);
        }
        Io<float>::store(err + f, v[k]);
      });
    }
  }
  block_barrier(ws, peers, a.flag_off, 2, a.rank, a.world, a.maxb, b, epoch, status, a.spin);

  // 2. every rank's copy of my tiles decoded (saturated to bf16's range, as the
  //    reference's fp32 decode), summed in rank order, mapped back into the output
  for (int64_t tt = b; tt < a.tiles; tt += nb) {
    const uint8_t* src = ws + a.recv_off + tt * a.tile_bytes;
    float acc[kChunks][8];
    decode_sum<KIND, BITS, G>(a.world, kBf16Max, [&](int64_t r, Packed<KIND, BITS, G>& p) {
      p.load(src + r * a.slot, t, at);
    }, acc);
    if (ROT) fwht<G>(acc, t.sub, a.rscale);
    const int64_t f0 = tt * tile;
    const Channels<G> ch(SCALE ? f0 + t.col(0) : 0, h);
    // the scheme's finish (saturate to bf16's range; fp32 for weighted-, whose range is
    // bf16's as well) and, for weighted-, restore's division (Unscale) and saturation
    each_live_chunk<SCALE>(t, f0, a.n, ch, scale, inv, h,
                           [&](int k, int64_t f, const Unscale& unscale) {
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[k][i] = clamp_keep_nan(acc[k][i], kBf16Max);
      if (SCALE) unscale(acc[k]);   // saturated to bf16's range as well
      Io<Bf16Bits>::store(out + f, acc[k]);
    });
  }
  block_barrier(ws, peers, a.flag_off, 3, a.rank, a.world, a.maxb, b, epoch, status, a.spin);
  if (threadIdx.x == 0) cnt[b] = epoch;
}

}  // namespace

// The entry point (pointers as integers; kernels/codec_cuda.py checks every argument): the
// handle of the prepared launch (>= 0; peers.cuh), or minus a cudaError_t code. With
// `with_error` the launch takes the error part's buffer (ml_launch's err).
int64_t ml_one_shot_q_prepare(int64_t ws, int64_t cnt, int64_t status,
                              std::vector<int64_t> deltas, int64_t scale, int64_t inv,
                              int64_t n, int64_t tiles, int64_t tile, int64_t tile_bytes,
                              int64_t flag_off, int64_t recv_off, int64_t slot, int64_t rank,
                              int64_t world, int64_t maxb, int64_t kind, int64_t bits,
                              int64_t g, bool rot, int64_t h, double c2, double rscale,
                              bool with_error, int64_t spin, int64_t grid) {
  Peers peers;
  if (!make_peers(deltas, world, peers) || !tile_fits(tile) || grid < 1 || grid > maxb ||
      n % 8)
    return -(int64_t)cudaErrorInvalidValue;
  OneShotQArgs a{n, tiles, tile_bytes, flag_off, recv_off, slot, (int)rank, (int)world,
                 (int)maxb, h, spin, (float)c2, (float)rscale};
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
    auto kernel = sp ? (with_error ? one_shot_q_kernel<K, B, G, R, true, true>
                                   : one_shot_q_kernel<K, B, G, R, true, false>)
                     : (with_error ? one_shot_q_kernel<K, B, G, R, false, true>
                                   : one_shot_q_kernel<K, B, G, R, false, false>);
    const int block = (int)(tile / kVals);
    const int64_t gr = resident_grid(kernel, block, grid);
    handle = ml_prepared::add([=](int64_t x, int64_t out, int64_t err, cudaStream_t st) {
      if ((x | out | err) % 16 || with_error != (err != 0)) return cudaErrorInvalidValue;
      return launch(kernel, gr, block, st, reinterpret_cast<const Bf16Bits*>(x),
                    reinterpret_cast<Bf16Bits*>(out), reinterpret_cast<float*>(err), wp, cp,
                    stp, peers, sp, ip, a);
    });
    return cudaSuccess;
  });
  return e != cudaSuccess ? -(int64_t)e : handle;
}
