// Host stand-in for the CUDA runtime and device intrinsics that kernels/csrc/ uses, so
// that the kernels' own source runs on a CPU (tests/test_codec_cuda_source.py): a block's
// threads are fibers on the calling host thread, and the warp collectives
// (__shfl_xor_sync, __ballot_sync) and __syncthreads meet at barriers. Arithmetic is IEEE single precision as on the GPU:
// every operation rounds to nearest even, no FMA contraction (built with
// -ffp-contract=off), no flush of denormals; __fmaf_rn is fmaf. This checks the kernels'
// logic and bits, not their speed, their memory ordering (x86 orders more than a GPU),
// or their PTX-only paths (#ifdef __CUDA_ARCH__).
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define ML_CODEC_HOST_LAUNCH 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__   // a kernel parameter read in place: a plain parameter here
// a block's shared memory: one object for the block's fibers (blocks run one at a time)
#define __shared__ static

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
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline void __stcs(T* p, const T& v) { *p = v; }

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

// A block's threads are fibers (ucontext) on the calling host thread, switched at the
// warp collectives and __syncthreads: a barrier's last arrival releases it, every other
// arrival yields to the block's scheduler. A host thread per emulated thread, meeting at
// condition variables, took ten times longer on 2 cores (tests/test_codec_cuda_source.py:
// its full-block test 177 s against 17 s).
struct Barrier;

struct Fiber {
  ucontext_t ctx;
  int tid = 0;
  int side = 0;                       // emu::side while the fiber is switched out
  const Barrier* waiting = nullptr;   // the barrier it waits at, and that barrier's
  uint64_t gen = 0;                   // generation when it arrived
  bool done = false;
};

struct Sched {
  ucontext_t main;
  std::vector<Fiber> fibers;
  int cur = -1;
  void (*body)(void*) = nullptr;      // runs the kernel as the current fiber's thread
  void* arg = nullptr;
};

inline thread_local Sched* sched = nullptr;
inline thread_local int side = 0;

// A reusable barrier of `count` fibers of the running block.
struct Barrier {
  int count, arrived = 0;
  uint64_t generation = 0;
  explicit Barrier(int n) : count(n) {}
  void wait() {
    uint64_t gen = generation;
    if (++arrived == count) {   // the last arrival releases the others and runs on
      arrived = 0;
      ++generation;
      return;
    }
    Fiber& f = sched->fibers[sched->cur];
    f.waiting = this;
    f.gen = gen;
    swapcontext(&f.ctx, &sched->main);
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

inline uint32_t exchange(uint32_t mine, int from) {
  int s = side;
  side ^= 1;
  warp->slot[s][lane] = mine;
  warp->barrier.wait();
  return warp->slot[s][from];
}

inline void fiber_main() {
  sched->body(sched->arg);
  sched->fibers[sched->cur].done = true;   // then uc_link returns to the scheduler
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

// Every lane of the warp calls it: it orders their shared-memory stores and loads.
inline void __syncwarp(unsigned = 0xFFFFFFFFu) { emu::warp->barrier.wait(); }

// kernel<<<grid, block>>>(args), one block at a time, its threads as fibers on this host
// thread, run in turn from one barrier to the next. A block whose fibers all wait (a
// kernel that never meets its barrier) is reported, not a hang.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), int64_t grid, int block, cudaStream_t, A... args) {
  if (block % 32 || block < 32 || block > 1024) return cudaErrorInvalidConfiguration;
  constexpr size_t kStack = 256 << 10;
  std::unique_ptr<char[]> stacks(new char[(size_t)block * kStack]);   // not zero-filled
  auto call = [&]() { kernel(args...); };
  emu::Sched s;
  s.body = [](void* f) { (*static_cast<decltype(call)*>(f))(); };
  s.arg = &call;
  emu::Sched* outer = emu::sched;
  emu::sched = &s;
  cudaError_t result = cudaSuccess;
  for (int64_t b = 0; b < grid && result == cudaSuccess; ++b) {
    std::vector<emu::Warp> warps(block / 32);
    emu::Barrier barrier(block);
    s.fibers.assign(block, emu::Fiber());
    for (int tid = 0; tid < block; ++tid) {
      emu::Fiber& f = s.fibers[tid];
      f.tid = tid;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = stacks.get() + (size_t)tid * kStack;
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &s.main;
      makecontext(&f.ctx, emu::fiber_main, 0);
    }
    blockIdx.x = (unsigned)b;
    gridDim.x = (unsigned)grid;
    blockDim.x = (unsigned)block;
    emu::block = &barrier;
    for (int left = block; left > 0;) {
      bool ran = false;
      for (int tid = 0; tid < block; ++tid) {
        emu::Fiber& f = s.fibers[tid];
        if (f.done || (f.waiting && f.waiting->generation == f.gen)) continue;
        f.waiting = nullptr;
        threadIdx.x = (unsigned)tid;
        emu::warp = &warps[tid / 32];
        emu::lane = tid % 32;
        emu::side = f.side;
        s.cur = tid;
        swapcontext(&s.main, &f.ctx);
        f.side = emu::side;
        if (f.done) --left;
        ran = true;
      }
      if (!ran) {                 // every fiber left waits: the kernel cannot go on
        result = cudaErrorInvalidConfiguration;
        break;
      }
    }
  }
  emu::sched = outer;
  return result;
}
