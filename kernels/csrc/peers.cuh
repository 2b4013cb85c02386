// The cross-rank synchronisation of the kernels that run over the symmetric workspace
// (kernels/workspace.py): the resident-grid cap, the peers' byte distances, and the
// per-block barrier of kernels/sync.py. Included by two_shot.cu and one_shot_q.cu.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>   // std::this_thread::yield in the host build (tests/cuda_host/)
#include <tuple>
#include <vector>

#include "codec_tile.cuh"   // kVals

namespace {

// Every block spins at its barriers until the blocks of the same index on the other ranks
// arrive. With more blocks than the GPU holds at once, a rank's later blocks start only as
// earlier ones finish, so progress would rest on every rank starting its blocks in index
// order, which CUDA does not promise; the launch therefore caps the grid at what the device
// holds at once (occupancy x SMs). The cap is the same on every rank of one GPU model, as
// the tiles' ownership requires (block b owns tiles b, b + grid, ...).
#ifndef ML_CODEC_HOST_LAUNCH
template <typename... P>
int64_t resident_blocks(void (*kernel)(P...), int block) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int>, int64_t> cache;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), block, dev);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int per_sm = 0, sms = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
    cudaGetLastError();   // clear it: the launch reports its own errors
    return 0;             // unknown: no cap
  }
  return cache[key] = (int64_t)per_sm * sms;
}
#else
// tests/cuda_host/ runs a grid's blocks one at a time, in index order, on every rank: the
// order that makes any grid safe, so no cap.
template <typename... P>
int64_t resident_blocks(void (*)(P...), int) { return 0; }
#endif

// `grid`, capped at the blocks of `kernel` the device holds at once (no cap where that is
// unknown): the grid of a kernel whose blocks wait for their peers.
template <typename... P>
int64_t resident_grid(void (*kernel)(P...), int block, int64_t grid) {
  const int64_t cap = resident_blocks(kernel, block);
  return cap > 0 ? std::min(grid, cap) : grid;
}

// The tile kernels take it (and their argument structs) as `const __grid_constant__`
// parameters: indexed by a runtime rank, a by-value copy lives in local memory (a 64-byte
// stack frame in every two-shot kernel, ptxas, nvcc 13.0), while the parameter bank is
// read in place. At one rank on an H100, 64 MB, the fused kernels took 1-4% less time
// for every codec timed (docs/notebook/2026-12-07.md).
struct Peers {
  int64_t delta[8];   // byte distance from this rank's workspace to rank j's
};

// `peers` from the extension's list of 8 byte distances, for a world of 1 to 8 ranks; false
// where either is out of range.
inline bool make_peers(const std::vector<int64_t>& deltas, int64_t world, Peers& peers) {
  if (deltas.size() != 8 || world < 1 || world > 8) return false;
  for (int j = 0; j < 8; ++j) peers.delta[j] = deltas[j];
  return true;
}

// The flag accesses of kernels/sync.py: release store and acquire load at system scope.
__device__ __forceinline__ void store_release_sys(int* p, int v) {
#ifdef __CUDA_ARCH__
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
#else   // the host build of tests/cuda_host/
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
#endif
}

__device__ __forceinline__ int load_acquire_sys(const int* p) {
#ifdef __CUDA_ARCH__
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
#else
  std::this_thread::yield();   // host threads poll a peer process: let it run
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
#endif
}

// Block b of every rank meets here (kernels/sync.py's block_barrier): every thread's
// stores are observed by thread 0 at the block barrier, which release-writes `epoch` into
// flag (row, me, b) of every rank, acquires the flags (row, *, b) of its own rank, and the
// block meets again before anyone reads. A flag that never comes raises status[0] after
// `spin` polls instead of hanging.
__device__ __forceinline__ void block_barrier(uint8_t* ws, const Peers& peers, int64_t flag_off,
                                              int row, int rank, int world, int maxb, int b,
                                              int epoch, int* status, int64_t spin) {
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t mine = flag_off + ((int64_t)(row * world + rank) * maxb + b) * 4;
    for (int j = 0; j < world; ++j)
      store_release_sys(reinterpret_cast<int*>(ws + peers.delta[j] + mine), epoch);
    for (int src = 0; src < world; ++src) {
      const int* p = reinterpret_cast<const int*>(
          ws + flag_off + ((int64_t)(row * world + src) * maxb + b) * 4);
      int v = load_acquire_sys(p);
      for (int64_t n = 0; v != epoch && n < spin; ++n) v = load_acquire_sys(p);
      if (v != epoch) atomicExch(status, 1);
    }
  }
  __syncthreads();
}

// Threads per block of the tile kernels: a 4096-value tile (codec_cuda.TWO_SHOT_TILES)
constexpr int kMaxTwoShotThreads = 128;
// Blocks of the tile kernels an SM holds at once (their __launch_bounds__: at most 80
// registers a thread, against 128 at 4 blocks; some two-shot instantiations spill up to
// 36 bytes, timed ones among them). The kernels are latency-bound (Nsight Compute: 4
// warps per scheduler, 44-57% of issue slots busy). At one rank, 64 MB, 6 blocks per SM
// took 6-14% less time than 4 on one H200 and 5-14% on one H100, every fused codec
// (docs/notebook/2026-12-07.md); a grid of 4 per SM on this build is not slower than on
// the old one. workspace.MAX_BLOCKS leaves room for 6 on 132 SMs.
constexpr int kTileBlocksPerSM = 6;

// Whether the tile kernels take tiles of `tile` values: kVals values per thread, whole
// warps, at most kMaxTwoShotThreads threads.
inline bool tile_fits(int64_t tile) {
  return tile % kVals == 0 && tile / kVals <= kMaxTwoShotThreads && (tile / kVals) % 32 == 0;
}

}  // namespace

// Prepared launches: a kernel with every argument but the data pointers and the stream
// bound once (ml_*_prepare), called by handle (ml_launch), so that an eager call converts
// five integers instead of about thirty arguments (pybind11 takes microseconds for those;
// docs/notebook/2026-12-06.md). One table for the whole extension: an inline function's
// statics are shared by every translation unit that includes this header.
// kernels/codec_cuda.py prepares each distinct argument set once while it is in use and
// releases its handle (ml_release) when no launch holds it; a released slot takes the
// next prepared launch, so the table holds the launches in use, not every kind of message
// the process ever saw. Prepare, launch and release come from Python, one at a time (the
// bindings hold the GIL).
namespace ml_prepared {
using Launch = std::function<cudaError_t(int64_t x, int64_t out, int64_t err, cudaStream_t)>;
// a deque: growing it never moves the launches already in it, so a launch found under the
// lock stays valid after it is released
inline std::deque<Launch>& table() {
  static std::deque<Launch> t;
  return t;
}
inline std::vector<int64_t>& free_slots() {
  static std::vector<int64_t> f;
  return f;
}
inline std::mutex& table_lock() {
  static std::mutex mu;
  return mu;
}
// the new launch's handle (>= 0): a released slot, else a new one
inline int64_t add(Launch f) {
  std::lock_guard<std::mutex> lock(table_lock());
  std::vector<int64_t>& free = free_slots();
  if (!free.empty()) {
    int64_t h = free.back();
    free.pop_back();
    table()[h] = std::move(f);
    return h;
  }
  table().push_back(std::move(f));
  return (int64_t)table().size() - 1;
}
// 0, or cudaErrorInvalidValue for a handle that holds no launch
inline int release(int64_t h) {
  std::lock_guard<std::mutex> lock(table_lock());
  if (h < 0 || h >= (int64_t)table().size() || !table()[h]) return (int)cudaErrorInvalidValue;
  table()[h] = nullptr;
  free_slots().push_back(h);
  return 0;
}
inline int call(int64_t h, int64_t x, int64_t out, int64_t err, int64_t stream) {
  const Launch* f = nullptr;
  {
    std::lock_guard<std::mutex> lock(table_lock());
    if (h >= 0 && h < (int64_t)table().size() && table()[h]) f = &table()[h];
  }
  if (f == nullptr) return (int)cudaErrorInvalidValue;
  return (int)(*f)(x, out, err, reinterpret_cast<cudaStream_t>(stream));
}
}  // namespace ml_prepared

