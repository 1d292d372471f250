// Per-pixel and per-group math shared by the CPU and CUDA kernels (docs/selection.md is the contract).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace csl {

constexpr double kEps = 1e-8;
constexpr double kRankOneRtol = 1e-12;
constexpr double kCollinearRtol = 1e-8;  // a c - b^2 <= kCollinearRtol * a c: rank one too (spec Sec. 2.3)
constexpr double kTiny = 2.2250738585072014e-308;  // smallest normal double (torch.finfo(float64).tiny)

// Statistics accumulated per group and chunk (phase A of PCOS): valid count and the raw sums of the features.
constexpr int kGramStats = 6;  // n, sum x, sum y, sum xx, sum xy, sum yy
// Statistics accumulated per group, cluster and chunk (phase B): count and sums of the shifted features.
constexpr int kClusterStats = 5;  // n, sum dx, sum dy, sum dx^2, sum dy^2 (d = feature - shift, the group mean)
constexpr int kGroupParams = 9;  // shift x, shift y, u1 (2), u2 (2), s1, s2, rank_one
constexpr double kShiftGrid = 1048576.0;  // 2^20: the shift's grid (group_params_from_gram)
constexpr int kWeightParams = 4;  // mu x, mu y, sd x, sd y of the reliable cluster

template <typename acc_t>
struct PixelFeatures {
  acc_t f0;
  acc_t v;
  int64_t label;
  bool finite;
};

// a * b rounded on its own: never fused into a following subtraction (FMA contraction would keep the exact product,
// so p_k - m would no longer round as the reference's does: e.g. exactly 0 for C = 2 and a single-class residual).
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;  // host builds use -ffp-contract=off
#endif
}
C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename acc_t>
C10_HOST_DEVICE inline bool is_finite(acc_t x) {
  return x - x == acc_t(0);  // false for NaN and +-inf (no fast-math in these builds)
}

// Full unrolling of a loop with a compile-time trip count in device code; nothing on the host.
#ifdef __CUDACC__
#define CSL_UNROLL _Pragma("unroll")
#else
#define CSL_UNROLL
#endif

// Classes at most that a CUDA thread keeps in registers (PixelLogits): VOC (21), Cityscapes (19), CamVid (11).
constexpr int kRegisterClasses = 32;

// Calls body(k) for the classes k = from, ..., num_classes - 1, in order. N > 0 (num_classes <= N): the loop runs
// over the constant bound N, unrolled in device code, so k is a constant in each copy of the body and an array
// indexed by it stays in registers. N = 0: the plain loop.
template <int N, typename Body>
C10_HOST_DEVICE inline void for_each_class(int64_t from, int64_t num_classes, Body&& body) {
  if constexpr (N > 0) {
    CSL_UNROLL
    for (int k = 0; k < N; ++k) {
      if (k >= from && k < num_classes) {
        body(static_cast<int64_t>(k));
      }
    }
  } else {
    for (int64_t k = from; k < num_classes; ++k) {
      body(k);
    }
  }
}

// One pixel's C logits at z[0], z[stride], ..., as acc_t. N > 0 (C <= N): all are loaded when it is made, into
// registers, by N unconditional loads (slots k >= C load class 0 again and are never read): a conditional load is
// moved next to its first use by nvcc, one at a time, while unconditional ones are issued together, so a CUDA thread
// has its pixel's loads in flight at once (a thread per pixel reading one class at a time leaves the memory system
// mostly idle). N = 0: each use reads memory. Index it only with the k of for_each_class<N> (a run-time index would
// move the registers to local memory).
template <typename scalar_t, typename acc_t, int N>
struct PixelLogits {
  using value_type = acc_t;
  static constexpr int kCached = N;
  const scalar_t* z;
  int64_t stride;
  acc_t cached[N > 0 ? N : 1];

  C10_HOST_DEVICE PixelLogits(const scalar_t* z_, int64_t stride_, int64_t num_classes) : z(z_), stride(stride_) {
    if constexpr (N > 0) {
      CSL_UNROLL
      for (int k = 0; k < N; ++k) {
        cached[k] = static_cast<acc_t>(z[(k < num_classes ? k : 0) * stride]);
      }
    }
  }

  C10_HOST_DEVICE acc_t operator[](int64_t k) const {
    if constexpr (N > 0) {
      return cached[k];
    } else {
      return static_cast<acc_t>(z[k * stride]);
    }
  }

  // Class k's logit for a run-time k in [0, num_classes) (a select over the registers where N > 0).
  C10_HOST_DEVICE acc_t at(int64_t k, int64_t num_classes) const {
    if constexpr (N > 0) {
      acc_t out = 0;
      for_each_class<N>(0, num_classes, [&](int64_t c) { out = c == k ? cached[c] : out; });
      return out;
    } else {
      return static_cast<acc_t>(z[k * stride]);
    }
  }
};

// f0 (pmax or log pmax), residual dispersion v and pseudo-label of one pixel whose C logits lie at
// z[0], z[stride], ...; non-finite logits give (0, 0, 0, finite = false). N: see PixelLogits (the same arithmetic in
// the same order for every N). (The CPU kernels compute the same per pixel on tiles of pixels: cpu/tile_kernels.h.)
template <typename scalar_t, typename acc_t, int N = 0>
C10_HOST_DEVICE inline PixelFeatures<acc_t> pixel_features(const scalar_t* logits, int64_t stride, int64_t num_classes,
                                                           bool log_confidence, bool released) {
  const PixelLogits<scalar_t, acc_t, N> z(logits, stride, num_classes);
  acc_t z_max = z[0];
  int64_t label = 0;
  bool finite = is_finite(z_max);
  for_each_class<N>(1, num_classes, [&](int64_t k) {
    const acc_t zk = z[k];
    finite = finite && is_finite(zk);
    if (zk > z_max) {  // strict: ties keep the lowest index
      z_max = zk;
      label = k;
    }
  });
  if (!finite) {
    return {acc_t(0), acc_t(0), 0, false};
  }
  // R = sum of exp(z_k - z_max) over the non-max classes; r = R / (1 + R) never cancels (1 - pmax would).
  acc_t big_r = 0;
  for_each_class<N>(0, num_classes, [&](int64_t k) { big_r += k != label ? std::exp(z[k] - z_max) : acc_t(0); });
  const acc_t inv = acc_t(1) / (acc_t(1) + big_r);
  const acc_t r = mul_rn(big_r, inv);
  const acc_t others = static_cast<acc_t>(num_classes - 1);
  const acc_t m = r / others;
  // Second pass: population variance of the residual probabilities around their mean.
  acc_t sum_sq = 0;
  for_each_class<N>(0, num_classes, [&](int64_t k) {
    if (k != label) {
      const acc_t e = std::exp(z[k] - z_max);
      const acc_t d = mul_rn(e, inv) - m;
      sum_sq += d * d;
    } else if (released) {  // the released rule counts the max slot as a 0: + (0 - m)^2
      sum_sq += m * m;
    }
  });
  const acc_t var = sum_sq / others;
  const acc_t g = others * others / (acc_t(2) * (r + static_cast<acc_t>(kEps)));
  const acc_t f0 = log_confidence ? -std::log1p(big_r) : inv;
  return {f0, -g * var, label, true};
}

// sums[q] += records[k * stride + q] for k = 0, ..., n - 1 in this order and q < Q: a group's chunk records summed (by
// one CUDA thread per group; by the CPU kernel with kBatch = 1). The records are read kBatch at a time, all loads of a
// batch before its first addition, so a thread has kBatch * Q loads in flight (one record at a time, as written
// plainly, the loop waits on memory for every few records); the additions are the plain loop's in the same order, so
// the sums are the same bit for bit.
template <int Q, int kBatch>
C10_HOST_DEVICE inline void sum_records_in_order(const double* records, int64_t stride, int64_t n, double* sums) {
  int64_t k = 0;
  for (; k + kBatch <= n; k += kBatch) {
    double batch[kBatch][Q];
    CSL_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      CSL_UNROLL
      for (int q = 0; q < Q; ++q) {
        batch[u][q] = records[(k + u) * stride + q];
      }
    }
    CSL_UNROLL
    for (int u = 0; u < kBatch; ++u) {
      CSL_UNROLL
      for (int q = 0; q < Q; ++q) {
        sums[q] += batch[u][q];
      }
    }
  }
  for (; k < n; ++k) {
    CSL_UNROLL
    for (int q = 0; q < Q; ++q) {
      sums[q] += records[k * stride + q];
    }
  }
}

// Closed-form eigen-decomposition of the Gram matrix [[a, b], [b, c]] (mirrors closed_form_eigen of the reference)
// and the per-group parameters of the cluster assignment. out: kGroupParams values; eigen: lambda_1, lambda_2.
C10_HOST_DEVICE inline void group_params_from_gram(const double* sums, double* out, double* eigen) {
  const double n = sums[0];
  const double a = sums[3], b = sums[4], c = sums[5];
  const double half_trace = 0.5 * (a + c);
  const double half_diff = 0.5 * (a - c);
  const double radius = std::sqrt(half_diff * half_diff + b * b);
  double lam1 = half_trace + radius;
  // lambda_2 = det / lambda_1 avoids the cancellation of half_trace - radius when lambda_2 << lambda_1. The products
  // stay unfused on the device too (nvcc fuses by default, the host build has -ffp-contract=off): a one-pixel group's
  // det is then exactly 0 (rank one), where a fused multiply-add would leave the rounding of b^2 to pick its cluster.
#ifdef __CUDA_ARCH__
  const double ac = __dmul_rn(a, c);
  const double det = __dsub_rn(ac, __dmul_rn(b, b));
  const bool collinear = det <= __dmul_rn(kCollinearRtol, ac);
#else
  const double ac = a * c;
  const double det = ac - b * b;
  const bool collinear = det <= kCollinearRtol * ac;
#endif
  double lam2 = 0.0;
  if (lam1 > 0.0) {
    lam2 = det / (lam1 > kTiny ? lam1 : kTiny);
    lam2 = lam2 > 0.0 ? lam2 : 0.0;
  }
  lam1 = lam1 > 0.0 ? lam1 : 0.0;
  const double ax = b, ay = lam1 - a;
  const double bx = lam1 - c, by = b;
  const double norm_a = std::sqrt(ax * ax + ay * ay);
  const double norm_b = std::sqrt(bx * bx + by * by);
  const bool use_a = norm_a >= norm_b;
  const double best_norm = use_a ? norm_a : norm_b;
  const double scale = best_norm > kTiny ? best_norm : kTiny;
  double u1x = (use_a ? ax : bx) / scale;
  double u1y = (use_a ? ay : by) / scale;
  if (b == 0.0 || best_norm == 0.0) {
    u1x = a >= c ? 1.0 : 0.0;
    u1y = a >= c ? 0.0 : 1.0;
  }
  const double s1 = std::sqrt(lam1), s2 = std::sqrt(lam2);
  // The shift of the cluster sums: the group mean, so they are sums of small deviations, rounded to a multiple of
  // 1 / kShiftGrid. A cluster whose feature is the same 0 or 1 at every pixel (an even residual, v = 0; a saturated
  // confidence) then gets exactly that mean, as the reference's plain mean: its deviations, their sums and
  // shift + sum / n are exact, where the unrounded mean's were not (a mean of -3e-18 for dispersions all 0 put them
  // above it, at weight 1 by the preservation rule).
  out[0] = n > 0 ? std::nearbyint(sums[1] / n * kShiftGrid) / kShiftGrid : 0.0;
  out[1] = n > 0 ? std::nearbyint(sums[2] / n * kShiftGrid) / kShiftGrid : 0.0;
  out[2] = u1x;
  out[3] = u1y;
  out[4] = -u1y;
  out[5] = u1x;
  out[6] = s1;
  out[7] = s2;
  out[8] = s2 <= kRankOneRtol * s1 || collinear ? 1.0 : 0.0;
  eigen[0] = lam1;
  eigen[1] = lam2;
}

// Cluster of a feature vector: argmax_i |V[n, i]| with V[n, i] = (u_i . phi) / s_i, written without dividing by s.
C10_HOST_DEVICE inline int assign_cluster(const double* params, double x, double y) {
  if (params[8] != 0.0) {
    return 0;
  }
  const double proj0 = std::fabs(params[2] * x + params[3] * y);
  const double proj1 = std::fabs(params[4] * x + params[5] * y);
  return proj1 * params[6] > proj0 * params[7] ? 1 : 0;
}

// Per-cluster count / mean / unbiased variance from the shifted sums, the reliable cluster and the weight parameters.
// mu, var: 2 clusters x 2 features; count: 2; weight: kWeightParams.
C10_HOST_DEVICE inline void cluster_stats(const double* sums, const double* params, double* mu, double* var,
                                          int64_t* count, int64_t* chosen, double* weight, bool released) {
  for (int cl = 0; cl < 2; ++cl) {
    const double* s = sums + cl * kClusterStats;
    const double n = s[0];
    count[cl] = static_cast<int64_t>(n);
    for (int f = 0; f < 2; ++f) {
      const double sum_d = s[1 + f], sum_dd = s[3 + f];
      mu[cl * 2 + f] = n > 0 ? params[f] + sum_d / n : 0.0;
      // sum (d - mean d)^2 = sum d^2 - (sum d)^2 / n; d is already centred near the cluster, so this keeps its digits.
      double m2 = n > 0 ? sum_dd - sum_d * (sum_d / n) : 0.0;
      m2 = m2 > 0.0 ? m2 : 0.0;
      var[cl * 2 + f] = n > 1 ? m2 / (n - 1) : 0.0;
    }
  }
  // The reliable cluster has the higher mean confidence; an empty cluster is never chosen (ties: 0).
  const int64_t c = (count[1] > 0 && (count[0] == 0 || mu[2] > mu[0])) ? 1 : 0;
  *chosen = c;
  weight[0] = mu[c * 2];
  weight[1] = mu[c * 2 + 1];
  weight[2] = std::sqrt(var[c * 2] + kEps);
  // The sign of the dispersion's scale carries the rule: > 0 keeps pixels above the mean dispersion at weight 1
  // (paper), < 0 those below it (released code); z_1^2 does not depend on it.
  weight[3] = released ? -std::sqrt(var[c * 2 + 1] + kEps) : std::sqrt(var[c * 2 + 1] + kEps);
}

// Gaussian soft weight with the preservation rule (spec Sec. 2 step 6; the side of the dispersion: wp[3]'s sign).
C10_HOST_DEVICE inline float pixel_weight(const double* wp, double x, double y, double alpha) {
  if (x > wp[0] || (wp[3] > 0 ? y > wp[1] : y < wp[1])) {
    return 1.0f;
  }
  const double z0 = (x - wp[0]) / wp[2];
  const double z1 = (y - wp[1]) / wp[3];
  return static_cast<float>(std::exp(-(z0 * z0 + z1 * z1) / alpha));
}

}  // namespace csl
