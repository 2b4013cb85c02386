// y = x W^T for one row of bf16 x [K] and a bf16 weight W [N, K] (nn.Linear layout): the
// linear layers of a batch-1 decode step, which stream their weights once per token.
// kernels/gemv.py calls it and says where.
//
// A warp computes one output row: each lane reads 16-byte words of W's row (words lane,
// lane + 32, ...; streaming loads, in batches of two with the next batch's loads issued
// before the current one's sums) and the same words of x (cached), sums w * x in fp32 in
// that order (__fmaf_rn; a product of two bf16 values is exact in fp32), then the 32 lane
// sums meet in a butterfly (xor 16, 8, 4, 2, 1) and lane 0 rounds the row's sum to bf16
// (round to nearest even, NaN -> 0x7FC0).
//
// Measured on H100s against cuBLAS (F.linear) on the llama3-8b shapes at batch 1
// (tools/bench_gemv.py: each product after the kernel that writes its input, over weights
// that leave L2; docs/notebook/2026-12-06.md, fourth and sixth parts): a step's 129
// products 5.77 ms with cuBLAS, 5.14 ms here (less their producers' own time). The batch
// size and the pipelining were chosen on one H100 in one run: batches of 4 words loaded
// and then summed 5.23 ms, 8 words 5.43, 4 pipelined 5.36, 3 pipelined 5.26, 1 pipelined
// 5.37, 2 pipelined 5.14 (4 or 8 rows per block the same), and a compiled, graphed decode
// step 6.053 -> 5.923 ms. At two or four rows of x cuBLAS was as fast or faster, so only
// one row comes here. As a programmatic dependent launch (its first weight words loaded
// before waiting for x's kernel) it was no faster, so it is launched plainly.
#include <cuda_runtime.h>
#include <stdint.h>

#include "codec_tile.cuh"   // bits_f, bf16_bits, launch
#include "entry.h"

namespace {

constexpr int kGemvThreads = 256;   // 8 rows per block
constexpr int kInFlight = 2;        // 16-byte words of W per lane in one batch of loads

// Batch u of a lane's words: W words s, s + 32, ... (kInFlight of them, those below words).
__device__ __forceinline__ void load_batch(uint4 (&a)[kInFlight], const uint4* wr, int64_t s,
                                           int64_t words) {
#pragma unroll
  for (int u = 0; u < kInFlight; ++u) {
    if (s + 32 * u < words) a[u] = __ldcs(wr + s + 32 * u);
  }
}

// acc + the products of batch a (words s, s + 32, ...) with the same words of x, in order.
__device__ __forceinline__ float sum_batch(const uint4 (&a)[kInFlight],
                                           const uint4* __restrict__ x, int64_t s,
                                           int64_t words, float acc) {
#pragma unroll
  for (int u = 0; u < kInFlight; ++u) {
    if (s + 32 * u >= words) break;
    const uint4 b = __ldg(x + s + 32 * u);
    const uint32_t wa[4] = {a[u].x, a[u].y, a[u].z, a[u].w};
    const uint32_t xb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      acc = __fmaf_rn(bits_f(wa[i] << 16), bits_f(xb[i] << 16), acc);
      acc = __fmaf_rn(bits_f(wa[i] & 0xFFFF0000u), bits_f(xb[i] & 0xFFFF0000u), acc);
    }
  }
  return acc;
}

__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(
    const uint4* __restrict__ x, const uint4* __restrict__ w, uint16_t* __restrict__ y,
    int64_t n, int64_t words) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= n) return;   // the whole warp: rows are warp-uniform
  const uint4* wr = w + row * words;
  constexpr int64_t kStep = 32 * kInFlight;   // words of the row per batch
  // Two batches in registers: the loads of the next are issued before the sums of the
  // current, so that a lane always has words in flight (the sums keep the row's order).
  uint4 a[kInFlight], b[kInFlight];
  float acc = 0.0f;
  int64_t s = lane;
  load_batch(a, wr, s, words);
  for (; s < words; s += 2 * kStep) {
    load_batch(b, wr, s + kStep, words);
    acc = sum_batch(a, x, s, words, acc);
    if (s + kStep >= words) break;
    load_batch(a, wr, s + 2 * kStep, words);
    acc = sum_batch(b, x, s + kStep, words, acc);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xFFFFFFFFu, acc, o));
  if (lane == 0) y[row] = (uint16_t)bf16_bits(acc);
}

}  // namespace

int ml_gemv(int64_t x, int64_t w, int64_t y, int64_t n, int64_t k, int64_t stream) {
  if (n < 1 || k < 8 || k % 8) return (int)cudaErrorInvalidValue;
  const int rows = kGemvThreads / 32;
  const int64_t grid = (n + rows - 1) / rows;
  if (grid > 0x7FFFFFFFll) return (int)cudaErrorInvalidConfiguration;
  return (int)launch(gemv_kernel, grid, kGemvThreads, reinterpret_cast<cudaStream_t>(stream),
                     reinterpret_cast<const uint4*>(x), reinterpret_cast<const uint4*>(w),
                     reinterpret_cast<uint16_t*>(y), n, k / 8);
}
