// Host-side helpers shared by the CPU and CUDA launchers: input checks and the fixed chunking of reductions.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "pixel_validity.h"

namespace csl {

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 4, op, ": logits must have shape B x C x H x W (4 dims), got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": logits must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(logits.size(1) >= 2, op, ": logits must have at least 2 classes (dim 1), got C = ", logits.size(1));
}

// A B x H x W tensor that goes with ``logits`` (B x C x H x W) or ``images`` (B x K x H x W).
inline void check_pixel_map(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == ref.size(0) && t.size(1) == ref.size(2) && t.size(2) == ref.size(3), op,
              ": ", name, " must have shape B x H x W = [", ref.size(0), ", ", ref.size(2), ", ", ref.size(3),
              "], got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the main input is on ",
              ref.device());
}

// ``valid``: absent, a bool mask or an integer ignore map (pixel_validity.h), of the logits' pixels.
inline void check_valid(const c10::optional<at::Tensor>& valid, const at::Tensor& logits, const char* op) {
  if (valid.has_value()) {
    check_pixel_map(*valid, "valid", logits, op);
    validity_kind(*valid, op);
  }
}

inline void check_device(const at::Tensor& t, const char* name, bool cuda, const char* op) {
  TORCH_CHECK(t.is_cuda() == cuda, op, ": the ", (cuda ? "CUDA" : "CPU"), " kernel needs ", name, " on ",
              (cuda ? "a CUDA device" : "the CPU"), ", got ", t.device());
}

// The largest finite value of the floating dtypes the kernels take, torch.finfo(dtype).max (0 for any other dtype).
inline double largest_finite(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return static_cast<double>(std::numeric_limits<c10::Half>::max());
    case at::kBFloat16: return static_cast<double>(std::numeric_limits<c10::BFloat16>::max());
    case at::kFloat: return std::numeric_limits<float>::max();
    case at::kDouble: return std::numeric_limits<double>::max();
    default: return 0.0;
  }
}

// The checks of csl::trusted_mask, the same for both launchers (``cuda`` = which device the kernel needs). A finite
// ``fill`` must fit the images' dtype (the kernels write it as that dtype: inf otherwise); NaN and inf are written.
inline void check_trusted_mask_args(const at::Tensor& images, const at::Tensor& cells, const at::Tensor& reliable,
                                    double fill, bool cuda) {
  constexpr const char* op = "csl::trusted_mask";
  const double largest = largest_finite(images.scalar_type());
  TORCH_CHECK(images.dim() == 4 && largest > 0, op, ": images must be a float16, bfloat16, float32 or float64 ",
              "B x K x H x W tensor, got ", images.scalar_type(), " of shape ", images.sizes());
  TORCH_CHECK(!std::isfinite(fill) || std::abs(fill) <= largest, op, ": fill=", fill, " does not fit the images' ",
              "dtype ", images.scalar_type(), " (largest finite value ", largest, ")");
  check_device(images, "images", cuda, op);
  check_pixel_map(reliable, "reliable", images, op);
  TORCH_CHECK(reliable.scalar_type() == at::kBool, op, ": reliable must be bool, got ", reliable.scalar_type());
  TORCH_CHECK(cells.dim() == 3 && cells.size(0) == images.size(0) && cells.size(1) >= 1 && cells.size(2) >= 1, op,
              ": cells must have shape B x gh x gw with B = ", images.size(0), " and gh, gw >= 1, got ", cells.sizes());
  TORCH_CHECK(cells.scalar_type() == at::kBool, op, ": cells must be bool, got ", cells.scalar_type());
  TORCH_CHECK(cells.device() == images.device(), op, ": cells is on ", cells.device(), " but images are on ",
              images.device());
}

// The checks of csl::confusion_matrix, the same for both launchers.
inline void check_confusion_matrix_args(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes,
                                        bool cuda) {
  constexpr const char* op = "csl::confusion_matrix";
  TORCH_CHECK(at::isIntegralType(pred.scalar_type(), /*includeBool=*/false), op,
              ": pred must be an integer tensor, got ", pred.scalar_type());
  TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), op,
              ": target must be an integer tensor, got ", target.scalar_type());
  TORCH_CHECK(pred.sizes() == target.sizes(), op, ": pred and target must have the same shape, got ", pred.sizes(),
              " and ", target.sizes());
  check_device(pred, "pred", cuda, op);
  TORCH_CHECK(target.device() == pred.device(), op, ": target is on ", target.device(), " but pred is on ",
              pred.device());
  TORCH_CHECK(num_classes >= 1, op, ": num_classes must be positive, got ", num_classes);
}

// csl::pcos_weights outputs, in the order, shapes and dtypes of PCOSOutputs (csl_kernels/pcos_weights.py). The
// kernels write every group's statistics (zeros for a group without pixels: cluster_stats, group_params_from_gram)
// and add to n_nonfinite, which starts at zero; an input without pixels runs no kernel: empty_input() zeroes them.
using PcosOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor>;

struct PcosOutputTensors {
  at::Tensor weight, label, reliable, mu, var, count, eigenvalues, chosen, n_nonfinite;

  PcosOutputTensors(const at::Tensor& logits, int64_t num_groups) {
    const int64_t batch = logits.size(0), height = logits.size(2), width = logits.size(3);
    const auto options = logits.options();
    weight = at::empty({batch, height, width}, options.dtype(at::kFloat));
    label = at::empty({batch, height, width}, options.dtype(at::kLong));
    reliable = at::empty({batch, height, width}, options.dtype(at::kBool));
    mu = at::empty({num_groups, 2, 2}, options.dtype(at::kDouble));
    var = at::empty({num_groups, 2, 2}, options.dtype(at::kDouble));
    count = at::empty({num_groups, 2}, options.dtype(at::kLong));
    eigenvalues = at::empty({num_groups, 2}, options.dtype(at::kDouble));
    chosen = at::empty({num_groups}, options.dtype(at::kLong));
    n_nonfinite = at::zeros({batch}, options.dtype(at::kLong));
  }

  // The outputs of an input without pixels (B = 0 or H x W = 0), where no kernel runs: the statistics are zeros.
  PcosOutputs empty_input() {
    for (at::Tensor* t : {&mu, &var, &count, &eigenvalues, &chosen}) {
      t->zero_();
    }
    return tuple();
  }

  PcosOutputs tuple() const { return {weight, label, reliable, mu, var, count, eigenvalues, chosen, n_nonfinite}; }
};

// Pixels per reduction chunk. Chunks never straddle images and depend only on the shapes (never on the number of
// threads), so every partial sum is reduced in the same order on every run. ``slots_per_chunk`` partial records of
// ``record_bytes`` each are kept per chunk; the chunk grows so that they stay below ``budget_bytes``.
inline int64_t chunk_pixels(int64_t batch, int64_t hw, int64_t slots_per_chunk, int64_t record_bytes, int64_t base,
                            int64_t budget_bytes = int64_t(64) << 20) {
  const int64_t total = std::max<int64_t>(1, batch * hw);
  const int64_t max_chunks = std::max<int64_t>(1, budget_bytes / (slots_per_chunk * record_bytes));
  const int64_t min_chunk = (total + max_chunks - 1) / max_chunks;
  const int64_t chunk = std::max(base, min_chunk);
  return (chunk + base - 1) / base * base;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace csl
