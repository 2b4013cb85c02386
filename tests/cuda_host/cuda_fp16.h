// Host stand-in for cuda_fp16.h (see cuda_runtime.h here): __half as its bits, and the
// two conversions the codec kernels use, round to nearest even both ways, with
// denormals, infinities and NaN (the FP16 library's bit tricks, which c10 uses too).
#pragma once
#include "cuda_runtime.h"

struct __half { uint16_t x; };

inline float __half2float(__half h) {
  uint32_t w = (uint32_t)h.x << 16;
  uint32_t sign = w & 0x80000000u;
  uint32_t two_w = w + w;
  float normalized = __uint_as_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  float denormalized = __uint_as_float((two_w >> 17) | (126u << 23)) - 0.5f;
  uint32_t bits = two_w < (1u << 27) ? __float_as_uint(denormalized)
                                     : __float_as_uint(normalized);
  return __uint_as_float(sign | bits);
}

inline __half __float2half_rn(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t w = __float_as_uint(f);
  uint32_t shl1_w = w + w;
  uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = __uint_as_float((bias >> 1) + 0x07800000u) + base;
  uint32_t b = __float_as_uint(base);
  uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return __half{(uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}
