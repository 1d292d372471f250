// CUDA kernel of csl::residual_features: one thread per pixel, logits read with their own strides (all C of a pixel
// at once into registers where C <= kRegisterClasses: PixelLogits in csl_math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../csl_common.h"
#include "../csl_math.h"
#include "cuda_utils.cuh"

namespace csl {
namespace {

template <typename scalar_t, typename acc_t, int N>
__global__ void residual_features_kernel(const scalar_t* __restrict__ z, PixelValidity is_valid,
                                         acc_t* __restrict__ f0, acc_t* __restrict__ v, int64_t* __restrict__ label,
                                         int64_t total, int64_t hw, int64_t width, int64_t num_classes, int64_t sb,
                                         int64_t sc, int64_t sh, int64_t sw, bool log_confidence, bool released) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / hw, p = i - b * hw, y = p / width, x = p - y * width;
    const auto feat =
        pixel_features<scalar_t, acc_t, N>(z + b * sb + y * sh + x * sw, sc, num_classes, log_confidence, released);
    const bool keep = feat.finite && is_valid(i);
    f0[i] = keep ? feat.f0 : acc_t(0);
    v[i] = keep ? feat.v : acc_t(0);
    label[i] = keep ? feat.label : 0;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> residual_features_cuda(const at::Tensor& logits,
                                                                      const c10::optional<at::Tensor>& valid,
                                                                      bool log_confidence, bool released) {
  constexpr const char* op = "csl::residual_features";
  check_logits(logits, op);
  check_device(logits, "logits", true, op);
  check_valid(valid, logits, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t batch = logits.size(0), num_classes = logits.size(1), height = logits.size(2),
                width = logits.size(3);
  const auto feature_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto options = logits.options();
  at::Tensor f0 = at::empty({batch, height, width}, options.dtype(feature_dtype));
  at::Tensor v = at::empty({batch, height, width}, options.dtype(feature_dtype));
  at::Tensor label = at::empty({batch, height, width}, options.dtype(at::kLong));
  const int64_t total = f0.numel();
  if (total == 0) {
    return {f0, v, label};
  }
  const ValidityInput validity(valid, op);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "residual_features_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto kernel = classes_in_registers(num_classes) ? residual_features_kernel<scalar_t, acc_t, kRegisterClasses>
                                                    : residual_features_kernel<scalar_t, acc_t, 0>;
    kernel<<<grid_for(total), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), validity.view, f0.data_ptr<acc_t>(), v.data_ptr<acc_t>(),
        label.data_ptr<int64_t>(), total, height * width, width, num_classes, logits.stride(0), logits.stride(1),
        logits.stride(2), logits.stride(3), log_confidence, released);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {f0, v, label};
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CUDA, m) { m.impl("residual_features", &residual_features_cuda); }

}  // namespace csl
