// SIMD building blocks of the CPU kernels (csrc/line_stats.cpp, csrc/head_residual.cpp): kLanes floats
// per vector through GCC/Clang vector extensions, so one source gives AVX-512, AVX2 or SSE code per
// target clone (POF_CLONES) and the same summation order on every x86 machine.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

namespace pof_fast {
namespace cpu {

// exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial, ~1 ulp) on kLanes
// floats at once (GCC/Clang vector extensions: AVX-512, AVX2 or SSE code per target clone).
// Arguments below -64 return exactly 0: their terms (< 1.7e-28 of a sum that is >= 1) would otherwise
// make e * d and e * d^2 subnormal, and subnormal arithmetic is ~50x slower on x86 (measured: the
// bracket_grid search of case B took 0.93 ms instead of 0.6 ms). NaN in, NaN out.
using vfloat = float __attribute__((vector_size(kLanes * sizeof(float))));
using vint = int32_t __attribute__((vector_size(kLanes * sizeof(int32_t))));

__attribute__((always_inline)) inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

__attribute__((always_inline)) inline vfloat splat(float x) { return vfloat{} + x; }

// kLanes floats stored as bfloat16 bits, rounded to nearest even, NaN as a quiet NaN: the values c10's
// BFloat16(float) gives one at a time (whose NaN branch keeps GCC from vectorizing a loop of them).
using vuint = uint32_t __attribute__((vector_size(kLanes * sizeof(uint32_t))));
using vhalfword = uint16_t __attribute__((vector_size(kLanes * sizeof(uint16_t))));

// Returns the stored values, widened back to float.
__attribute__((always_inline)) inline vfloat vstore_bf16(void* p, vfloat v) {
  vuint bits;
  std::memcpy(&bits, &v, sizeof(bits));
  vuint rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
  rounded = (v != v) ? vuint{} + 0x7FC0u : rounded;
  const vhalfword out = __builtin_convertvector(rounded, vhalfword);
  std::memcpy(p, &out, sizeof(out));
  rounded <<= 16;
  vfloat widened;
  std::memcpy(&widened, &rounded, sizeof(widened));
  return widened;
}

__attribute__((always_inline)) inline vfloat vexp_nonpositive(vfloat x) {
  const vfloat lo = splat(-64.0f);
  const vint drop = x < lo;  // false for NaN, which propagates like std::exp's
  x = drop ? lo : x;
  const vfloat magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vfloat n = x * 1.44269504088896341f + magic;
  n -= magic;
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vfloat y = p * r * r + r + 1.0f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return drop ? vfloat{} : y * scale;
}

template <typename T>
inline T lane_max(const T* v) {
  T m = v[0];
  for (int64_t l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

template <typename T>
inline T lane_sum(T* v) {  // pairwise, fixed order
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) v[l] += v[l + w];
  return v[0];
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define POF_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define POF_CLONES
#endif

// Lets the compiler contract a * b + c into one fused multiply-add in the function it marks (the extension is built
// with -ffp-contract=off, which the search driver's step arithmetic needs: candidate steps exactly as torch ops
// form them). The scorer's sums only need to be accurate, and FMA makes them more so and 1.4x faster (on the
// x86-64-v3/v4 clones; the baseline clone has no FMA instruction and stays uncontracted).
#if defined(__GNUC__) && !defined(__clang__)
#define POF_CONTRACT __attribute__((optimize("fp-contract=fast")))
#else
#define POF_CONTRACT
#endif

}  // namespace cpu
}  // namespace pof_fast
