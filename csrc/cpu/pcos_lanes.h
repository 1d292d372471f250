// The per-pixel passes of PCOS after the features (CPU): Gram sums (phase A), cluster sums (phase B) and weights
// (phase C) of one image group, over the feature arrays fx (f0) and fy (v), where a pixel that is not used (invalid
// or non-finite) has fx = NaN.
//
// The float64 sums are split over kSumLanes partial sums by pixel index (pixel i adds to lane i % kSumLanes; the
// lanes are added in lane order at the end): the order of every sum is fixed by the pixel indices alone (the same
// on every ISA and thread count) and the loop over the lanes is vectorised. An unused pixel adds exact zeros.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../csl_math.h"
#include "vec_math.h"

namespace csl {
namespace cpu {

constexpr int64_t kSumLanes = 8;

// Calls add(l, x, y, used) for the pixels [0, n), pixel i in lane l = i % kSumLanes (blocks of kSumLanes, the last
// one padded with unused lanes), then writes the lane sums of acc (kStats x kSumLanes) to out.
template <int kStats, typename feat_t, typename Fn>
CSL_INLINE void lane_sums(const feat_t* __restrict fx, const feat_t* __restrict fy, int64_t n,
                          double (&acc)[kStats][kSumLanes], const Fn& add, double* __restrict out) {
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kSumLanes; ++l) {
      const double x = static_cast<double>(fx[i + l]);
      add(l, x, static_cast<double>(fy[i + l]), x == x);
    }
  }
  if (i < n) {
    alignas(64) feat_t tx[kSumLanes], ty[kSumLanes];
    for (int64_t l = 0; l < kSumLanes; ++l) {
      tx[l] = i + l < n ? fx[i + l] : std::numeric_limits<feat_t>::quiet_NaN();
      ty[l] = i + l < n ? fy[i + l] : feat_t(0);
    }
#pragma omp simd
    for (int64_t l = 0; l < kSumLanes; ++l) {
      const double x = static_cast<double>(tx[l]);
      add(l, x, static_cast<double>(ty[l]), x == x);
    }
  }
  for (int s = 0; s < kStats; ++s) {
    double total = 0.0;
    for (int64_t l = 0; l < kSumLanes; ++l) {
      total += acc[s][l];
    }
    out[s] = total;
  }
}

// Phase A: n, sum x, sum y, sum xx, sum xy, sum yy (kGramStats values).
template <typename feat_t>
CSL_INLINE void gram_sums_body(const feat_t* fx, const feat_t* fy, int64_t n, double* out) {
  alignas(64) double acc[kGramStats][kSumLanes] = {};
  lane_sums(fx, fy, n, acc, [&](int64_t l, double x, double y, bool used) {
    x = select_lanes(used, x, 0.0);
    y = select_lanes(used, y, 0.0);
    acc[0][l] += select_lanes(used, 1.0, 0.0);
    acc[1][l] += x;
    acc[2][l] += y;
    acc[3][l] += x * x;
    acc[4][l] += x * y;
    acc[5][l] += y * y;
  }, out);
}

// Phase B: per cluster, n and the sums of d and d^2 of the features shifted by the group mean (2 x kClusterStats
// values); params: the kGroupParams of the group, the assignment is assign_cluster's.
template <typename feat_t>
CSL_INLINE void cluster_sums_body(const feat_t* fx, const feat_t* fy, int64_t n, const double* params, double* out) {
  const double shift_x = params[0], shift_y = params[1], u1x = params[2], u1y = params[3], u2x = params[4],
               u2y = params[5], s1 = params[6], s2 = params[7];
  const int not_rank_one = params[8] != 0.0 ? 0 : 1;
  alignas(64) double acc[2 * kClusterStats][kSumLanes] = {};
  lane_sums(fx, fy, n, acc, [&](int64_t l, double x, double y, bool used) {
    const double proj0 = std::fabs(u1x * x + u1y * y);
    const double proj1 = std::fabs(u2x * x + u2y * y);
    const bool in1 = static_cast<int>(used) & not_rank_one & static_cast<int>(proj1 * s1 > proj0 * s2);
    const bool in0 = static_cast<int>(used) & static_cast<int>(!in1);
    const double dx = x - shift_x, dy = y - shift_y;
    const double dxx = dx * dx, dyy = dy * dy;
    acc[0][l] += select_lanes(in0, 1.0, 0.0);
    acc[1][l] += select_lanes(in0, dx, 0.0);
    acc[2][l] += select_lanes(in0, dy, 0.0);
    acc[3][l] += select_lanes(in0, dxx, 0.0);
    acc[4][l] += select_lanes(in0, dyy, 0.0);
    acc[5][l] += select_lanes(in1, 1.0, 0.0);
    acc[6][l] += select_lanes(in1, dx, 0.0);
    acc[7][l] += select_lanes(in1, dy, 0.0);
    acc[8][l] += select_lanes(in1, dxx, 0.0);
    acc[9][l] += select_lanes(in1, dyy, 0.0);
  }, out);
}

// Phase C: weight and reliable of n pixels (pixel_weight of csl_math.h with exp_to_float_lanes): with
// label == nullptr every pixel uses the kWeightParams values at params, else pixel i uses
// params + label[i] * kWeightParams. Unused pixels get weight 0 and reliable false (reliable = weight == 1).
template <typename feat_t>
CSL_INLINE void weights_body(const feat_t* __restrict fx, const feat_t* __restrict fy,
                             const int64_t* __restrict label, int64_t n, const double* __restrict params,
                             double alpha, float* __restrict weight, bool* __restrict reliable) {
  auto one = [&](int64_t i, double mu_x, double mu_y, double sd_x, double sd_y) {
    const double x = static_cast<double>(fx[i]), y = static_cast<double>(fy[i]);
    const double z0 = (x - mu_x) / sd_x;
    const double z1 = (y - mu_y) / sd_y;
    const float gauss = exp_to_float_lanes(-(z0 * z0 + z1 * z1) / alpha);
    // The preservation rule; sd_y's sign picks the side of the mean dispersion (> 0: above, paper; < 0: below)
    const bool above = static_cast<int>(y > mu_y) & static_cast<int>(sd_y > 0.0);
    const bool below = static_cast<int>(y < mu_y) & static_cast<int>(sd_y < 0.0);
    const bool preserve = static_cast<int>(x > mu_x) | static_cast<int>(above) | static_cast<int>(below);
    const float w = select_lanes(x == x, select_lanes(preserve, 1.0f, gauss), 0.0f);
    weight[i] = w;
    reliable[i] = w == 1.0f;
  };
  if (label == nullptr) {
    const double mu_x = params[0], mu_y = params[1], sd_x = params[2], sd_y = params[3];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      one(i, mu_x, mu_y, sd_x, sd_y);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const double* p = params + label[i] * kWeightParams;
      one(i, p[0], p[1], p[2], p[3]);
    }
  }
}

}  // namespace cpu
}  // namespace csl
