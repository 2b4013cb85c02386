// Host stand-in for the CUDA runtime and device intrinsics that kernels/csrc/ uses, so
// that the kernels' own source runs on a CPU (tests/test_codec_cuda_source.py): a block's
// threads are host threads, and the warp collectives (__shfl_xor_sync, __ballot_sync)
// and __syncthreads meet at barriers. Arithmetic is IEEE single precision as on the GPU:
// every operation rounds to nearest even, no FMA contraction (built with
// -ffp-contract=off), no flush of denormals; __fmaf_rn is fmaf. This checks the kernels'
// logic and bits, not their speed, their memory ordering (x86 orders more than a GPU),
// or their PTX-only paths (#ifdef __CUDA_ARCH__).
#pragma once
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define ML_CODEC_HOST_LAUNCH 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 { unsigned x = 0, y = 0, z = 0; };
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1,
                   cudaErrorInvalidConfiguration = 9 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

struct float4 { float x, y, z, w; };
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }

inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }

// PTX prmt (default mode): bytes of the 64-bit {y, x}, picked by the selector's nibbles;
// a nibble's bit 3 replicates the picked byte's sign bit.
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  uint64_t v = ((uint64_t)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) {
    unsigned sel = (s >> (4 * i)) & 0xF;
    unsigned b = (unsigned)(v >> (8 * (sel & 7))) & 0xFF;
    if (sel & 8) b = (b & 0x80) ? 0xFF : 0;
    r |= b << (8 * i);
  }
  return r;
}

namespace emu {

// A reusable barrier of `count` host threads.
struct Barrier {
  std::mutex mu;
  std::condition_variable cv;
  int count, arrived = 0;
  uint64_t generation = 0;
  explicit Barrier(int n) : count(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    uint64_t gen = generation;
    if (++arrived == count) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen; });
    }
  }
};

// The 32 lanes of one warp: a barrier and double-buffered exchange slots (a slot is
// written again only after the next barrier, which every lane reaches after reading).
struct Warp {
  Barrier barrier{32};
  uint32_t slot[2][32];
};

inline thread_local Warp* warp = nullptr;
inline thread_local Barrier* block = nullptr;
inline thread_local int lane = 0;
inline thread_local int side = 0;

inline uint32_t exchange(uint32_t mine, int from) {
  int s = side;
  side ^= 1;
  warp->slot[s][lane] = mine;
  warp->barrier.wait();
  return warp->slot[s][from];
}

}  // namespace emu

// The kernels call these with full masks from every lane (none has returned yet).
inline float __shfl_xor_sync(unsigned, float v, int m) {
  return __uint_as_float(emu::exchange(__float_as_uint(v), emu::lane ^ m));
}

inline unsigned __ballot_sync(unsigned, bool b) {
  int s = emu::side;
  emu::side ^= 1;
  emu::warp->slot[s][emu::lane] = b ? 1u : 0u;
  emu::warp->barrier.wait();
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= emu::warp->slot[s][i] << i;
  return r;
}

// Every thread of the block calls it (the kernels never return before their last one).
inline void __syncthreads() { emu::block->wait(); }

// kernel<<<grid, block>>>(args), one block at a time, all its threads at once on host
// threads (warp collectives and __syncthreads meet at barriers).
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), int64_t grid, int block, cudaStream_t, A... args) {
  if (block % 32 || block < 32 || block > 1024) return cudaErrorInvalidConfiguration;
  for (int64_t b = 0; b < grid; ++b) {
    std::vector<emu::Warp> warps(block / 32);
    emu::Barrier barrier(block);
    std::vector<std::thread> threads;
    for (int tid = 0; tid < block; ++tid) {
      threads.emplace_back([&, tid] {
        blockIdx.x = (unsigned)b;
        gridDim.x = (unsigned)grid;
        threadIdx.x = (unsigned)tid;
        blockDim.x = (unsigned)block;
        emu::warp = &warps[tid / 32];
        emu::block = &barrier;
        emu::lane = tid % 32;
        emu::side = 0;
        kernel(args...);
      });
    }
    for (auto& t : threads) t.join();
  }
  return cudaSuccess;
}
