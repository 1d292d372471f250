// CPU kernel of csl::pcos_weights.
//
// The five stages of PCOS, named as in the CUDA and Triton kernels: A) features, pseudo-labels and per-chunk Gram
// sums; B) group parameters: per group, the Gram sums reduced in chunk order and their eigen-decomposition;
// C) cluster assignment and per-chunk cluster sums of the features shifted by the group mean; D) cluster statistics:
// per group, the cluster sums reduced in chunk order; E) weights. A, C and E are parallel passes over fixed chunks of
// pixels (chunks depend only on the shapes, so the result does not depend on the number of threads), B and D parallel
// loops over groups. Within a chunk, the sums of an image group are kept in interleaved lanes (pcos_lanes.h), those of
// a class group pixel by pixel; either order is fixed by the pixel indices alone.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "../csl_common.h"
#include "../csl_math.h"
#include "row_features.h"
#include "tile_kernels.h"
#include "vec_math.h"

namespace csl {
namespace {

// The per-chunk records (Q doubles each) of group g summed in chunk order, fixed and thread-independent: chunk k of
// image b holds the records of its groups_per_image groups one after the other. The same reduction as the CUDA
// per-group kernels' (sum_records_in_order; batches of one record here).
template <int Q>
void reduce_chunks(const std::vector<double>& partial, int64_t g, int64_t groups_per_image, int64_t chunks_per_image,
                   double* out) {
  const int64_t b = g / groups_per_image, cls = g % groups_per_image;
  std::fill(out, out + Q, 0.0);
  sum_records_in_order<Q, 1>(partial.data() + (b * chunks_per_image * groups_per_image + cls) * Q,
                             groups_per_image * Q, chunks_per_image, out);
}

PcosOutputs pcos_weights_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& valid, double alpha,
                             bool log_confidence, bool class_groups, bool released) {
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
  PcosOutputTensors outputs(logits, num_groups);
  if (batch == 0 || hw == 0) {
    return outputs.empty_input();
  }
  constexpr int64_t kRecordBytes = 2 * kClusterStats * sizeof(double);
  const int64_t chunk = chunk_pixels(batch, hw, groups_per_image, kRecordBytes, 4096);
  const int64_t chunks_per_image = ceil_div(hw, chunk);
  const int64_t num_chunks = batch * chunks_per_image;
  const ValidityInput validity(valid, op);
  const PixelValidity is_valid = validity.view;
  const int64_t sb = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);

  std::vector<double> gram_partial(num_chunks * groups_per_image * kGramStats, 0.0);
  std::vector<double> cluster_partial(num_chunks * groups_per_image * 2 * kClusterStats, 0.0);
  std::vector<int64_t> nonfinite_partial(num_chunks, 0);
  std::vector<double> params(num_groups * kGroupParams);
  std::vector<double> weight_params(num_groups * kWeightParams);
  int64_t* label_ptr = outputs.label.data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pcos_weights_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    // Features of every pixel for stages C and E (written by stage A); fx is NaN where a pixel is not used.
    std::unique_ptr<acc_t[]> fx_buffer(new acc_t[batch * hw]), fy_buffer(new acc_t[batch * hw]);
    acc_t* fx = fx_buffer.get();
    acc_t* fy = fy_buffer.get();
    // A) features and Gram sums.
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      alignas(64) uint8_t finite[cpu::kTile];
      for (int64_t ci = begin; ci < end; ++ci) {
        const int64_t b = ci / chunks_per_image;
        const int64_t i0 = b * hw + (ci % chunks_per_image) * chunk, i1 = std::min((b + 1) * hw, i0 + chunk);
        int64_t nonfinite = 0;
        cpu::for_each_tile(i0, i1, height, width, [&](int64_t bb, int64_t yy, int64_t x0, int64_t len, int64_t t0) {
          cpu::row_features<scalar_t, acc_t>(z + bb * sb + yy * sh + x0 * sw, sc, sw, len, num_classes,
                                             log_confidence, released, fx + t0, fy + t0, label_ptr + t0, finite);
          for (int64_t j = 0; j < len; ++j) {
            const int64_t i = t0 + j;
            nonfinite += finite[j] ? 0 : 1;
            const bool k = finite[j] && is_valid(i);
            fx[i] = k ? fx[i] : std::numeric_limits<acc_t>::quiet_NaN();
            fy[i] = k ? fy[i] : acc_t(0);
            label_ptr[i] = k ? label_ptr[i] : 0;
          }
        });
        nonfinite_partial[ci] = nonfinite;
        double* gram = gram_partial.data() + ci * groups_per_image * kGramStats;
        if (class_groups) {
          for (int64_t i = i0; i < i1; ++i) {
            if (fx[i] == fx[i]) {
              const double x = static_cast<double>(fx[i]), y = static_cast<double>(fy[i]);
              double* s = gram + label_ptr[i] * kGramStats;
              s[0] += 1.0;
              s[1] += x;
              s[2] += y;
              s[3] += x * x;
              s[4] += x * y;
              s[5] += y * y;
            }
          }
        } else {
          cpu::gram_sums(fx + i0, fy + i0, i1 - i0, gram);
        }
      }
    });
    // B) group parameters.
    double* eigen_ptr = outputs.eigenvalues.data_ptr<double>();
    at::parallel_for(0, num_groups, 64, [&](int64_t begin, int64_t end) {
      double sums[kGramStats];
      for (int64_t g = begin; g < end; ++g) {
        reduce_chunks<kGramStats>(gram_partial, g, groups_per_image, chunks_per_image, sums);
        group_params_from_gram(sums, params.data() + g * kGroupParams, eigen_ptr + g * 2);
      }
    });
    // C) cluster assignment and shifted cluster sums.
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        const int64_t b = ci / chunks_per_image;
        const int64_t i0 = b * hw + (ci % chunks_per_image) * chunk, i1 = std::min((b + 1) * hw, i0 + chunk);
        double* sums = cluster_partial.data() + ci * groups_per_image * 2 * kClusterStats;
        if (!class_groups) {
          cpu::cluster_sums(fx + i0, fy + i0, i1 - i0, params.data() + b * kGroupParams, sums);
          continue;
        }
        for (int64_t i = i0; i < i1; ++i) {
          if (fx[i] != fx[i]) {
            continue;  // not used
          }
          const int64_t cls = label_ptr[i];
          const double* gp = params.data() + (b * groups_per_image + cls) * kGroupParams;
          const double x = static_cast<double>(fx[i]), y = static_cast<double>(fy[i]);
          const int cl = assign_cluster(gp, x, y);
          double* s = sums + (cls * 2 + cl) * kClusterStats;
          const double dx = x - gp[0], dy = y - gp[1];
          s[0] += 1.0;
          s[1] += dx;
          s[2] += dy;
          s[3] += dx * dx;
          s[4] += dy * dy;
        }
      }
    });
    // D) cluster statistics.
    double* mu_ptr = outputs.mu.data_ptr<double>();
    double* var_ptr = outputs.var.data_ptr<double>();
    int64_t* count_ptr = outputs.count.data_ptr<int64_t>();
    int64_t* chosen_ptr = outputs.chosen.data_ptr<int64_t>();
    at::parallel_for(0, num_groups, 64, [&](int64_t begin, int64_t end) {
      double sums[2 * kClusterStats];
      for (int64_t g = begin; g < end; ++g) {
        reduce_chunks<2 * kClusterStats>(cluster_partial, g, groups_per_image, chunks_per_image, sums);
        cluster_stats(sums, params.data() + g * kGroupParams, mu_ptr + g * 4, var_ptr + g * 4, count_ptr + g * 2,
                      chosen_ptr + g, weight_params.data() + g * kWeightParams, released);
      }
    });
    // E) weights, image by image.
    float* weight_ptr = outputs.weight.data_ptr<float>();
    bool* reliable_ptr = outputs.reliable.data_ptr<bool>();
    at::parallel_for(0, batch * hw, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {
        const int64_t b = i / hw, n = std::min(end, (b + 1) * hw) - i;
        const double* wp = weight_params.data() + b * groups_per_image * kWeightParams;
        cpu::pcos_weights(fx + i, fy + i, class_groups ? label_ptr + i : nullptr, n, wp, alpha, weight_ptr + i,
                          reliable_ptr + i);
        i += n;
      }
    });
  });
  int64_t* nonfinite_ptr = outputs.n_nonfinite.data_ptr<int64_t>();
  for (int64_t ci = 0; ci < num_chunks; ++ci) {
    nonfinite_ptr[ci / chunks_per_image] += nonfinite_partial[ci];
  }
  return outputs.tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CPU, m) { m.impl("pcos_weights", &pcos_weights_cpu); }

}  // namespace csl
