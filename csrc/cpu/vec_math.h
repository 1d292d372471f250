// Lane-wise building blocks of the CPU kernels: exp and log written in plain float arithmetic (no library call, so
// loops over pixels that use them are vectorised by the compiler), selects without branches, and the class-major
// pixel tiles the kernels work on (t[k * kTile + j] = class k of pixel j of a run of one row).
//
// Only IEEE-exact operations (+, -, *, /, compares, bit moves, int <-> float of small integers) are used and the
// build has -ffp-contract=off and no fast-math, so a loop gives bitwise the same result whether the compiler
// vectorises it for SSE2, AVX2 or AVX-512 or not at all (see tile_kernels.cpp), and whatever the tile, chunk or
// thread split.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// Forced inlining: the tile loops are instantiated inside functions compiled for wider ISAs (tile_kernels.cpp) and
// must be inlined there to be vectorised for them.
#if defined(__GNUC__) || defined(__clang__)
#define CSL_INLINE inline __attribute__((always_inline))
#else
#define CSL_INLINE inline
#endif

namespace csl {
namespace cpu {

// Pixels per tile (at most one row segment): 64 floats of each class, a few KiB of work per tile that stays in L1.
constexpr int64_t kTile = 64;

CSL_INLINE float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
CSL_INLINE uint32_t bits_from_float(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// cond ? a : b, written with bit masks: GCC 12 does not if-convert (so does not vectorise) loops where a float
// compare feeds a ternary next to the integer tricks below; this form has no branch to convert.
CSL_INLINE float select_lanes(bool cond, float a, float b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return float_from_bits((bits_from_float(a) & mask) | (bits_from_float(b) & ~mask));
}
CSL_INLINE double float64_from_bits(uint64_t u) {
  double f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
CSL_INLINE uint64_t bits_from_float64(double f) {
  uint64_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
CSL_INLINE double select_lanes(bool cond, double a, double b) {
  const uint64_t mask = 0ull - static_cast<uint64_t>(cond);
  return float64_from_bits((bits_from_float64(a) & mask) | (bits_from_float64(b) & ~mask));
}
CSL_INLINE int32_t select_lanes(bool cond, int32_t a, int32_t b) {
  const int32_t mask = -static_cast<int32_t>(cond);
  return (a & mask) | (b & ~mask);
}

template <typename acc_t>
CSL_INLINE bool is_finite_lane(acc_t x) {
  return x - x == acc_t(0);  // false for NaN and +-inf
}

// exp(x) in float: max error 0.98 ulp over [-104, 0], correctly rounded for 99.2 % of the floats there (checked
// against the float64 exp on every one; glibc's expf: 0.502 ulp). Cephes' range reduction and degree-6 polynomial:
// x = n ln2 + r, |r| <= ln2 / 2, exp(x) = 2^n p(r). Underflows to 0 below about -103.97, overflows to inf above
// 88.72, NaN stays NaN. 2^n is applied in two exact halves so the subnormal range rounds once.
CSL_INLINE float exp_lanes(float x) {
  x = select_lanes(x < -104.0f, -104.0f, x);  // NaN passes through
  x = select_lanes(x > 88.75f, 88.75f, x);
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float kd = x * 1.44269504088896341f + kMagic;
  const uint32_t n = bits_from_float(kd) - bits_from_float(kMagic);  // round(x / ln2), two's complement
  const float fn = kd - kMagic;
  float r = x - fn * 0.693359375f;  // ln2 split into an exact high part and a correction
  r = r - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const uint32_t n1 = static_cast<uint32_t>(static_cast<int32_t>(n) >> 1), n2 = n - n1;
  return (y * float_from_bits((n1 + 127u) << 23)) * float_from_bits((n2 + 127u) << 23);
}

// log(x) in float for positive normal x (here a sum of exponentials, >= 1): max error 0.82 ulp over [1, 7e4],
// correctly rounded for 97 % of the floats there; log(1) = 0; +inf and NaN pass through. Cephes: x = m 2^e with
// m in [sqrt(1/2), sqrt(2)), log(x) = e ln2 + log(m), degree-9 polynomial in m - 1.
CSL_INLINE float log_lanes(float x) {
  const uint32_t bits = bits_from_float(x);
  const int32_t e0 = static_cast<int32_t>(bits >> 23) - 126;  // x = m0 2^e0, m0 in [0.5, 1)
  const float m0 = float_from_bits((bits & 0x007fffffu) | 0x3f000000u);
  const bool small = m0 < 0.707106781186547524f;
  const int32_t e = select_lanes(small, e0 - 1, e0);
  const float m = select_lanes(small, (m0 + m0) - 1.0f, m0 - 1.0f);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y = y + fe * -2.12194440e-4f;
  y = y + -0.5f * z;
  const float r = (m + y) + fe * 0.693359375f;
  return select_lanes(is_finite_lane(x), r, x);
}

// float(exp(x)) with exp evaluated in float64 (the PCOS weight): equal to static_cast<float>(std::exp(x)) on 1e8
// random arguments in [-120, 0] (the float64 exp here is within ~1 ulp, far below the float rounding). Cephes'
// range reduction and Pade form; x is clamped to [-708, 89], which changes no float result (exp(-708) is 0 as a
// float, exp(89) is inf).
CSL_INLINE float exp_to_float_lanes(double x) {
  x = select_lanes(x < -708.0, -708.0, x);
  x = select_lanes(x > 89.0, 89.0, x);
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to the nearest integer
  const double kd = x * 1.4426950408889634074 + kMagic;
  const uint64_t n = bits_from_float64(kd) - bits_from_float64(kMagic);  // round(x / ln2), two's complement
  const double fn = kd - kMagic;
  double r = x - fn * 6.93145751953125e-1;
  r = r - fn * 1.42860682030941723212e-6;
  const double rr = r * r;
  double p = 1.26177193074810590878e-4;
  p = p * rr + 3.02994407707441961300e-2;
  p = p * rr + 9.99999999999999999910e-1;
  p = p * r;
  double q = 3.00198505138664455042e-6;
  q = q * rr + 2.52448340349684104192e-3;
  q = q * rr + 2.27265548208155028766e-1;
  q = q * rr + 2.00000000000000000009e0;
  const double e = 1.0 + 2.0 * (p / (q - p));  // exp(r)
  return static_cast<float>(e * float64_from_bits((n + 1023u) << 52));
}

// float64 (the reference-precision path) keeps the library functions.
CSL_INLINE double exp_lanes(double x) { return std::exp(x); }
CSL_INLINE double log_lanes(double x) { return std::log(x); }

// True when a row segment can be read (written) in place as a tile: the element type is the compute type and the
// pixels of a row are contiguous.
template <typename scalar_t, typename acc_t>
constexpr bool in_place_rows(int64_t sw) {
  return std::is_same<scalar_t, acc_t>::value && sw == 1;
}

// Loads pixels [0, n) of a row segment (pixel j's class k at z[j * sw + k * sc]) into a class-major tile,
// t[k * kTile + j], converted to acc_t.
template <typename scalar_t, typename acc_t>
inline void load_tile(const scalar_t* __restrict z, int64_t sc, int64_t sw, int64_t n, int64_t num_classes,
                      acc_t* __restrict t) {
  if (sw == 1) {
    for (int64_t k = 0; k < num_classes; ++k) {
      const scalar_t* zk = z + k * sc;
      acc_t* tk = t + k * kTile;
      for (int64_t j = 0; j < n; ++j) {
        tk[j] = static_cast<acc_t>(zk[j]);
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {  // channels_last (sc == 1) and other strides: transposed through L1
      const scalar_t* zj = z + j * sw;
      for (int64_t k = 0; k < num_classes; ++k) {
        t[k * kTile + j] = static_cast<acc_t>(zj[k * sc]);
      }
    }
  }
}

// static_cast<scalar_t>(x); float -> bfloat16 written as bit operations (the round-to-nearest-even and the NaN of
// c10::BFloat16(float), bitwise, but without its branch, so that the store loop vectorises).
template <typename scalar_t, typename acc_t>
CSL_INLINE scalar_t to_scalar(acc_t x) {
  return static_cast<scalar_t>(x);
}
template <>
CSL_INLINE c10::BFloat16 to_scalar<c10::BFloat16, float>(float x) {
  const uint32_t u = bits_from_float(x);
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7fffu)) >> 16;
  const uint32_t nan_bits = 0x7fc0u;
  const uint32_t mask = 0u - static_cast<uint32_t>(x != x);
  return c10::BFloat16(static_cast<uint16_t>((nan_bits & mask) | (rounded & ~mask)), c10::BFloat16::from_bits());
}

// Writes the first n pixels of a tile back to a row segment (the inverse of load_tile).
template <typename scalar_t, typename acc_t>
inline void store_tile(const acc_t* __restrict t, int64_t n, int64_t num_classes, scalar_t* __restrict out,
                       int64_t sc, int64_t sw) {
  if (sw == 1) {
    for (int64_t k = 0; k < num_classes; ++k) {
      const acc_t* tk = t + k * kTile;
      scalar_t* ok = out + k * sc;
      for (int64_t j = 0; j < n; ++j) {
        ok[j] = to_scalar<scalar_t>(tk[j]);
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      scalar_t* oj = out + j * sw;
      for (int64_t k = 0; k < num_classes; ++k) {
        oj[k * sc] = to_scalar<scalar_t>(t[k * kTile + j]);
      }
    }
  }
}

// Calls fn(image, y, x0, len, i0) for each run of at most kTile pixels of one row in the flat pixel range
// [begin, end) of a batch of height x width images, in pixel order (i0 = flat index of the run's first pixel).
template <typename Fn>
inline void for_each_tile(int64_t begin, int64_t end, int64_t height, int64_t width, const Fn& fn) {
  const int64_t hw = height * width;
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / hw, p = i % hw, y = p / width, x0 = p % width;
    const int64_t row_end = std::min(end, i - x0 + width);
    for (int64_t x = x0; i < row_end;) {
      const int64_t len = std::min(kTile, row_end - i);
      fn(b, y, x, len, i);
      i += len;
      x += len;
    }
  }
}

}  // namespace cpu
}  // namespace csl
