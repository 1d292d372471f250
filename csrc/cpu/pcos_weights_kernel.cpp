// CPU kernel of csl::pcos_weights.
//
// Three parallel passes over fixed chunks of pixels (chunks depend only on the shapes, so the result does not depend
// on the number of threads): A) features, pseudo-labels and per-chunk Gram sums; B) cluster assignment and per-chunk
// cluster sums of the features shifted by the group mean; C) weights. Between the passes the per-chunk partial sums
// (float64) are reduced in chunk order per group.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../csl_common.h"
#include "../csl_math.h"
#include "row_features.h"

namespace csl {
namespace {


using PcosOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor>;

PcosOutputs pcos_weights_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& valid, double alpha,
                             bool log_confidence, bool class_groups) {
  constexpr const char* op = "csl::pcos_weights";
  check_logits(logits, op);
  check_device(logits, "logits", false, op);
  check_valid(valid, logits, op);
  TORCH_CHECK(alpha > 0, op, ": alpha must be positive, got ", alpha);
  const int64_t batch = logits.size(0), num_classes = logits.size(1), height = logits.size(2),
                width = logits.size(3);
  const int64_t hw = height * width;
  const int64_t groups_per_image = class_groups ? num_classes : 1;
  const int64_t num_groups = batch * groups_per_image;
  const auto options = logits.options();
  at::Tensor weight = at::empty({batch, height, width}, options.dtype(at::kFloat));
  at::Tensor label = at::empty({batch, height, width}, options.dtype(at::kLong));
  at::Tensor reliable = at::empty({batch, height, width}, options.dtype(at::kBool));
  at::Tensor mu = at::zeros({num_groups, 2, 2}, options.dtype(at::kDouble));
  at::Tensor var = at::zeros({num_groups, 2, 2}, options.dtype(at::kDouble));
  at::Tensor count = at::zeros({num_groups, 2}, options.dtype(at::kLong));
  at::Tensor eigenvalues = at::zeros({num_groups, 2}, options.dtype(at::kDouble));
  at::Tensor chosen = at::zeros({num_groups}, options.dtype(at::kLong));
  at::Tensor n_nonfinite = at::zeros({batch}, options.dtype(at::kLong));
  if (batch == 0 || hw == 0) {
    return {weight, label, reliable, mu, var, count, eigenvalues, chosen, n_nonfinite};
  }
  constexpr int64_t kRecordBytes = 2 * kClusterStats * sizeof(double);
  const int64_t chunk = chunk_pixels(batch, hw, groups_per_image, kRecordBytes, 4096);
  const int64_t chunks_per_image = ceil_div(hw, chunk);
  const int64_t num_chunks = batch * chunks_per_image;
  const at::Tensor valid_c = valid.has_value() ? valid->contiguous() : at::Tensor();
  const bool* valid_ptr = valid.has_value() ? valid_c.data_ptr<bool>() : nullptr;
  const int64_t sb = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);

  std::vector<uint8_t> keep(batch * hw);
  std::vector<double> gram_partial(num_chunks * groups_per_image * kGramStats, 0.0);
  std::vector<double> cluster_partial(num_chunks * groups_per_image * 2 * kClusterStats, 0.0);
  std::vector<int64_t> nonfinite_partial(num_chunks, 0);
  std::vector<double> params(num_groups * kGroupParams);
  std::vector<double> weight_params(num_groups * kWeightParams);
  int64_t* label_ptr = label.data_ptr<int64_t>();

  // Sum the per-chunk records of every group in chunk order (fixed, thread-independent).
  auto reduce_chunks = [&](const std::vector<double>& partial, int64_t record, int64_t g, double* out) {
    const int64_t b = g / groups_per_image, cls = g % groups_per_image;
    for (int64_t j = 0; j < record; ++j) {
      out[j] = 0.0;
    }
    for (int64_t k = 0; k < chunks_per_image; ++k) {
      const double* src = partial.data() + ((b * chunks_per_image + k) * groups_per_image + cls) * record;
      for (int64_t j = 0; j < record; ++j) {
        out[j] += src[j];
      }
    }
  };

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pcos_weights_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    std::vector<acc_t> fx(batch * hw), fy(batch * hw);

    // A) features and Gram sums.
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        const int64_t b = ci / chunks_per_image;
        const int64_t p0 = (ci % chunks_per_image) * chunk, p1 = std::min(hw, p0 + chunk);
        int64_t nonfinite = 0;
        thread_local std::vector<acc_t> seg_f0, seg_v;
        thread_local std::vector<int64_t> seg_label;
        thread_local std::vector<uint8_t> seg_finite;
        int64_t seg_begin = p0, seg_end = p0;  // the current run of pixels of one row
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t i = b * hw + p;
          if (p >= seg_end) {
            const int64_t yy = p / width, xx = p % width;
            seg_begin = p;
            seg_end = std::min(p1, (yy + 1) * width);
            const int64_t n = seg_end - seg_begin;
            seg_f0.resize(n);
            seg_v.resize(n);
            seg_label.resize(n);
            seg_finite.resize(n);
            cpu::row_features<scalar_t, acc_t>(z + b * sb + yy * sh + xx * sw, sc, sw, n, num_classes,
                                                   log_confidence, seg_f0.data(), seg_v.data(), seg_label.data(),
                                                   seg_finite.data());
          }
          const int64_t j = p - seg_begin;
          const PixelFeatures<acc_t> feat{seg_f0[j], seg_v[j], seg_label[j], seg_finite[j] != 0};
          nonfinite += feat.finite ? 0 : 1;
          const bool k = feat.finite && (valid_ptr == nullptr || valid_ptr[i]);
          keep[i] = k;
          fx[i] = k ? feat.f0 : acc_t(0);
          fy[i] = k ? feat.v : acc_t(0);
          label_ptr[i] = k ? feat.label : 0;
          if (k) {
            double* s = gram_partial.data() + (ci * groups_per_image + (class_groups ? feat.label : 0)) * kGramStats;
            const double x = static_cast<double>(feat.f0), y = static_cast<double>(feat.v);
            s[0] += 1.0;
            s[1] += x;
            s[2] += y;
            s[3] += x * x;
            s[4] += x * y;
            s[5] += y * y;
          }
        }
        nonfinite_partial[ci] = nonfinite;
      }
    });
    double* eigen_ptr = eigenvalues.data_ptr<double>();
    at::parallel_for(0, num_groups, 64, [&](int64_t begin, int64_t end) {
      double sums[kGramStats];
      for (int64_t g = begin; g < end; ++g) {
        reduce_chunks(gram_partial, kGramStats, g, sums);
        group_params_from_gram(sums, params.data() + g * kGroupParams, eigen_ptr + g * 2);
      }
    });

    // B) cluster assignment and shifted cluster sums.
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        const int64_t b = ci / chunks_per_image;
        const int64_t p0 = (ci % chunks_per_image) * chunk, p1 = std::min(hw, p0 + chunk);
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t i = b * hw + p;
          if (!keep[i]) {
            continue;
          }
          const int64_t cls = class_groups ? label_ptr[i] : 0;
          const double* gp = params.data() + (b * groups_per_image + cls) * kGroupParams;
          const double x = static_cast<double>(fx[i]), y = static_cast<double>(fy[i]);
          const int cl = assign_cluster(gp, x, y);
          double* s = cluster_partial.data() + ((ci * groups_per_image + cls) * 2 + cl) * kClusterStats;
          const double dx = x - gp[0], dy = y - gp[1];
          s[0] += 1.0;
          s[1] += dx;
          s[2] += dy;
          s[3] += dx * dx;
          s[4] += dy * dy;
        }
      }
    });
    double* mu_ptr = mu.data_ptr<double>();
    double* var_ptr = var.data_ptr<double>();
    int64_t* count_ptr = count.data_ptr<int64_t>();
    int64_t* chosen_ptr = chosen.data_ptr<int64_t>();
    at::parallel_for(0, num_groups, 64, [&](int64_t begin, int64_t end) {
      double sums[2 * kClusterStats];
      for (int64_t g = begin; g < end; ++g) {
        reduce_chunks(cluster_partial, 2 * kClusterStats, g, sums);
        cluster_stats(sums, params.data() + g * kGroupParams, mu_ptr + g * 4, var_ptr + g * 4, count_ptr + g * 2,
                      chosen_ptr + g, weight_params.data() + g * kWeightParams);
      }
    });

    // C) weights.
    float* weight_ptr = weight.data_ptr<float>();
    bool* reliable_ptr = reliable.data_ptr<bool>();
    at::parallel_for(0, batch * hw, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float w = 0.0f;
        if (keep[i]) {
          const int64_t g = (i / hw) * groups_per_image + (class_groups ? label_ptr[i] : 0);
          w = pixel_weight(weight_params.data() + g * kWeightParams, static_cast<double>(fx[i]),
                           static_cast<double>(fy[i]), alpha);
        }
        weight_ptr[i] = w;
        reliable_ptr[i] = keep[i] && w == 1.0f;
      }
    });
  });
  int64_t* nonfinite_ptr = n_nonfinite.data_ptr<int64_t>();
  for (int64_t ci = 0; ci < num_chunks; ++ci) {
    nonfinite_ptr[ci / chunks_per_image] += nonfinite_partial[ci];
  }
  return {weight, label, reliable, mu, var, count, eigenvalues, chosen, n_nonfinite};
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CPU, m) { m.impl("pcos_weights", &pcos_weights_cpu); }

}  // namespace csl
