// CUDA kernels of csl::weighted_cross_entropy. Forward: one thread per pixel (log-sum-exp over the classes, kept for
// the backward pass), per-block float64 partial sums of the loss and of the valid pixels reduced in a fixed order by
// a second one-block launch, which writes the loss and the count N_valid; no B x C x H x W intermediate; where
// C <= kRegisterClasses a pixel's C logits are loaded together into registers (PixelLogits in csl_math.h). Backward:
// one launch, one thread per pixel writes w * (softmax - onehot) * grad / max(N_valid, 1) from the forward's lse
// parts (max logit, log1p of the rest: csl_ce.h) and count, class by class (holding the logits in registers there
// took 160-218 registers per thread on sm_90: a quarter of the threads).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <limits>

#include "../csl_ce.h"
#include "cuda_utils.cuh"

namespace csl {
namespace {

constexpr int kPixelsPerThread = 4;
constexpr int kChunk = kThreads * kPixelsPerThread;

template <typename scalar_t, typename acc_t, int N>
__global__ void weighted_ce_forward_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ label,
                                           const acc_t* __restrict__ weight, PixelValidity is_valid,
                                           acc_t* __restrict__ lse, double* __restrict__ partial, int64_t total,
                                           int64_t hw, int64_t width, int64_t num_classes, int64_t sb, int64_t sc,
                                           int64_t sh, int64_t sw) {
  __shared__ double scratch[2 * kWarps];
  double sums[2] = {0.0, 0.0};  // sum of w * CE, number of valid pixels
  const int64_t base = blockIdx.x * int64_t(kChunk);
#pragma unroll
  for (int j = 0; j < kPixelsPerThread; ++j) {
    const int64_t i = base + j * kThreads + threadIdx.x;
    if (i >= total) {
      break;
    }
    const bool used = is_valid(i);
    sums[1] += used ? 1.0 : 0.0;
    const acc_t w = weight[i];
    if (!used || w == acc_t(0)) {
      lse[2 * i] = acc_t(0);
      lse[2 * i + 1] = acc_t(0);
      continue;  // contributes exactly 0, whatever its logits and label
    }
    const int64_t y = label[i];
    CUDA_KERNEL_ASSERT(y >= 0 && y < num_classes && "csl::weighted_cross_entropy: label out of range");
    if (y < 0 || y >= num_classes) {  // reached only where device asserts are compiled out: NaN, never a stray read
      lse[2 * i] = lse[2 * i + 1] = std::numeric_limits<acc_t>::quiet_NaN();
      sums[0] += std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    const int64_t b = i / hw, p = i - b * hw, row = p / width, col = p - row * width;
    const PixelLogits<scalar_t, acc_t, N> zl(z + b * sb + row * sh + col * sw, sc, num_classes);
    acc_t z_max, log_sum;
    pixel_logsumexp(zl, num_classes, z_max, log_sum);
    lse[2 * i] = z_max;
    lse[2 * i + 1] = log_sum;
    sums[0] += static_cast<double>(w * static_cast<acc_t>(pixel_ce(z_max, log_sum, zl.at(y, num_classes))));
  }
  block_reduce_sum<2>(sums, scratch);
  if (threadIdx.x == 0) {
    partial[2 * blockIdx.x] = sums[0];
    partial[2 * blockIdx.x + 1] = sums[1];
  }
}

template <typename acc_t>
__global__ void weighted_ce_finish_kernel(const double* __restrict__ partial, int64_t num_blocks,
                                          acc_t* __restrict__ loss, int64_t* __restrict__ count) {
  __shared__ double scratch[2 * kWarps];
  double sums[2] = {0.0, 0.0};
  for (int64_t k = threadIdx.x; k < num_blocks; k += kThreads) {  // fixed assignment and order
    sums[0] += partial[2 * k];
    sums[1] += partial[2 * k + 1];
  }
  block_reduce_sum<2>(sums, scratch);
  if (threadIdx.x == 0) {
    *loss = static_cast<acc_t>(sums[0] / (sums[1] > 1.0 ? sums[1] : 1.0));
    *count = static_cast<int64_t>(sums[1]);  // a sum of ones in float64: exact below 2^53 pixels
  }
}

template <typename scalar_t, typename acc_t>
__global__ void weighted_ce_backward_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ label,
                                            const acc_t* __restrict__ weight, PixelValidity is_valid,
                                            const acc_t* __restrict__ lse, const void* __restrict__ grad_loss,
                                            bool grad_loss_double,
                                            const int64_t* __restrict__ count, scalar_t* __restrict__ grad,
                                            int64_t total, int64_t hw, int64_t width,
                                            int64_t num_classes, int64_t sb, int64_t sc, int64_t sh, int64_t sw,
                                            int64_t gb, int64_t gc, int64_t gh, int64_t gw) {
  // grad_loss / max(N_valid, 1) in float64 from grad_loss's own value (a float64 one, or one exactly widened to
  // acc_t), as the CPU kernel computes it
  const double g = grad_loss_double ? *static_cast<const double*>(grad_loss)
                                    : static_cast<double>(*static_cast<const acc_t*>(grad_loss));
  const double scale = g / static_cast<double>(*count > 1 ? *count : int64_t(1));
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / hw, p = i - b * hw, row = p / width, col = p - row * width;
    const scalar_t* zp = z + b * sb + row * sh + col * sw;
    scalar_t* gp = grad + b * gb + row * gh + col * gw;
    const acc_t w = weight[i];
    if (w == acc_t(0) || !is_valid(i)) {
      for (int64_t k = 0; k < num_classes; ++k) {
        gp[k * gc] = scalar_t(0);
      }
      continue;
    }
    const int64_t y = label[i];
    CUDA_KERNEL_ASSERT(y >= 0 && y < num_classes && "csl::weighted_cross_entropy: label out of range");
    if (y < 0 || y >= num_classes) {  // reached only where device asserts are compiled out
      for (int64_t k = 0; k < num_classes; ++k) {
        gp[k * gc] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      }
      continue;
    }
    const acc_t s = static_cast<acc_t>(scale) * w;
    const acc_t hi = lse[2 * i], lo = lse[2 * i + 1];
    for (int64_t k = 0; k < num_classes; ++k) {
      const acc_t soft = std::exp((static_cast<acc_t>(zp[k * sc]) - hi) - lo);
      gp[k * gc] = static_cast<scalar_t>(s * (k == y ? soft - acc_t(1) : soft));
    }
  }
}

struct SideInputs {
  at::Tensor label, weight;
  ValidityInput validity;
};

SideInputs side_inputs(const at::Tensor& label, const at::Tensor& weight, const c10::optional<at::Tensor>& valid,
                       at::ScalarType acc_dtype, const char* op) {
  // The B x H x W side inputs are C times smaller than the logits: contiguous copies are cheap.
  return {label.to(at::kLong).contiguous(), weight.to(acc_dtype).contiguous(), ValidityInput(valid, op)};
}

template <typename scalar_t, typename acc_t>
void launch_forward(const at::Tensor& logits, const SideInputs& side, at::Tensor& lse, at::Tensor& partial,
                    int64_t num_blocks, cudaStream_t stream) {
  const int64_t hw = logits.size(2) * logits.size(3);
  auto kernel = classes_in_registers(logits.size(1)) ? weighted_ce_forward_kernel<scalar_t, acc_t, kRegisterClasses>
                                                     : weighted_ce_forward_kernel<scalar_t, acc_t, 0>;
  kernel<<<static_cast<unsigned int>(num_blocks), kThreads, 0, stream>>>(
      logits.const_data_ptr<scalar_t>(), side.label.const_data_ptr<int64_t>(), side.weight.const_data_ptr<acc_t>(),
      side.validity.view, lse.data_ptr<acc_t>(),
      partial.data_ptr<double>(), logits.size(0) * hw, hw, logits.size(3), logits.size(1), logits.stride(0),
      logits.stride(1), logits.stride(2), logits.stride(3));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_cross_entropy_cuda(const at::Tensor& logits,
                                                                           const at::Tensor& label,
                                                                           const at::Tensor& weight,
                                                                           const c10::optional<at::Tensor>& valid) {
  constexpr const char* op = "csl::weighted_cross_entropy";
  check_ce_inputs(logits, label, weight, valid, true, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t batch = logits.size(0), height = logits.size(2), width = logits.size(3);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({batch, height, width, 2}, logits.options().dtype(acc_dtype));  // csl_ce.h: max, log1p(t)
  at::Tensor loss = at::empty({}, logits.options().dtype(acc_dtype));
  at::Tensor count = at::empty({}, logits.options().dtype(at::kLong));
  const int64_t total = batch * height * width;
  const int64_t num_blocks = std::max<int64_t>(1, ceil_div(total, kChunk));
  TORCH_CHECK(num_blocks < (int64_t(1) << 31), op, ": input too large");
  at::Tensor partial = at::empty({2 * num_blocks}, logits.options().dtype(at::kDouble));
  const SideInputs side = side_inputs(label, weight, valid, acc_dtype, op);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "weighted_ce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // An empty input still runs one block: it writes zero partial sums, so the loss is 0.
    launch_forward<scalar_t, acc_t>(logits, side, lse, partial, num_blocks, stream);
    weighted_ce_finish_kernel<acc_t><<<1, kThreads, 0, stream>>>(partial.const_data_ptr<double>(), num_blocks,
                                                                 loss.data_ptr<acc_t>(), count.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse, count};
}

at::Tensor weighted_cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                const at::Tensor& label, const at::Tensor& weight,
                                                const c10::optional<at::Tensor>& valid, const at::Tensor& lse,
                                                const at::Tensor& count) {
  constexpr const char* op = "csl::weighted_cross_entropy_backward";
  check_ce_inputs(logits, label, weight, valid, true, op);
  check_ce_backward_inputs(grad_loss, logits, lse, count, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty_like(logits);
  const int64_t total = logits.size(0) * logits.size(2) * logits.size(3);
  if (grad.numel() == 0) {
    return grad;
  }
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const SideInputs side = side_inputs(label, weight, valid, acc_dtype, op);
  // No copies where autograd hands them over as the forward made them: lse in acc_t, grad_loss a 0-dim acc_t.
  // grad_loss is read in float64 where it is float64, else as acc_t (float16 / bfloat16 widen exactly).
  const at::Tensor lse_c = lse.to(acc_dtype).contiguous();
  const bool grad_loss_double = grad_loss.scalar_type() == at::kDouble;
  const at::Tensor grad_loss_c = grad_loss_double ? grad_loss : grad_loss.to(acc_dtype);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t hw = logits.size(2) * logits.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "weighted_ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    weighted_ce_backward_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), side.label.const_data_ptr<int64_t>(), side.weight.const_data_ptr<acc_t>(),
        side.validity.view, lse_c.const_data_ptr<acc_t>(), grad_loss_c.const_data_ptr(), grad_loss_double,
        count.const_data_ptr<int64_t>(), grad.data_ptr<scalar_t>(), total, hw, logits.size(3), logits.size(1),
        logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3), grad.stride(0), grad.stride(1),
        grad.stride(2), grad.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CUDA, m) {
  m.impl("weighted_cross_entropy", &weighted_cross_entropy_cuda);
  m.impl("weighted_cross_entropy_backward", &weighted_cross_entropy_backward_cuda);
}

}  // namespace csl
