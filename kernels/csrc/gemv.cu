// y = x W^T for one row of bf16 x [K] and a bf16 weight W [N, K] (nn.Linear layout): the
// linear layers of a batch-1 decode step, which stream their weights once per token.
// kernels/gemv.py calls it and says where.
//
// A warp computes one output row: each lane reads 16-byte words of W's row (words lane,
// lane + 32, ...; four in flight, streaming loads) and the same words of x (cached), sums
// w * x in fp32 in that order (__fmaf_rn; a product of two bf16 values is exact in fp32),
// then the 32 lane sums meet in a butterfly (xor 16, 8, 4, 2, 1) and lane 0 rounds the row's
// sum to bf16 (round to nearest even, NaN -> 0x7FC0). Measured on an H100 against cuBLAS
// (F.linear) on the llama3-8b shapes, CUDA graphs of 20 calls: gate_up (28672 x 4096)
// 80.9 -> 77.0 us, down (4096 x 14336) 43.5 -> 42.1, the LM head (128256 x 4096) 353.9 ->
// 330.2; four words in flight beat 8 and 16 (docs/notebook/2026-12-06.md, fourth part). At
// two or four rows of x cuBLAS was as fast or faster, so only one row comes here.
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
  uint4 a[kInFlight];
#pragma unroll
  for (int u = 0; u < kInFlight; ++u) {
    if (lane + 32 * u < words) a[u] = __ldcs(wr + lane + 32 * u);
  }
#if defined(ML_GEMV_PDL) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // launched before the kernel that writes x has finished (launch_after): the weight is
  // never written by a kernel, so its first words load before this wait; x is read and y
  // written (its memory may still be in use by that kernel) only after it
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  for (int64_t s = lane; s < words; s += 32 * kInFlight) {
    if (s != lane) {
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        if (s + 32 * u < words) a[u] = __ldcs(wr + s + 32 * u);
      }
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

#if defined(ML_GEMV_PDL) && !defined(ML_CODEC_HOST_LAUNCH)
// kernel<<<grid, block, 0, stream>>>(args) as a programmatic dependent launch: it may
// start while the stream's previous kernel finishes (griddepcontrol.wait in the kernel
// orders what depends on it)
template <typename... P, typename... A>
cudaError_t launch_after(void (*kernel)(P...), int64_t grid, int block, cudaStream_t stream,
                         A... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)grid);
  cfg.blockDim = dim3((unsigned)block);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<P>(args)...);
}
#else
template <typename... P, typename... A>
cudaError_t launch_after(void (*kernel)(P...), int64_t grid, int block, cudaStream_t stream,
                         A... args) {
  return launch(kernel, grid, block, stream, args...);
}
#endif

}  // namespace

int ml_gemv(int64_t x, int64_t w, int64_t y, int64_t n, int64_t k, int64_t stream) {
  if (n < 1 || k < 8 || k % 8) return (int)cudaErrorInvalidValue;
  const int rows = kGemvThreads / 32;
  const int64_t grid = (n + rows - 1) / rows;
  if (grid > 0x7FFFFFFFll) return (int)cudaErrorInvalidConfiguration;
  return (int)launch_after(gemv_kernel, grid, kGemvThreads, reinterpret_cast<cudaStream_t>(stream),
                     reinterpret_cast<const uint4*>(x), reinterpret_cast<const uint4*>(w),
                     reinterpret_cast<uint16_t*>(y), n, k / 8);
}
