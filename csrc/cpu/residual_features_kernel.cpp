// CPU kernel of csl::residual_features: one pass per pixel, rows of pixels in parallel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "../csl_common.h"
#include "../csl_math.h"
#include "row_features.h"

namespace csl {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_features_cpu(const at::Tensor& logits,
                                                                     const c10::optional<at::Tensor>& valid,
                                                                     bool log_confidence, bool released) {
  constexpr const char* op = "csl::residual_features";
  check_logits(logits, op);
  check_device(logits, "logits", false, op);
  check_valid(valid, logits, op);
  const int64_t batch = logits.size(0), num_classes = logits.size(1), height = logits.size(2),
                width = logits.size(3);
  const auto feature_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = logits.options();
  at::Tensor f0 = at::empty({batch, height, width}, options.dtype(feature_dtype));
  at::Tensor v = at::empty({batch, height, width}, options.dtype(feature_dtype));
  at::Tensor label = at::empty({batch, height, width}, options.dtype(at::kLong));
  if (f0.numel() == 0) {
    return {f0, v, label};
  }
  const ValidityInput validity(valid, op);  // logits keep their strides
  const PixelValidity is_valid = validity.view;
  const int64_t sb = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "residual_features_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    acc_t* f0_ptr = f0.data_ptr<acc_t>();
    acc_t* v_ptr = v.data_ptr<acc_t>();
    int64_t* label_ptr = label.data_ptr<int64_t>();
    at::parallel_for(0, batch * height, 1, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t row = row_begin; row < row_end; ++row) {
        const int64_t b = row / height, y = row % height;
        const scalar_t* z_row = z + b * sb + y * sh;
        thread_local std::vector<uint8_t> finite;
        finite.resize(width);
        const int64_t i0 = row * width;
        cpu::row_features<scalar_t, acc_t>(z_row, sc, sw, width, num_classes, log_confidence, released, f0_ptr + i0,
                                           v_ptr + i0, label_ptr + i0, finite.data());
        for (int64_t x = 0; x < width; ++x) {
          if (!finite[x] || !is_valid(i0 + x)) {
            f0_ptr[i0 + x] = acc_t(0);
            v_ptr[i0 + x] = acc_t(0);
            label_ptr[i0 + x] = 0;
          }
        }
      }
    });
  });
  return {f0, v, label};
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CPU, m) { m.impl("residual_features", &residual_features_cpu); }

}  // namespace csl
