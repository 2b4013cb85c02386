// The bit-level pieces of the codec kernels (kernels/csrc/codec.cu): constants, bf16
// conversions as integer ops, 16-byte loads and stores of 8 values, packing codes,
// reading them back as exact floats, and the saturating clamp. Every function here is
// exact or rounds as the reference does (see codec.cu's header).
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <stdint.h>

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

// 8 consecutive values of the input as fp32 (exact upcasts) and back. IoWords<T>: 8 values
// of T as kWords 16-byte words and back (pack, unpack); Io<T> adds the 16-byte loads
// (streaming) and stores (streaming with CS) of 8 consecutive values built on them.
template <typename T> struct IoWords;

template <> struct IoWords<float> {
  static constexpr int kWords = 2;   // 16-byte words per 8 values
  static __device__ __forceinline__ void unpack(const uint4 w[2], float v[8]) {
    const uint32_t u[8] = {w[0].x, w[0].y, w[0].z, w[0].w, w[1].x, w[1].y, w[1].z, w[1].w};
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = bits_f(u[i]);
  }
  static __device__ __forceinline__ void pack(const float v[8], uint4 w[2]) {
    w[0] = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                      __float_as_uint(v[3]));
    w[1] = make_uint4(__float_as_uint(v[4]), __float_as_uint(v[5]), __float_as_uint(v[6]),
                      __float_as_uint(v[7]));
  }
};

template <> struct IoWords<Bf16Bits> {   // bf16 as its bits
  static constexpr int kWords = 1;
  static __device__ __forceinline__ void unpack(const uint4 w[1], float v[8]) {
    const uint32_t u[4] = {w[0].x, w[0].y, w[0].z, w[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = bits_f(u[i] << 16);
      v[2 * i + 1] = bits_f(u[i] & 0xFFFF0000u);
    }
  }
  static __device__ __forceinline__ void pack(const float v[8], uint4 w[1]) {
    uint4 a;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // One cvt.rn.bf16x2 per two values (round to nearest even, as bf16_bits) instead of
    // about five integer instructions per value. Its NaN is not c10's 0x7FC0, so a chunk
    // with a NaN takes bf16_bits below (a group's NaN is the whole group's: rare).
    bool nan = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) nan |= v[i] != v[i];
    if (!nan) {
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(a.x) : "f"(v[1]), "f"(v[0]));
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(a.y) : "f"(v[3]), "f"(v[2]));
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(a.z) : "f"(v[5]), "f"(v[4]));
      asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(a.w) : "f"(v[7]), "f"(v[6]));
      w[0] = a;
      return;
    }
#endif
    a.x = bf16_bits(v[0]) | (bf16_bits(v[1]) << 16);
    a.y = bf16_bits(v[2]) | (bf16_bits(v[3]) << 16);
    a.z = bf16_bits(v[4]) | (bf16_bits(v[5]) << 16);
    a.w = bf16_bits(v[6]) | (bf16_bits(v[7]) << 16);
    w[0] = a;
  }
};

template <> struct IoWords<__half> {
  static constexpr int kWords = 1;
  static __device__ __forceinline__ void unpack(const uint4 w[1], float v[8]) {
    const __half* h = reinterpret_cast<const __half*>(&w[0]);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __half2float(h[i]);
  }
  static __device__ __forceinline__ void pack(const float v[8], uint4 w[1]) {
    __half* h = reinterpret_cast<__half*>(&w[0]);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = __float2half_rn(v[i]);
  }
};

template <typename T> struct Io : IoWords<T> {
  using IoWords<T>::kWords;
  static __device__ __forceinline__ void load(const T* p, float v[8]) {
    uint4 w[kWords];
#pragma unroll
    for (int h = 0; h < kWords; ++h) w[h] = __ldcs(reinterpret_cast<const uint4*>(p) + h);
    IoWords<T>::unpack(w, v);
  }
  template <bool CS = false>
  static __device__ __forceinline__ void store(T* p, const float v[8]) {
    uint4 w[kWords];
    IoWords<T>::pack(v, w);
#pragma unroll
    for (int h = 0; h < kWords; ++h) {
      if constexpr (CS) __stcs(reinterpret_cast<uint4*>(p) + h, w[h]);
      else reinterpret_cast<uint4*>(p)[h] = w[h];
    }
  }
};

constexpr float kTiny = 5.421010862427522e-20f;        // 2^-64: group.py's _TINY
constexpr float kTinyScale = 1.8446744073709552e19f;   // 2^64

// rint(q) of a q in [-2^22, 2^22], as the low bits of a float: q + 1.5 * 2^23 lies in
// [2^23, 2^24), where the float spacing is 1, so the addition rounds q to nearest even
// (rintf's rounding) and the integer sits in the low mantissa bits, two's complement
// (0x4B400000 has 22 zero low bits). One FADD instead of a round and a float-to-int
// conversion, which issue at a quarter and an eighth of the FP32 rate on sm_90. An even
// offset (int4-sym's +8) keeps the parity, so it rounds the same.
constexpr float kRound = 12582912.0f;   // 1.5 * 2^23 = 0x4B400000

__device__ __forceinline__ uint32_t rint_bits(float q, float offset) {
  return __float_as_uint(__fadd_rn(q, offset));
}

// The bits per value of a code's first plane: int5 and int6-sym are two bit planes, their
// low 4 bits packed as int4 and the bits above as a 1-bit (int5) or 2-bit (int6) plane
// after them (group.py's layout); the others are one plane.
__host__ __device__ constexpr int plane_bits(int bits) {
  return bits == 5 || bits == 6 ? 4 : bits;
}

// The low bytes of a, b, c, d as one word (a's lowest): three prmt.
__device__ __forceinline__ uint32_t low_bytes(uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
  return __byte_perm(__byte_perm(a, b, 0x0040), __byte_perm(c, d, 0x0040), 0x5410);
}

// 8 codes (bits 0 .. BITS-1 of each c; as rint_bits leaves them, bits BITS .. 7 are clear)
// packed as stored: 8 bytes (w[0], w[1]), or 8 nibbles (w[0]) and, for int5, their bit 4
// as one byte (w[1], value i at bit i), for int6, their bits 4-5 as two bytes (w[1], value
// i at bits 2i, 2i + 1).
template <int BITS>
__device__ __forceinline__ void pack(const uint32_t c[8], uint32_t w[2]) {
  if (BITS == 8) {
    w[0] = low_bytes(c[0], c[1], c[2], c[3]);
    w[1] = low_bytes(c[4], c[5], c[6], c[7]);
  } else if (BITS == 4) {
    // Codes below 16 with bits 4-7 clear (rint_bits' offsets have a zero low byte), so
    // c[2j] + (c[2j+1] << 4) has the byte of codes 2j and 2j+1 in its low byte (the bits
    // are disjoint: no carry into it): one shift-add per two codes, then int8's byte
    // gather (low_bytes), against a mask, a shift and an OR per code.
    uint32_t p[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) p[j] = c[2 * j] + (c[2 * j + 1] << 4);
    w[0] = low_bytes(p[0], p[1], p[2], p[3]);
    w[1] = 0u;
  } else {
    // the 4-bit plane as above, each pair's low byte masked first (codes reach bit 4 or 5)
    uint32_t p[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) p[j] = (c[2 * j] & 0xFu) | ((c[2 * j + 1] << 4) & ~0xFu);
    w[0] = low_bytes(p[0], p[1], p[2], p[3]);
    uint32_t b = (c[0] >> 4) & (BITS == 6 ? 3u : 1u);
#pragma unroll
    for (int i = 1; i < 8; ++i) {
      if (BITS == 5) b |= ((c[i] >> 4) & 1u) << i;
      if (BITS == 6) b |= ((c[i] >> 4) & 3u) << (2 * i);
    }
    w[1] = b;
  }
}

// A chunk's payload is 8 bytes (8 bits) or 4 bytes (4 bits) at a multiple of its size
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

// Codes and metadata are read through L2 only (ld.global.cg), never through L1 or the
// read-only path, where a buffer may change while the kernel runs: in the two-shot kernel
// peers write them (after the barrier's acquire, but into lines an earlier call may have
// left in L1). L1 = true (codec.cu's kernels, whose buffers nothing writes meanwhile)
// reads through L1 instead: a lane's chunks are G/4 values apart, so at 4 bits a warp's
// four chunk loads each touch the same 32-byte sectors, and each sector comes from L2
// once, not two (G = 128) or four (G = 64) times.
template <bool L1, typename T>
__device__ __forceinline__ T ld_code(const T* p) {
  if (L1) return __ldg(p);
  return __ldcg(p);
}

template <bool L1 = false>
__device__ __forceinline__ void load_bytes(const uint8_t* p, uint32_t& a, uint32_t& b,
                                           int nbytes) {
  uintptr_t u = reinterpret_cast<uintptr_t>(p);
  b = 0;
  if (nbytes == 8 && (u & 7) == 0) {
    uint2 v = ld_code<L1>(reinterpret_cast<const uint2*>(p));
    a = v.x; b = v.y;
  } else if ((u & 3) == 0) {
    a = ld_code<L1>(reinterpret_cast<const unsigned int*>(p));
    if (nbytes == 8) b = ld_code<L1>(reinterpret_cast<const unsigned int*>(p) + 1);
  } else {
    const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
    a = (uint32_t)ld_code<L1>(h) | ((uint32_t)ld_code<L1>(h + 1) << 16);
    if (nbytes == 8) b = (uint32_t)ld_code<L1>(h + 2) | ((uint32_t)ld_code<L1>(h + 3) << 16);
  }
}

template <bool L1 = false>
__device__ __forceinline__ float bf16_at(const uint8_t* buf, int64_t at) {
  return bits_f((uint32_t)ld_code<L1>(reinterpret_cast<const unsigned short*>(buf + at)) << 16);
}

// max and min that return NaN where either input is NaN (PTX max.NaN / min.NaN, sm_80+):
// a group's extremes carry a NaN to the finiteness check, and clamp_keep_nan keeps it.
__device__ __forceinline__ float fmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a != a ? a : (b != b ? b : fmaxf(a, b));
#endif
}

__device__ __forceinline__ float fmin_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a != a ? a : (b != b ? b : fminf(a, b));
#endif
}

// max(y, -lim) then min(., lim), NaN passing through: the reference's saturate, which
// keeps NaN, in two instructions.
__device__ __forceinline__ float clamp_keep_nan(float y, float lim) {
  return fmin_nan(fmax_nan(y, -lim), lim);
}

// Code i of a chunk as an exact float: its bits ORed into 2^23's (spacing 1 there), less
// 2^23 (and the symmetric codes' offset). No integer-to-float conversion.
template <int KIND, int BITS>
__device__ __forceinline__ float code_value(const uint32_t w[2], int i) {
  uint32_t c = BITS == 8 ? (w[i >> 2] >> (8 * (i & 3))) & 0xFFu : (w[0] >> (4 * i)) & 0xFu;
  if (BITS == 5) c |= ((w[1] >> i) & 1u) << 4;
  if (BITS == 6) c |= ((w[1] >> (2 * i)) & 3u) << 4;
  if (KIND == kAsym) return __fsub_rn(bits_f(c | 0x4B000000u), 8388608.0f);
  if (BITS == 8) return __fsub_rn(bits_f(c ^ 0x4B000080u), 8388736.0f);  // two's complement
  return __fsub_rn(bits_f(c | 0x4B000000u), 8388608.0f + (float)(1 << (BITS - 1)));
}

}  // namespace
