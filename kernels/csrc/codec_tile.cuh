// The group-level device code that the codec kernels (codec.cu) and the fused two-shot
// all-reduce (two_shot.cu) share: how a thread holds a group's values (Tile), the
// Walsh-Hadamard rotation, encoding and decoding a group, the launch site, and the
// compile-time dispatch over codecs (the weighted- scales: codec_weighted.cuh).
// Arithmetic as in codec.cu's header: the reference's bits.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "codec_bits.cuh"

namespace {

// Layout of the work: a thread holds kChunks chunks of 8 consecutive values of one group
// (chunk k of lane `sub` is the group's values k*STRIDE + 8*sub .. + 7, STRIDE = G /
// kChunks), so a group is LPG = G / (8 kChunks) consecutive lanes of one warp and every
// load instruction of a warp reads whole 32-byte sectors. Per value this halves (G = 64)
// or quarters (G = 128) the warp shuffles of the group reductions and the Walsh-Hadamard
// stages against 8 values per thread, which is where the time of the rotated codecs went
// (docs/notebook/2026-12-05.md).
constexpr int kChunks = 4;
constexpr int kVals = 8 * kChunks;

template <int G>
struct Tile {
  static constexpr int LPG = G / kVals;        // lanes per group: 4 (G = 128), 2 (G = 64)
  static constexpr int STRIDE = G / kChunks;   // = 8 * LPG
  int64_t row, g0;   // the row, and the group's first value in it
  int sub;           // this lane's place in the group
  bool live;         // the group lies in the row (lanes past its end compute on zeros)
  __device__ __forceinline__ int64_t col(int k) const {
    return g0 + (int64_t)k * STRIDE + 8 * sub;
  }
};

// This lane's share of a tile of blockDim.x * kVals values that holds whole groups (all
// live): the layout of the tile kernels over the workspace (two_shot.cu, one_shot_q.cu).
template <int G>
__device__ __forceinline__ Tile<G> tile_lane() {
  Tile<G> t;
  t.row = 0;
  t.g0 = (int64_t)(threadIdx.x / Tile<G>::LPG) * G;
  t.sub = threadIdx.x & (Tile<G>::LPG - 1);
  t.live = true;
  return t;
}

// Normalised Walsh-Hadamard transform of the group, in the reference's stage order
// h = 1, 2, 4, ...: h < 8 within a chunk; 8 <= h < STRIDE across the group's lanes (the
// partner lane holds element i ^ h); h >= STRIDE across this thread's chunks.
template <int G>
__device__ __forceinline__ void fwht(float v[kChunks][8], int sub, float rscale) {
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
#pragma unroll
    for (int h = 1; h < 8; h *= 2) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if ((i & h) == 0) {
          float a = v[k][i], b = v[k][i + h];
          v[k][i] = __fadd_rn(a, b);
          v[k][i + h] = __fsub_rn(a, b);
        }
      }
    }
  }
#pragma unroll
  for (int m = 1; m < Tile<G>::LPG; m *= 2) {
    // lower element: own + partner; upper: partner - own. fma(own, +-1, partner) rounds
    // the exact sum once, as __fadd_rn / __fsub_rn do: the same bits in one instruction
    // and no select.
    float sgn = (sub & m) ? -1.0f : 1.0f;
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        v[k][i] = __fmaf_rn(v[k][i], sgn, __shfl_xor_sync(0xffffffffu, v[k][i], m));
    }
  }
#pragma unroll
  for (int hk = 1; hk < kChunks; hk *= 2) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
      if ((k & hk) == 0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float a = v[k][i], b = v[k + hk][i];
          v[k][i] = __fadd_rn(a, b);
          v[k + hk][i] = __fsub_rn(a, b);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[k][i] = __fmul_rn(v[k][i], rscale);
  }
}

template <int LPG>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int m = 1; m < LPG; m *= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

template <int LPG>
__device__ __forceinline__ float group_min(float v) {
#pragma unroll
  for (int m = 1; m < LPG; m *= 2) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

template <int LPG>
__device__ __forceinline__ bool group_all(bool b) {
  // lanes of one group are LPG consecutive lanes starting at a multiple of LPG
  unsigned ballot = __ballot_sync(0xffffffffu, b);
  int lane = threadIdx.x & 31;
  unsigned mine = ((1u << LPG) - 1u) << (lane & ~(LPG - 1));
  return (ballot & mine) == mine;
}

// Whether every value of the group is finite in bf16's range, from each lane's `ok` (its
// extremes compared against kBf16Max; the extremes are NaN-propagating max and min, so a
// NaN reaches them and fails the comparison). If not, the group's values become zeros
// (the group is stored as codes 0 and meta0 NaN), and the caller zeroes its extremes.
// Uniform in the group, so the zeroing is a branch, not a select per value, and the check
// is two comparisons per lane, not one per value.
template <int LPG>
__device__ __forceinline__ bool finite_or_zero(float x[kChunks][8], bool ok) {
  bool finite = group_all<LPG>(ok);
  if (!finite) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
#pragma unroll
      for (int i = 0; i < 8; ++i) x[k][i] = 0.0f;
    }
  }
  return finite;
}

// Asymmetric min/max code of the group (held by LPG lanes): this thread's packed codes,
// and the group's stored meta0 (step, NaN for a non-finite group) and meta1 (min).
//
// The reference clamps the rounded code to [0, QMAX]; here that clamp is never active,
// so it is left out. With D(x) = fl(fl(0.5 x) - fl(0.5 m)): m = RD_bf16(lo) <= x <= hi and
// rounding is monotone, so 0 <= D(x) <= D(hi), hence u = fl(D(x) r2) >= 0; s >=
// fl(D(hi) c2) (or 2^-126 > it), so u <= D(hi) * 2 / (D(hi) c2) * (1 + 4 eps) = QMAX (1 + 5
// eps) with c2 = fl(2 / QMAX), far below QMAX + 1/2: rint(u) lies in [0, QMAX] already.
// A non-finite group is all zeros (u = 0).
template <int G, int BITS>
__device__ __forceinline__ void encode_asym(float x[kChunks][8], float c2,
                                            uint32_t w[kChunks][2], float& meta0,
                                            float& meta1) {
  constexpr int LPG = Tile<G>::LPG;
  float hi = x[0][0], lo = x[0][0];
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      hi = fmax_nan(hi, x[k][i]);
      lo = fmin_nan(lo, x[k][i]);
    }
  }
  bool finite = finite_or_zero<LPG>(x, hi <= kBf16Max && lo >= -kBf16Max);
  if (!finite) hi = lo = 0.0f;
  hi = group_max<LPG>(hi);
  lo = group_min<LPG>(lo);
  float m = __fadd_rn(round_down_bf16(lo), 0.0f);                // -0.0 -> +0.0
  float d = __fmul_rn(__fsub_rn(__fmul_rn(0.5f, hi), __fmul_rn(0.5f, m)), c2);
  float s = round_up_bf16(fmaxf(d, kFltMinNormal));
  s = hi > m ? s : 0.0f;
  float r2 = s > 0.0f ? __fdiv_rn(2.0f, s) : 0.0f;
  float hm = __fmul_rn(0.5f, m);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    uint32_t c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
      c[i] = rint_bits(__fmul_rn(__fsub_rn(__fmul_rn(0.5f, x[k][i]), hm), r2), kRound);
    pack<BITS>(c, w[k]);
  }
  meta0 = finite ? s : NAN;
  meta1 = finite ? m : 0.0f;
}

// Symmetric absmax code of the group (int8 / int4-sym, KIND_SYM): this thread's packed
// codes (two's complement bytes at 8 bits, offset binary q + 2^(BITS-1) below) and the
// group's stored bound a (NaN for a non-finite group). Groups whose bound is below 2^-64
// are scaled by 2^64 first, so that QMAX / a stays finite (group.py's _tiny_rescale).
//
// The reference clamps the rounded code to [-QMAX, QMAX]; that clamp is never active
// either: a = RU_bf16(max |x|) >= |x| and the 2^64 rescale is exact, so |fl(x e r)| <=
// |x| e QMAX / (a e) (1 + 2 eps) <= QMAX (1 + 2 eps), and rint of it is within +-QMAX.
template <int G, int BITS>
__device__ __forceinline__ void encode_sym(float x[kChunks][8], uint32_t w[kChunks][2],
                                           float& meta0) {
  constexpr int LPG = Tile<G>::LPG;
  constexpr float QMAX = (float)((1 << (BITS - 1)) - 1);
  float am = fabsf(x[0][0]);
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
#pragma unroll
    for (int i = 0; i < 8; ++i) am = fmax_nan(am, fabsf(x[k][i]));
  }
  bool finite = finite_or_zero<LPG>(x, am <= kBf16Max);
  if (!finite) am = 0.0f;
  float a = round_up_bf16(group_max<LPG>(am));
  bool tiny = a < kTiny;
  float e = tiny ? kTinyScale : 1.0f;
  float r = a > 0.0f ? __fdiv_rn(QMAX, __fmul_rn(a, e)) : 0.0f;
  if (tiny) {   // fl(x * 1) is x: only tiny groups pay the extra product (uniform branch)
#pragma unroll
    for (int k = 0; k < kChunks; ++k) {
#pragma unroll
      for (int i = 0; i < 8; ++i) x[k][i] = __fmul_rn(x[k][i], e);
    }
  }
  constexpr float off = kRound + (BITS == 8 ? 0.0f : (float)(1 << (BITS - 1)));
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    uint32_t c[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = rint_bits(__fmul_rn(x[k][i], r), off);
    pack<BITS>(c, w[k]);
  }
  meta0 = finite ? a : NAN;
}

// Byte offsets of a row's parts (the reference layout: [payload n*BITS/8][meta0: n/G
// bf16][meta1: n/G bf16]; int5's and int6's payload is its 4-bit plane, n/2 bytes, then
// its 1-bit plane, n/8 bytes, or 2-bit plane, n/4 bytes).
template <int BITS, int G>
struct Where {
  static constexpr int PB = plane_bits(BITS);
  int64_t base, plane1, meta0, meta1;
  __device__ __forceinline__ Where(int64_t row, int64_t g0, int64_t n, int64_t nbytes_row) {
    base = row * nbytes_row;
    plane1 = base + n * PB / 8;
    meta0 = base + n * BITS / 8 + 2 * (g0 / G);
    meta1 = meta0 + 2 * (n / G);
  }
  __device__ __forceinline__ int64_t pay(int64_t col) const { return base + col * PB / 8; }
  // the upper plane's bytes of the 8 values from col (a multiple of 8)
  __device__ __forceinline__ int64_t bit4(int64_t col) const {
    return plane1 + col * (BITS - PB) / 8;
  }
};

// A chunk's 8 codes as stored (pack's w) at value col of a row.
template <int BITS, int G>
__device__ __forceinline__ void store_codes(uint8_t* buf, const Where<BITS, G>& at, int64_t col,
                                            const uint32_t w[2]) {
  store_bytes(buf + at.pay(col), w[0], w[1], plane_bits(BITS));
  if (BITS == 5) buf[at.bit4(col)] = (uint8_t)w[1];
  // 2-byte aligned: rows and the 4-bit plane are whole multiples of 2 bytes (n % 64 == 0)
  if (BITS == 6) *reinterpret_cast<uint16_t*>(buf + at.bit4(col)) = (uint16_t)w[1];
}

// (L1: see load_bytes)
template <bool L1, int BITS, int G>
__device__ __forceinline__ void load_codes(const uint8_t* buf, const Where<BITS, G>& at,
                                           int64_t col, uint32_t w[2]) {
  load_bytes<L1>(buf + at.pay(col), w[0], w[1], plane_bits(BITS));
  if (BITS == 5) w[1] = ld_code<L1>(buf + at.bit4(col));
  if (BITS == 6) w[1] = ld_code<L1>(reinterpret_cast<const unsigned short*>(buf + at.bit4(col)));
}

// This thread's share of one stored group, as loaded: its chunks' payload words and the
// group's metadata.
template <int KIND, int BITS, int G>
struct Packed {
  uint32_t w[kChunks][2];   // each chunk's 8 codes as pack() made them
  float m0, m1;             // the group's meta0 and (asym) meta1
  // L1: through L1, for buffers nothing writes while the kernel runs (see load_bytes)
  template <bool L1 = false>
  __device__ __forceinline__ void load(const uint8_t* buf, const Tile<G>& t,
                                       const Where<BITS, G>& at) {
#pragma unroll
    for (int k = 0; k < kChunks; ++k) load_codes<L1>(buf, at, t.col(k), w[k]);
    m0 = bf16_at<L1>(buf, at.meta0);
    m1 = KIND == kAsym ? bf16_at<L1>(buf, at.meta1) : 0.0f;
  }
};

// Decode chunk k of a loaded group share to values, clamped to +-lim (NaN passes).
// Chunk by chunk, so that a sum over rows holds 8 decoded values at a time, not the
// whole share: the register count decides how many blocks an SM holds, and with it how
// many loads are in flight (32 bytes of codes per thread are too few to hide latency at
// two blocks per SM).
template <int KIND, int BITS, int G>
__device__ __forceinline__ void decode_chunk(const Packed<KIND, BITS, G>& p, int k, float lim,
                                             float y[8]) {
  if (KIND == kAsym) {
    float hs = __fmul_rn(0.5f, p.m0), hm = __fmul_rn(0.5f, p.m1);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float c = code_value<KIND, BITS>(p.w[k], i);
      y[i] = clamp_keep_nan(__fmul_rn(2.0f, __fadd_rn(__fmul_rn(c, hs), hm)), lim);
    }
  } else {
    constexpr float QMAX = (float)((1 << (BITS - 1)) - 1);
    float a = p.m0;
    bool tiny = a < kTiny;
    float step = __fdiv_rn(__fmul_rn(a, tiny ? kTinyScale : 1.0f), QMAX);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float q = code_value<KIND, BITS>(p.w[k], i);
      bool edge = fabsf(q) == QMAX;
      float v = edge ? copysignf(a, q) : __fmul_rn(q, step);
      // fl(v * 1) is v: only tiny groups pay the extra product (a uniform branch)
      if (tiny && !edge) v = __fmul_rn(v, kTiny);
      y[i] = clamp_keep_nan(v, lim);
    }
  }
}

// Decode a loaded group share to values, clamped to +-lim (NaN passes).
template <int KIND, int BITS, int G>
__device__ __forceinline__ void decode(const Packed<KIND, BITS, G>& p, float lim,
                                       float y[kChunks][8]) {
#pragma unroll
  for (int k = 0; k < kChunks; ++k) decode_chunk<KIND, BITS, G>(p, k, lim, y[k]);
}

// acc += decode(p), value by value in fp32 (the sum over ranks, in rank order).
template <int KIND, int BITS, int G>
__device__ __forceinline__ void decode_add(const Packed<KIND, BITS, G>& p, float lim,
                                           float acc[kChunks][8]) {
#pragma unroll
  for (int k = 0; k < kChunks; ++k) {
    float y[8];
    decode_chunk<KIND, BITS, G>(p, k, lim, y);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[k][i] = __fadd_rn(acc[k][i], y[i]);
  }
}

// acc = the sum of the decoded rows 0 .. rows-1 (rows >= 1), in fp32 in row order, the
// first row as is (0 + (-0) would be +0). load(r, p) loads row r's share of the group
// into p. Row r + 1 is loaded before row r is decoded, so that a thread has two rows'
// loads in flight, not one: these sums wait on memory, not on arithmetic. ALL4: four
// rows (TP 4) are all loaded before the first is decoded. Measured on an H100 with the
// dequantize-and-sum of 4 rows (one call, docs/notebook/2026-12-06.md, seventh part): at
// 4 bits and G = 128, whose share of a row is 6 registers, 3-15% faster at 4-64 MB
// (int4:128 at 64 MB 2.45 -> 2.54 TB/s, hadamard-int4:128 2.29 -> 2.36); at 8 bits and
// at G = 64 up to 8% slower from 8 MB (int8:128 at 16 MB 2.19 -> 2.03), so only codec.cu's
// dequantize at 4 bits and G = 128 asks for it (the all-reduce kernels' sums, whose
// loads cross NVLink, are not measured with it).
template <int KIND, int BITS, int G, bool ALL4 = false, typename Load>
__device__ __forceinline__ void decode_sum(int64_t rows, float lim, Load load,
                                           float acc[kChunks][8]) {
  if (ALL4 && rows == 4) {
    Packed<KIND, BITS, G> a[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) load(r, a[r]);
    decode<KIND, BITS, G>(a[0], lim, acc);
#pragma unroll
    for (int r = 1; r < 4; ++r) decode_add<KIND, BITS, G>(a[r], lim, acc);
    return;
  }
  Packed<KIND, BITS, G> p, q;
  load(0, p);
  if (rows > 1) load(1, q);
  decode<KIND, BITS, G>(p, lim, acc);
  for (int64_t r = 1; r < rows; ++r) {
    p = q;
    if (r + 1 < rows) load(r + 1, q);
    decode_add<KIND, BITS, G>(p, lim, acc);
  }
}

// A group's codes as this thread holds them, and the group's metadata.
struct Coded {
  uint32_t w[kChunks][2];
  float meta0, meta1;
};

// Encode the group this thread shares (v: its values, already scaled and rotated; the
// encoder may change them). Every lane of the warp must call it: the group reductions
// are shuffles.
template <int KIND, int BITS, int G>
__device__ __forceinline__ Coded encode_group(float v[kChunks][8], float c2) {
  Coded c;
  c.meta1 = 0.0f;
  if (KIND == kAsym)
    encode_asym<G, BITS>(v, c2, c.w, c.meta0, c.meta1);
  else
    encode_sym<G, BITS>(v, c.w, c.meta0);
  return c;
}

// Store it at `at`: each lane its chunks' codes, the lane at sub 0 the metadata.
template <int KIND, int BITS, int G>
__device__ __forceinline__ void store_group(const Coded& c, const Tile<G>& t, uint8_t* buf,
                                            const Where<BITS, G>& at) {
#pragma unroll
  for (int k = 0; k < kChunks; ++k) store_codes(buf, at, t.col(k), c.w[k]);
  if (t.sub == 0) {
    *reinterpret_cast<uint16_t*>(buf + at.meta0) = (uint16_t)bf16_bits(c.meta0);
    if (KIND == kAsym) *reinterpret_cast<uint16_t*>(buf + at.meta1) = (uint16_t)bf16_bits(c.meta1);
  }
}

#ifndef ML_CODEC_HOST_LAUNCH
// kernel<<<grid, block, 0, stream>>>(args): the one launch site, which the CPU test of
// this file (tests/cuda_host/) replaces by a run of each block's threads as fibers.
template <typename... P, typename... A>
cudaError_t launch(void (*kernel)(P...), int64_t grid, int block, cudaStream_t stream,
                   A... args) {
  kernel<<<grid, block, 0, stream>>>(args...);
  return cudaGetLastError();
}
#endif

template <int V> using Int = std::integral_constant<int, V>;
template <bool V> using Bool = std::integral_constant<bool, V>;

// f(KIND, BITS, G, ROT) with each as a compile-time constant: the 24 kernels per dtype that
// kernels/codec_cuda.py may ask for (asym at 8, 5 or 4 bits, sym at 8, 6 or 4; group 128
// or 64; rotated or not).
template <typename F>
cudaError_t dispatch(int kind, int bits, int g, bool rot, F f) {
  auto by_rot = [&](auto k, auto b, auto gg) {
    return rot ? f(k, b, gg, Bool<true>()) : f(k, b, gg, Bool<false>());
  };
  auto by_group = [&](auto k, auto b) -> cudaError_t {
    if (g == 128) return by_rot(k, b, Int<128>());
    if (g == 64) return by_rot(k, b, Int<64>());
    return cudaErrorInvalidValue;
  };
  auto by_bits = [&](auto k) -> cudaError_t {
    if (bits == 8) return by_group(k, Int<8>());
    if (bits == 4) return by_group(k, Int<4>());
    if constexpr (decltype(k)::value == kAsym) {
      if (bits == 5) return by_group(k, Int<5>());
    } else {
      if (bits == 6) return by_group(k, Int<6>());
    }
    return cudaErrorInvalidValue;
  };
  if (kind == kAsym) return by_bits(Int<kAsym>());
  if (kind == kSym) return by_bits(Int<kSym>());
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_dtype(int dtype, F f) {
  if (dtype == 0) return f(float());
  if (dtype == 1) return f(Bf16Bits());
  if (dtype == 2) return f(__half());
  return cudaErrorInvalidValue;
}

}  // namespace
