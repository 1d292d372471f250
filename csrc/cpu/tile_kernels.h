// The per-tile math of the CPU kernels (features, log-sum-exp, cross-entropy gradient) on class-major tiles of
// kTile pixels: every step is a loop over the pixels of the tile (vectorised) inside a loop over the classes. Per
// pixel the arithmetic and its order are those of the scalar functions in csl_math.h / csl_ce.h (classes summed in
// index order, unfused products); only exp and log are the lane versions of vec_math.h.
//
// The float versions of these and of the PCOS passes (pcos_lanes.h) run through float_tile_kernels(), which picks a
// copy compiled for the widest ISA the CPU has (tile_kernels.cpp); all copies give bitwise the same results.
// float64 calls the bodies directly.
#pragma once

#include <cstdint>
#include <cstring>

#include "../csl_math.h"
#include "pcos_lanes.h"
#include "vec_math.h"

namespace csl {
namespace cpu {

// A tile is n <= kTile neighbouring pixels of one row whose class k lies at z[k * zsc + j] (pixel j): either the
// logits themselves (float32 / float64 with contiguous rows, zsc = the class stride) or a class-major copy made by
// load_tile (zsc = kTile). The loops over j run to n and are vectorised; the loops over k are the outer ones.

// Features of the tile. e (num_classes x kTile) receives the exponentials and may be z itself (in place, zsc =
// kTile). Pixels with a non-finite logit get f0 = v = 0, label 0, finite 0.
template <typename acc_t>
CSL_INLINE void features_body(const acc_t* z, int64_t zsc, int64_t n, int64_t num_classes, bool log_confidence,
                              bool released, acc_t* e, acc_t* __restrict f0, acc_t* __restrict v,
                              int32_t* __restrict label, int32_t* __restrict finite) {
  alignas(64) acc_t z_max[kTile], big_r[kTile], inv[kTile], r[kTile], m[kTile], sum_sq[kTile];
  const acc_t others = static_cast<acc_t>(num_classes - 1);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    z_max[j] = z[j];
    label[j] = 0;
    finite[j] = static_cast<int32_t>(is_finite_lane(z[j]));
    big_r[j] = acc_t(0);
    sum_sq[j] = acc_t(0);
  }
  for (int64_t k = 1; k < num_classes; ++k) {
    const acc_t* zk = z + k * zsc;
    const int32_t kk = static_cast<int32_t>(k);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t zkj = zk[j];
      finite[j] &= static_cast<int32_t>(is_finite_lane(zkj));
      const bool greater = zkj > z_max[j];  // strict: ties keep the lowest index
      z_max[j] = select_lanes(greater, zkj, z_max[j]);
      label[j] = select_lanes(greater, kk, label[j]);
    }
  }
  // R = sum of exp(z_k - z_max) over the non-max classes; r = R / (1 + R) never cancels (1 - pmax would).
  for (int64_t k = 0; k < num_classes; ++k) {
    const acc_t* zk = z + k * zsc;
    acc_t* ek = e + k * kTile;
    const int32_t kk = static_cast<int32_t>(k);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t ekj = select_lanes(label[j] != kk, exp_lanes(zk[j] - z_max[j]), acc_t(0));
      big_r[j] += ekj;
      ek[j] = ekj;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    inv[j] = acc_t(1) / (acc_t(1) + big_r[j]);
    r[j] = mul_rn(big_r[j], inv[j]);
    m[j] = r[j] / others;
  }
  // Second pass: population variance of the residual probabilities around their mean (the label's class adds 0;
  // under the released rule it counts as a 0 probability: + (0 - m)^2).
  const acc_t max_slot = released ? acc_t(-1) : acc_t(0);
  for (int64_t k = 0; k < num_classes; ++k) {
    const acc_t* ek = e + k * kTile;
    const int32_t kk = static_cast<int32_t>(k);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t d = select_lanes(label[j] != kk, mul_rn(ek[j], inv[j]) - m[j], max_slot * m[j]);
      sum_sq[j] += d * d;
    }
  }
  if (log_confidence) {
    for (int64_t j = 0; j < n; ++j) {
      f0[j] = -std::log1p(big_r[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      f0[j] = inv[j];
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const acc_t var = sum_sq[j] / others;
    const acc_t g = others * others / (acc_t(2) * (r[j] + static_cast<acc_t>(kEps)));
    const bool ok = finite[j] != 0;
    v[j] = select_lanes(ok, -g * var, acc_t(0));
    f0[j] = select_lanes(ok, f0[j], acc_t(0));
    label[j] = select_lanes(ok, label[j], 0);
  }
}

// Max-shifted log-sum-exp of every pixel of the tile, in parts (as pixel_logsumexp of csl_ce.h): the max logit and
// the rest of the shifted sum, t = sum exp(z - max) - 1 (its log1p: log_of_shifted_sum of csl_ce.h).
template <typename acc_t>
CSL_INLINE void logsumexp_body(const acc_t* __restrict z, int64_t zsc, int64_t n, int64_t num_classes,
                               acc_t* __restrict z_max, acc_t* __restrict rest) {
  alignas(64) acc_t ties[kTile];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    z_max[j] = z[j];
    rest[j] = acc_t(0);
    ties[j] = acc_t(0);
  }
  for (int64_t k = 1; k < num_classes; ++k) {
    const acc_t* zk = z + k * zsc;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      z_max[j] = select_lanes(zk[j] > z_max[j], zk[j], z_max[j]);
    }
  }
  for (int64_t k = 0; k < num_classes; ++k) {
    const acc_t* zk = z + k * zsc;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const bool tie = zk[j] == z_max[j];  // an infinite max counts 1, not exp(inf - inf): see csl_ce.h
      rest[j] += select_lanes(tie, acc_t(0), exp_lanes(zk[j] - z_max[j]));
      ties[j] += select_lanes(tie, acc_t(1), acc_t(0));
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    rest[j] += ties[j] - acc_t(1);
  }
}

// Cross-entropy gradient of the tile: g[k * gsc + j] = scale * (exp((z - lse_hi) - lse_lo) - onehot(label)) on used
// pixels (lse_hi, lse_lo: the max logit and log1p(t), the log-sum-exp parts of csl_ce.h) and exactly 0 on the others.
// g may be z itself (in place, same strides).
template <typename acc_t>
CSL_INLINE void ce_grad_body(const acc_t* z, int64_t zsc, acc_t* g, int64_t gsc, int64_t n, int64_t num_classes,
                             const acc_t* __restrict lse_hi, const acc_t* __restrict lse_lo,
                             const acc_t* __restrict scale, const int32_t* __restrict label,
                             const int32_t* __restrict used) {
  for (int64_t k = 0; k < num_classes; ++k) {
    const acc_t* zk = z + k * zsc;
    acc_t* gk = g + k * gsc;
    const int32_t kk = static_cast<int32_t>(k);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t soft = exp_lanes((zk[j] - lse_hi[j]) - lse_lo[j]);
      const acc_t grad = scale[j] * select_lanes(label[j] == kk, soft - acc_t(1), soft);
      gk[j] = select_lanes(used[j] != 0, grad, acc_t(0));
    }
  }
}

struct FloatTileKernels {
  const char* isa;  // "avx512", "avx2" or "baseline"
  void (*features)(const float* z, int64_t zsc, int64_t n, int64_t num_classes, bool log_confidence, bool released,
                   float* e, float* f0, float* v, int32_t* label, int32_t* finite);
  void (*logsumexp)(const float* z, int64_t zsc, int64_t n, int64_t num_classes, float* z_max, float* rest);
  void (*ce_grad)(const float* z, int64_t zsc, float* g, int64_t gsc, int64_t n, int64_t num_classes,
                  const float* lse_hi, const float* lse_lo, const float* scale, const int32_t* label,
                  const int32_t* used);
  void (*gram_sums)(const float* fx, const float* fy, int64_t n, double* out);
  void (*cluster_sums)(const float* fx, const float* fy, int64_t n, const double* params, double* out);
  void (*weights)(const float* fx, const float* fy, const int64_t* label, int64_t n, const double* params,
                  double alpha, float* weight, bool* reliable);
};

// The copy for this CPU (chosen once; CSL_CPU_ISA=baseline|avx2|avx512 forces a narrower one, for tests).
const FloatTileKernels& float_tile_kernels();

// float goes through the dispatch table, double (the float64 path) runs the bodies as they are.
inline void features_tile(const float* z, int64_t zsc, int64_t n, int64_t num_classes, bool log_confidence,
                          bool released, float* e, float* f0, float* v, int32_t* label, int32_t* finite) {
  float_tile_kernels().features(z, zsc, n, num_classes, log_confidence, released, e, f0, v, label, finite);
}
inline void features_tile(const double* z, int64_t zsc, int64_t n, int64_t num_classes, bool log_confidence,
                          bool released, double* e, double* f0, double* v, int32_t* label, int32_t* finite) {
  features_body<double>(z, zsc, n, num_classes, log_confidence, released, e, f0, v, label, finite);
}
inline void logsumexp_tile(const float* z, int64_t zsc, int64_t n, int64_t num_classes, float* z_max, float* rest) {
  float_tile_kernels().logsumexp(z, zsc, n, num_classes, z_max, rest);
}
inline void logsumexp_tile(const double* z, int64_t zsc, int64_t n, int64_t num_classes, double* z_max,
                           double* rest) {
  logsumexp_body<double>(z, zsc, n, num_classes, z_max, rest);
}
inline void ce_grad_tile(const float* z, int64_t zsc, float* g, int64_t gsc, int64_t n, int64_t num_classes,
                         const float* lse_hi, const float* lse_lo, const float* scale, const int32_t* label,
                         const int32_t* used) {
  float_tile_kernels().ce_grad(z, zsc, g, gsc, n, num_classes, lse_hi, lse_lo, scale, label, used);
}
inline void ce_grad_tile(const double* z, int64_t zsc, double* g, int64_t gsc, int64_t n, int64_t num_classes,
                         const double* lse_hi, const double* lse_lo, const double* scale, const int32_t* label,
                         const int32_t* used) {
  ce_grad_body<double>(z, zsc, g, gsc, n, num_classes, lse_hi, lse_lo, scale, label, used);
}
inline void gram_sums(const float* fx, const float* fy, int64_t n, double* out) {
  float_tile_kernels().gram_sums(fx, fy, n, out);
}
inline void gram_sums(const double* fx, const double* fy, int64_t n, double* out) {
  gram_sums_body<double>(fx, fy, n, out);
}
inline void cluster_sums(const float* fx, const float* fy, int64_t n, const double* params, double* out) {
  float_tile_kernels().cluster_sums(fx, fy, n, params, out);
}
inline void cluster_sums(const double* fx, const double* fy, int64_t n, const double* params, double* out) {
  cluster_sums_body<double>(fx, fy, n, params, out);
}
inline void pcos_weights(const float* fx, const float* fy, const int64_t* label, int64_t n, const double* params,
                         double alpha, float* weight, bool* reliable) {
  float_tile_kernels().weights(fx, fy, label, n, params, alpha, weight, reliable);
}
inline void pcos_weights(const double* fx, const double* fy, const int64_t* label, int64_t n, const double* params,
                         double alpha, float* weight, bool* reliable) {
  weights_body<double>(fx, fy, label, n, params, alpha, weight, reliable);
}

}  // namespace cpu
}  // namespace csl
