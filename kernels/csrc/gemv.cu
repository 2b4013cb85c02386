// y = x W^T for one row of bf16 x [K] and a bf16 weight W [N, K] (nn.Linear layout): the
// linear layers of a batch-1 decode step, which stream their weights once per token.
// kernels/gemv.py calls it and says where.
//
// A warp computes one output row: each lane reads 16-byte words of W's row (words lane,
// lane + 32, ...; four in flight, streaming loads) and the same words of x (cached), sums
// w * x in fp32 in that order (__fmaf_rn; a product of two bf16 values is exact in fp32),
// then the 32 lane sums meet in a butterfly (xor 16, 8, 4, 2, 1) and lane 0 rounds the row's
// sum to bf16 (round to nearest even, NaN -> 0x7FC0).
//
// Measured on an H100 against cuBLAS (F.linear) on the llama3-8b shapes at batch 1
// (tools/bench_gemv.py: each product after the kernel that writes its input, over weights
// that leave L2): a step's 129 products 5.752 -> 5.274 ms (less their producers' own
// time), every layer faster (with its producer: o 19.3 -> 15.3 us, gate_up 84.8 -> 80.0,
// the LM head 374 -> 338); a compiled, graphed decode step 6.259 -> 5.937 ms
// (docs/notebook/2026-12-06.md, fourth part). Four words in flight beat 8 and 16; at two
// or four rows of x cuBLAS was as fast or faster, so only one row comes here. As a
// programmatic dependent launch (its first weight words loaded before waiting for x's
// kernel) it was no faster (5.564 against 5.543 ms with the producers), so it is launched
// plainly.
#include <cuda_runtime.h>
#include <stdint.h>

#include "codec_tile.cuh"   // bits_f, bf16_bits, launch
#include "entry.h"

namespace {

constexpr int kGemvThreads = 256;   // 8 rows per block
constexpr int kInFlight = 4;        // 16-byte words of W per lane per step

__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(
    const uint4* __restrict__ x, const uint4* __restrict__ w, uint16_t* __restrict__ y,
    int64_t n, int64_t words) {
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= n) return;   // the whole warp: rows are warp-uniform
  const uint4* wr = w + row * words;
  float acc = 0.0f;
  for (int64_t s = lane; s < words; s += 32 * kInFlight) {
    uint4 a[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      if (s + 32 * u < words) a[u] = __ldcs(wr + s + 32 * u);
    }
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
