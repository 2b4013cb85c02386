// CUDA C++ kernels of the asymmetric group codecs (int8:G, int4:G, G = 64 or 128), with
// the hadamard- rotation and the weighted- channel scales folded in: quantize,
// dequantize, dequantize-and-sum, and error feedback's error part. kernels/codec_cuda.py
// builds this file on first use and says which codecs and layouts it takes.
//
// The arithmetic is that of kernels/quant.py (itself a copy of the reference,
// megatron_lite/comm/codecs/group.py), step for step: every product, sum and quotient is
// an explicit round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fsub_rn, __fdiv_rn),
// which nvcc never contracts into an FMA, so codes, metadata and decoded values are
// the reference's bits. bf16 conversions are integer ops (round to nearest even; NaN
// becomes 0x7FC0, as c10 does).
//
// Layout of the work: a thread holds 8 consecutive values (one 16-byte load of bf16 or
// fp16, two of fp32), so a group of G values is G/8 consecutive lanes of one warp; group
// reductions and the Walsh-Hadamard stages that cross threads are __shfl_xor_sync within
// those lanes. The butterflies run in the reference's order (h = 1, 2, 4, ...: pairs
// (v[i], v[i + h]) become (a + b, a - b)); h = 1, 2, 4 are inside a thread, the rest
// across lanes, where the lane holding the upper element computes partner - own.
// Every lane of a warp runs every shuffle: lanes past the end compute on zeros and store
// nothing, so the shuffle masks are always full. A quantizing thread takes two such
// slots and issues both loads before it computes (see slot_of).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace {

constexpr float kBf16Max = 3.3895313892515355e38f;
constexpr float kFp32Max = 3.4028234663852886e38f;
constexpr float kFltMinNormal = 1.1754943508222875e-38f;
constexpr int kAsym = 1, kSym = 2;   // kernels/config.py's KIND_ASYM, KIND_SYM

__device__ __forceinline__ float bits_f(uint32_t u) { return __uint_as_float(u); }

__device__ __forceinline__ uint32_t bf16_bits(float v) {
  uint32_t u = __float_as_uint(v);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (v != v) ? 0x7FC0u : r;
}

__device__ __forceinline__ float round_up_bf16(float v) {  // v >= 0
  int32_t b = __float_as_int(v);
  return __int_as_float((b + 0xFFFF) & -65536);
}

__device__ __forceinline__ float round_down_bf16(float v) {
  int32_t b = __float_as_int(v);
  int32_t r = b < 0 ? ((b + 0xFFFF) & -65536) : (b & -65536);
  return __int_as_float(r);
}

struct Bf16Bits { uint16_t x; };   // a bf16 tensor's element, as its bits

// 8 consecutive values of the input as fp32 (exact upcasts)
template <typename T> struct Io;

template <> struct Io<float> {
  static __device__ __forceinline__ void load(const float* p, float v[8]) {
    float4 a = __ldcs(reinterpret_cast<const float4*>(p));
    float4 b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
  static __device__ __forceinline__ void store(float* p, const float v[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <> struct Io<Bf16Bits> {   // bf16 as its bits
  static __device__ __forceinline__ void load(const Bf16Bits* p, float v[8]) {
    uint4 a = __ldcs(reinterpret_cast<const uint4*>(p));
    uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = bits_f(w[i] << 16);
      v[2 * i + 1] = bits_f(w[i] & 0xFFFF0000u);
    }
  }
  static __device__ __forceinline__ void store(Bf16Bits* p, const float v[8]) {
    uint4 a;
    a.x = bf16_bits(v[0]) | (bf16_bits(v[1]) << 16);
    a.y = bf16_bits(v[2]) | (bf16_bits(v[3]) << 16);
    a.z = bf16_bits(v[4]) | (bf16_bits(v[5]) << 16);
    a.w = bf16_bits(v[6]) | (bf16_bits(v[7]) << 16);
    *reinterpret_cast<uint4*>(p) = a;
  }
};

template <> struct Io<__half> {
  static __device__ __forceinline__ void load(const __half* p, float v[8]) {
    uint4 a = __ldcs(reinterpret_cast<const uint4*>(p));
    const __half* h = reinterpret_cast<const __half*>(&a);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __half2float(h[i]);
  }
  static __device__ __forceinline__ void store(__half* p, const float v[8]) {
    uint4 a;
    __half* h = reinterpret_cast<__half*>(&a);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = __float2half_rn(v[i]);
    *reinterpret_cast<uint4*>(p) = a;
  }
};

// Normalised Walsh-Hadamard transform of the group held by LPG lanes, 8 values each.
template <int LPG>
__device__ __forceinline__ void fwht(float v[8], int sub, float rscale) {
#pragma unroll
  for (int h = 1; h < 8; h *= 2) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if ((i & h) == 0) {
        float a = v[i], b = v[i + h];
        v[i] = __fadd_rn(a, b);
        v[i + h] = __fsub_rn(a, b);
      }
    }
  }
#pragma unroll
  for (int m = 1; m < LPG; m *= 2) {
    bool upper = (sub & m) != 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float p = __shfl_xor_sync(0xffffffffu, v[i], m);
      v[i] = upper ? __fsub_rn(p, v[i]) : __fadd_rn(v[i], p);
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(v[i], rscale);
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
  unsigned mine = (LPG == 32 ? 0xffffffffu : ((1u << LPG) - 1u)) << (lane & ~(LPG - 1));
  return (ballot & mine) == mine;
}

// Byte addresses of a chunk row's parts (the reference layout:
// [payload n*BITS/8][meta0: n/G bf16][meta1: n/G bf16]).
struct Where {
  int64_t pay;     // this thread's payload bytes
  int64_t meta0;   // this group's meta0 (uint16 index from the row's meta start)
  int64_t meta1;
};

template <int BITS, int G>
__device__ __forceinline__ Where where(int64_t row, int64_t col, int64_t n, int64_t nbytes_row) {
  int64_t base = row * nbytes_row;
  int64_t gi = col / G;
  int64_t meta = base + n * BITS / 8;
  return {base + col * BITS / 8, meta + 2 * gi, meta + 2 * (n / G) + 2 * gi};
}

// Asymmetric min/max code of one group (held by LPG lanes): codes of this thread's 8
// values, and the group's stored meta0 (step, NaN for a non-finite group) and meta1 (min).
template <int LPG, int QMAX>
__device__ __forceinline__ void encode_asym(const float x[8], float c2, int codes[8],
                                            float& meta0, float& meta1) {
  bool ok = true;
#pragma unroll
  for (int i = 0; i < 8; ++i) ok = ok && (fabsf(x[i]) <= kBf16Max);   // false for NaN
  bool finite = group_all<LPG>(ok);
  float xz[8];
  float hi = -INFINITY, lo = INFINITY;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    xz[i] = finite ? x[i] : 0.0f;
    hi = fmaxf(hi, xz[i]);
    lo = fminf(lo, xz[i]);
  }
  hi = group_max<LPG>(hi);
  lo = group_min<LPG>(lo);
  float m = __fadd_rn(round_down_bf16(lo), 0.0f);                // -0.0 -> +0.0
  float d = __fmul_rn(__fsub_rn(__fmul_rn(0.5f, hi), __fmul_rn(0.5f, m)), c2);
  float s = round_up_bf16(fmaxf(d, kFltMinNormal));
  s = hi > m ? s : 0.0f;
  float r2 = s > 0.0f ? __fdiv_rn(2.0f, s) : 0.0f;
  float hm = __fmul_rn(0.5f, m);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float u = __fmul_rn(__fsub_rn(__fmul_rn(0.5f, xz[i]), hm), r2);
    float q = fminf(fmaxf(rintf(u), 0.0f), (float)QMAX);
    codes[i] = finite ? (int)q : 0;
  }
  meta0 = finite ? s : NAN;
  meta1 = finite ? m : 0.0f;
}

// A thread's payload is 8 bytes (8 bits) or 4 bytes (4 bits) at a multiple of its size
// within its row, but a row's start is aligned only to 2 bytes where the chunk holds an
// odd number of groups (int8: n + 2 n/G bytes per row). So the widest access the address
// allows: uniform within a row, one access for nearly every message the model makes.
__device__ __forceinline__ void store_bytes(uint8_t* p, uint32_t a, uint32_t b, int nbytes) {
  uintptr_t u = reinterpret_cast<uintptr_t>(p);
  if (nbytes == 8 && (u & 7) == 0) {
    *reinterpret_cast<uint2*>(p) = make_uint2(a, b);
  } else if ((u & 3) == 0) {
    reinterpret_cast<uint32_t*>(p)[0] = a;
    if (nbytes == 8) reinterpret_cast<uint32_t*>(p)[1] = b;
  } else {   // 2-byte aligned (rows are whole bf16 metadata entries)
    uint16_t* h = reinterpret_cast<uint16_t*>(p);
    h[0] = (uint16_t)a; h[1] = (uint16_t)(a >> 16);
    if (nbytes == 8) { h[2] = (uint16_t)b; h[3] = (uint16_t)(b >> 16); }
  }
}

__device__ __forceinline__ void load_bytes(const uint8_t* p, uint32_t& a, uint32_t& b,
                                           int nbytes) {
  uintptr_t u = reinterpret_cast<uintptr_t>(p);
  b = 0;
  if (nbytes == 8 && (u & 7) == 0) {
    uint2 v = __ldcs(reinterpret_cast<const uint2*>(p));
    a = v.x; b = v.y;
  } else if ((u & 3) == 0) {
    a = __ldcs(reinterpret_cast<const unsigned int*>(p));
    if (nbytes == 8) b = __ldcs(reinterpret_cast<const unsigned int*>(p) + 1);
  } else {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    a = (uint32_t)__ldcs(h) | ((uint32_t)__ldcs(h + 1) << 16);
    if (nbytes == 8) b = (uint32_t)__ldcs(h + 2) | ((uint32_t)__ldcs(h + 3) << 16);
  }
}

template <int BITS>
__device__ __forceinline__ void store_codes(uint8_t* buf, int64_t pay, const int c[8]) {
  if (BITS == 8) {
    uint32_t a = c[0] | (c[1] << 8) | (c[2] << 16) | ((uint32_t)c[3] << 24);
    uint32_t b = c[4] | (c[5] << 8) | (c[6] << 16) | ((uint32_t)c[7] << 24);
    store_bytes(buf + pay, a, b, 8);
  } else {
    uint32_t a = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) a |= (uint32_t)c[i] << (4 * i);
    store_bytes(buf + pay, a, 0, 4);
  }
}

__device__ __forceinline__ float bf16_at(const uint8_t* buf, int64_t at) {
  return bits_f((uint32_t)__ldg(reinterpret_cast<const unsigned short*>(buf + at)) << 16);
}

constexpr float kTiny = 5.421010862427522e-20f;        // 2^-64: group.py's _TINY
constexpr float kTinyScale = 1.8446744073709552e19f;   // 2^64

// Symmetric absmax code of one group (int8 / int4-sym, KIND_SYM): codes of this thread's 8
// values (two's complement bytes at 8 bits, offset binary q + 2^(BITS-1) below) and the
// group's stored bound a (NaN for a non-finite group). Groups whose bound is below 2^-64
// are scaled by 2^64 first, so that QMAX / a stays finite (group.py's _tiny_rescale).
template <int LPG, int BITS, int QMAX>
__device__ __forceinline__ void encode_sym(const float x[8], int codes[8], float& meta0) {
  bool ok = true;
#pragma unroll
  for (int i = 0; i < 8; ++i) ok = ok && (fabsf(x[i]) <= kBf16Max);   // false for NaN
  bool finite = group_all<LPG>(ok);
  float xz[8];
  float am = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    xz[i] = finite ? x[i] : 0.0f;
    am = fmaxf(am, fabsf(xz[i]));
  }
  float a = round_up_bf16(group_max<LPG>(am));
  float e = a < kTiny ? kTinyScale : 1.0f;
  float ae = __fmul_rn(a, e);
  float r = a > 0.0f ? __fdiv_rn((float)QMAX, ae) : 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float v = __fmul_rn(__fmul_rn(xz[i], e), r);
    int q = finite ? (int)fminf(fmaxf(rintf(v), (float)-QMAX), (float)QMAX) : 0;
    codes[i] = BITS == 8 ? (q & 0xFF) : q + (1 << (BITS - 1));
  }
  meta0 = finite ? a : NAN;
}

// One thread's share of one stored group, as loaded: its payload word(s) and the group's
// metadata.
struct Packed {
  uint32_t a, b;   // 8 codes: 4 bits each in a, or 8 bits each in a (codes 0-3) and b
  float m0, m1;    // the group's meta0 and (asym) meta1
};

template <int KIND, int BITS>
__device__ __forceinline__ Packed load_group(const uint8_t* buf, const Where& w) {
  Packed p;
  load_bytes(buf + w.pay, p.a, p.b, BITS);   // 8 values: BITS bytes
  p.m0 = bf16_at(buf, w.meta0);
  p.m1 = KIND == kAsym ? bf16_at(buf, w.meta1) : 0.0f;
  return p;
}

// Decode a loaded group share to 8 values, clamped to +-lim (NaN passes).
template <int KIND, int BITS>
__device__ __forceinline__ void decode_group(const Packed& p, float lim, float y[8]) {
  uint32_t c[8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
    c[i] = BITS == 8 ? (((i < 4 ? p.a : p.b) >> (8 * (i & 3))) & 0xFFu) : ((p.a >> (4 * i)) & 0xFu);
  if (KIND == kAsym) {
    float hs = __fmul_rn(0.5f, p.m0), hm = __fmul_rn(0.5f, p.m1);
#pragma unroll
    for (int i = 0; i < 8; ++i) y[i] = __fmul_rn(2.0f, __fadd_rn(__fmul_rn((float)c[i], hs), hm));
  } else {
    constexpr int QMAX = (1 << (BITS - 1)) - 1;
    float a = p.m0;
    bool tiny = a < kTiny;
    float e = tiny ? kTinyScale : 1.0f, inv_e = tiny ? kTiny : 1.0f;
    float step = __fdiv_rn(__fmul_rn(a, e), (float)QMAX);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      int q = BITS == 8 ? (int)(int8_t)(uint8_t)c[i] : (int)c[i] - (1 << (BITS - 1));
      float v = __fmul_rn(__fmul_rn((float)q, step), inv_e);
      y[i] = (q == QMAX || q == -QMAX) ? (q > 0 ? a : -a) : v;
    }
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) y[i] = (y[i] != y[i]) ? y[i] : fminf(fmaxf(y[i], -lim), lim);
}

// Launch geometry: a block covers kThreads * SLOTS slots of 8 values of one row (the row
// is blockIdx.x / blocks_per_row, uniform in the block: no 64-bit division per thread);
// a thread takes SLOTS slots kThreads apart and issues all their loads before it
// computes. Lanes past the row's end compute on zeros and store nothing. SLOTS per kernel
// as measured on an H200 (docs/notebook/2026-12-05.md): 2 for quantize (2.13 -> 2.50 TB/s
// for int8:128 at 64 MB), 1 for dequantize and the error part (2 slots and 4-row load
// batches were slower there: 2.48 -> 1.79 TB/s for the int8:128 dequantize-and-sum).
constexpr int kThreads = 256;
constexpr int kQuantizeSlots = 2;

template <int SLOTS>
struct Slot {
  int64_t row, col;   // the row, and the first value of slot 0 (slot k: k * 8 * kThreads on)
  int64_t n;          // values per row
  __device__ __forceinline__ int64_t c(int k) const { return col + (int64_t)k * 8 * kThreads; }
  __device__ __forceinline__ bool live(int k) const { return c(k) < n; }
};

template <int SLOTS>
__device__ __forceinline__ Slot<SLOTS> slot_of(int64_t n, uint32_t blocks_per_row) {
  uint32_t row = blockIdx.x / blocks_per_row;
  uint32_t b = blockIdx.x - row * blocks_per_row;
  return {(int64_t)row, ((int64_t)b * kThreads * SLOTS + threadIdx.x) * 8, n};
}

template <typename T, int KIND, int BITS, int G, bool ROT, bool SCALE>
__global__ void __launch_bounds__(kThreads) quantize_kernel(
    const T* __restrict__ x, uint8_t* __restrict__ buf, const float* __restrict__ scale,
    int64_t h, int64_t n, int64_t nbytes_row, float c2, float rscale, uint32_t bpr) {
  constexpr int LPG = G / 8;
  constexpr int S = kQuantizeSlots;
  const Slot<S> sl = slot_of<S>(n, bpr);
  const int sub = threadIdx.x & (LPG - 1);
  float v[S][8];
#pragma unroll
  for (int k = 0; k < S; ++k) {
    if (sl.live(k)) {
      Io<T>::load(x + sl.row * n + sl.c(k), v[k]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[k][i] = 0.0f;
    }
  }
#pragma unroll
  for (int k = 0; k < S; ++k) {
    if (SCALE) {   // weighted-: fl32(x) * s[channel], the channel being the flat index mod h
      int64_t f = sl.row * n + sl.c(k);
      int64_t ch = f < 0xFFFFFFFFll ? (int64_t)((uint32_t)f % (uint32_t)h) : f % h;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        v[k][i] = __fmul_rn(v[k][i], sl.live(k) ? __ldg(scale + ch) : 1.0f);
        ch = ch + 1 == h ? 0 : ch + 1;
      }
    }
    if (ROT) fwht<LPG>(v[k], sub, rscale);
    int codes[8];
    float meta0, meta1 = 0.0f;
    if (KIND == kAsym)
      encode_asym<LPG, (1 << BITS) - 1>(v[k], c2, codes, meta0, meta1);
    else
      encode_sym<LPG, BITS, (1 << (BITS - 1)) - 1>(v[k], codes, meta0);
    if (!sl.live(k)) continue;
    Where w = where<BITS, G>(sl.row, sl.c(k), n, nbytes_row);
    store_codes<BITS>(buf, w.pay, codes);
    if (sub == 0) {
      *reinterpret_cast<uint16_t*>(buf + w.meta0) = (uint16_t)bf16_bits(meta0);
      if (KIND == kAsym)
        *reinterpret_cast<uint16_t*>(buf + w.meta1) = (uint16_t)bf16_bits(meta1);
    }
  }
}

// out[o] = sum over r = 0 .. per-1 of decode(buf[o*so + r*sr]) (fp32, in r order), then,
// with ROT, rotated back (not clamped again): kernels/quant.py's dequantize (so = per,
// sr = 1), or, with so = 1 and sr = outs, the one-shot all-reduce's sum over the ranks of
// each chunk of a gathered [ranks, chunks, bytes] buffer, in one launch.
template <typename T, int KIND, int BITS, int G, bool ROT>
__global__ void __launch_bounds__(kThreads) dequantize_kernel(
    const uint8_t* __restrict__ buf, T* __restrict__ out, int64_t per, int64_t so,
    int64_t sr, int64_t n, int64_t nbytes_row, float lim, float rscale, uint32_t bpr) {
  constexpr int LPG = G / 8;
  const Slot<1> sl = slot_of<1>(n, bpr);   // sl.row: the output row o
  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  if (sl.live(0)) {
    int64_t row = sl.row * so;
    Packed p0 = load_group<KIND, BITS>(buf, where<BITS, G>(row, sl.col, n, nbytes_row));
    decode_group<KIND, BITS>(p0, lim, acc);
    for (int64_t r = 1; r < per; ++r) {
      float y[8];
      Packed p = load_group<KIND, BITS>(buf, where<BITS, G>(row + r * sr, sl.col, n, nbytes_row));
      decode_group<KIND, BITS>(p, lim, y);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], y[i]);
    }
  }
  if (ROT) fwht<LPG>(acc, threadIdx.x & (LPG - 1), rscale);
  if (sl.live(0)) Io<T>::store(out + sl.row * n + sl.col, acc);
}

// out[r] = nan_to_num(rot(decode(buf[r]) - rot(x[r]))), fp32: the error part of
// Scheme.own_error (kernels/quant.py's error_part)
template <typename T, int KIND, int BITS, int G, bool ROT>
__global__ void __launch_bounds__(kThreads) error_kernel(
    const T* __restrict__ x, const uint8_t* __restrict__ buf, float* __restrict__ out,
    int64_t n, int64_t nbytes_row, float rscale, uint32_t bpr) {
  constexpr int LPG = G / 8;
  const Slot<1> sl = slot_of<1>(n, bpr);
  const int sub = threadIdx.x & (LPG - 1);
  float v[8], y[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) { v[i] = 0.0f; y[i] = 0.0f; }
  Packed p;
  if (sl.live(0)) {
    Io<T>::load(x + sl.row * n + sl.col, v);
    p = load_group<KIND, BITS>(buf, where<BITS, G>(sl.row, sl.col, n, nbytes_row));
  }
  if (ROT) fwht<LPG>(v, sub, rscale);
  if (sl.live(0)) decode_group<KIND, BITS>(p, kBf16Max, y);
#pragma unroll
  for (int i = 0; i < 8; ++i) y[i] = __fsub_rn(y[i], v[i]);
  if (ROT) fwht<LPG>(y, sub, rscale);
#pragma unroll
  for (int i = 0; i < 8; ++i) y[i] = ((y[i] != y[i]) || fabsf(y[i]) > kFp32Max) ? 0.0f : y[i];
  if (sl.live(0)) Io<float>::store(out + sl.row * n + sl.col, y);
}

// Blocks per row of n values for a kernel of SLOTS slots per thread (the grid: rows * that,
// at most 2^31 - 1 blocks).
uint32_t blocks_per_row(int64_t n, int slots) {
  int64_t per = (int64_t)kThreads * slots * 8;
  return (uint32_t)((n + per - 1) / per);
}

template <int V> using Int = std::integral_constant<int, V>;
template <bool V> using Bool = std::integral_constant<bool, V>;

// f(KIND, BITS, G, ROT) with each as a compile-time constant: the 16 kernels per dtype that
// kernels/codec_cuda.py may ask for (asym or sym; 8 or 4 bits; group 128 or 64; rotated).
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

// Entry points (pointers and the stream as integers; kernels/codec_cuda.py checks every
// argument). Each returns a cudaError_t code, 0 on success.
int ml_codec_quantize(int64_t x, int64_t buf, int64_t scale, int64_t h, int64_t rows,
                      int64_t n, int64_t nb, int64_t dtype, int64_t kind, int64_t bits,
                      int64_t g, bool rot, double c2, double rscale, int64_t stream) {
  const float* sp = reinterpret_cast<const float*>(scale);
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  uint32_t bpr = blocks_per_row(n, kQuantizeSlots);
  int64_t nblk = rows * bpr;
  if (nblk > 0x7FFFFFFFll) return (int)cudaErrorInvalidConfiguration;
  return (int)with_dtype((int)dtype, [&](auto z) {
    using T = decltype(z);
    const T* xp = reinterpret_cast<const T*>(x);
    uint8_t* bp = reinterpret_cast<uint8_t*>(buf);
    return dispatch((int)kind, (int)bits, (int)g, rot, [&](auto k, auto b, auto gg, auto r) {
      constexpr int K = decltype(k)::value, B = decltype(b)::value, G = decltype(gg)::value;
      constexpr bool R = decltype(r)::value;
      if (sp)
        quantize_kernel<T, K, B, G, R, true><<<nblk, kThreads, 0, st>>>(
            xp, bp, sp, h, n, nb, (float)c2, (float)rscale, bpr);
      else
        quantize_kernel<T, K, B, G, R, false><<<nblk, kThreads, 0, st>>>(
            xp, bp, sp, h, n, nb, (float)c2, (float)rscale, bpr);
      return cudaGetLastError();
    });
  });
}

int ml_codec_dequantize(int64_t buf, int64_t out, int64_t outs, int64_t per, int64_t so,
                        int64_t sr, int64_t n, int64_t nb, int64_t dtype, int64_t kind,
                        int64_t bits, int64_t g, bool rot, double lim, double rscale,
                        int64_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  uint32_t bpr = blocks_per_row(n, 1);
  int64_t nblk = outs * bpr;
  if (nblk > 0x7FFFFFFFll) return (int)cudaErrorInvalidConfiguration;
  return (int)with_dtype((int)dtype, [&](auto z) {
    using T = decltype(z);
    const uint8_t* bp = reinterpret_cast<const uint8_t*>(buf);
    T* op = reinterpret_cast<T*>(out);
    return dispatch((int)kind, (int)bits, (int)g, rot, [&](auto k, auto b, auto gg, auto r) {
      constexpr int K = decltype(k)::value, B = decltype(b)::value, G = decltype(gg)::value;
      dequantize_kernel<T, K, B, G, decltype(r)::value><<<nblk, kThreads, 0, st>>>(
          bp, op, per, so, sr, n, nb, (float)lim, (float)rscale, bpr);
      return cudaGetLastError();
    });
  });
}

int ml_codec_error(int64_t x, int64_t buf, int64_t out, int64_t rows, int64_t n, int64_t nb,
                   int64_t dtype, int64_t kind, int64_t bits, int64_t g, bool rot,
                   double rscale, int64_t stream) {
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  uint32_t bpr = blocks_per_row(n, 1);
  int64_t nblk = rows * bpr;
  if (nblk > 0x7FFFFFFFll) return (int)cudaErrorInvalidConfiguration;
  return (int)with_dtype((int)dtype, [&](auto z) {
    using T = decltype(z);
    const T* xp = reinterpret_cast<const T*>(x);
    const uint8_t* bp = reinterpret_cast<const uint8_t*>(buf);
    float* op = reinterpret_cast<float*>(out);
    return dispatch((int)kind, (int)bits, (int)g, rot, [&](auto k, auto b, auto gg, auto r) {
      constexpr int K = decltype(k)::value, B = decltype(b)::value, G = decltype(gg)::value;
      error_kernel<T, K, B, G, decltype(r)::value><<<nblk, kThreads, 0, st>>>(
          xp, bp, op, n, nb, (float)rscale, bpr);
      return cudaGetLastError();
    });
  });
}
