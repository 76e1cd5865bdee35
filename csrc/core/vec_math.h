// Elementary functions written so that compilers vectorise loops calling
// them: straight-line arithmetic and selects, no library calls, no
// float->int conversions of possibly-NaN values.  Shared by CPU and CUDA so
// every compiled backend rounds the same way.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"

// Per-element functions called from vectorised loops must be inlined there,
// whatever the compiler's size heuristics say.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define RLK_FORCE_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define RLK_FORCE_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define RLK_FORCE_INLINE __forceinline
#else
#define RLK_FORCE_INLINE inline
#endif

namespace rlk {

// The bits of a float and back: CUDA's intrinsics on the device, memcpy (type
// punning without undefined behaviour; a register move once optimised) elsewhere.
#if defined(__CUDA_ARCH__)
RLK_FORCE_INLINE uint32_t float_bits(float x) { return __float_as_uint(x); }
RLK_FORCE_INLINE float bits_float(uint32_t u) { return __uint_as_float(u); }
#else
RLK_FORCE_INLINE uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
RLK_FORCE_INLINE float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
#endif

// e^x in float32, within 2 ulp of the correctly rounded value for normal
// results (Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then a degree-6
// polynomial for e^r).  No selects after the reduction: the clamp keeps n in
// [-127, 129] and the exponent field does the rest, 2^-127 encoding as 0
// (results below the normal range flush to 0) and 2^129 as +inf.  NaN stays
// NaN.
RLK_FORCE_INLINE float exp_f32(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float xc = x < -88.0f ? -88.0f : x;
  xc = xc > 89.5f ? 89.5f : xc;
  const float shifted = xc * kLog2e + kRound;
  const float n = shifted - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // n sits in the low mantissa bits of `shifted`.  2^n for n = 128 is not a
  // finite float, so positive n scale by 2 * 2^(n-1).
  const uint32_t n_bits = float_bits(shifted) - float_bits(kRound);
  const bool positive = xc > 0.0f;
  const uint32_t exponent = ((positive ? n_bits - 1u : n_bits) + 127u) << 23;
  return (positive ? p * 2.0f : p) * bits_float(exponent);
}

// x where keep is true, +0 where it is false, whatever x holds (NaN, inf):
// a bitwise select that compilers keep branch-free, so loads feeding it are
// not sunk into a branch (which would stop vectorisation).
RLK_FORCE_INLINE float keep_if(bool keep, float x) {
  return bits_float(float_bits(x) & (0u - uint32_t(keep)));
}
RLK_FORCE_INLINE double keep_if(bool keep, double x) { return keep ? x : 0.0; }

RLK_FORCE_INLINE float exp_acc(float x) { return exp_f32(x); }
RLK_FORCE_INLINE double exp_acc(double x) { return ::exp(x); }

}  // namespace rlk
