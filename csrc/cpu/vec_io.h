// Vector load/store helpers shared by the fused CPU kernels (groupnorm.cpp, heatmap.cpp).
//
// at::vec::Vectorized picks its implementation at compile time from CPU_CAPABILITY, and extensions are
// not compiled per capability the way ATen is: without -mavx2 the portable implementation is used, and
// for these kernels it is 30-60x slower than AVX2.  So on x86-64 with GCC the kernel code is compiled
// for AVX2+FMA+F16C (as ATen's own AVX2 kernels are) inside a `#pragma GCC target` region, and the op
// entry points (compiled for the baseline) call `require_vector_isa()` before running it.
//
// Usage: include this header AFTER every other header; put the kernels after it and end the region
// with LDEQ_FAST_VEC_END before the (baseline) op entry points and registrations.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(CPU_CAPABILITY) && \
    !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#define LDEQ_FAST_VEC_TARGETED 1
#endif

namespace ldeq_fast {
namespace cpu {

// Fails with a clear message on a CPU that cannot run the kernels compiled below.
inline void require_vector_isa(const char* op) {
#if defined(LDEQ_FAST_VEC_TARGETED) || (defined(__x86_64__) && defined(__AVX2__))
  TORCH_CHECK(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"),
              op, ": the ldeq_fast C++ kernels need an x86-64 CPU with AVX2, FMA and F16C; use backend='torch'");
#else
  (void)op;
#endif
}

}  // namespace cpu
}  // namespace ldeq_fast

#if defined(LDEQ_FAST_VEC_TARGETED)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The static invokers of captureless lambdas in the AVX2 headers are flagged as returning __m256
// without AVX (a GCC quirk); they are never called through a function pointer here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// sleef.h declares its 256-bit functions only under __AVX__, which a target pragma does not define.
#ifndef __AVX__
#define __AVX__ 1
#include <sleef.h>
#undef __AVX__
#else
#include <sleef.h>
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define LDEQ_FAST_VEC_END _Pragma("GCC diagnostic pop") _Pragma("GCC pop_options")
#else
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#define LDEQ_FAST_VEC_END
#endif

#include <ATen/cpu/vec/vec.h>

namespace ldeq_fast {
namespace cpu {

// Loads scalar_t memory as vectors of its accumulation type (float for float/bf16/fp16, double for
// double) and stores back with rounding.  Partial loads zero the unused lanes.
template <typename scalar_t>
struct VecIO {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kSize = Vec::size();

  static Vec load(const scalar_t* p, int64_t n = kSize) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return n == kSize ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      alignas(64) acc_t buf[kSize] = {};
      for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<acc_t>(p[i]);
      return Vec::loadu(buf);
    }
  }

  static void store(scalar_t* p, const Vec& v, int64_t n = kSize) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (n == kSize) {
        v.store(p);
      } else {
        v.store(p, n);
      }
    } else {
      alignas(64) acc_t buf[kSize];
      v.store(buf);
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(buf[i]);
    }
  }

  // The first n lanes of v, zeros elsewhere (masks the tail of a partial load before a reduction).
  static Vec head(const Vec& v, int64_t n) {
    return n == kSize ? v : Vec::set(Vec(acc_t(0)), v, n);
  }

  static double sum(const Vec& v) {
    alignas(64) acc_t buf[kSize];
    v.store(buf);
    double s = 0.0;
    for (int64_t i = 0; i < kSize; ++i) s += static_cast<double>(buf[i]);
    return s;
  }
};

}  // namespace cpu
}  // namespace ldeq_fast
