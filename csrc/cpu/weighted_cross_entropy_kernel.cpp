// CPU kernels of csl::weighted_cross_entropy (forward: loss and per-pixel log-sum-exp; backward: the gradient).
// No B x C x H x W intermediate is materialised; the loss is summed per fixed chunk in float64, chunks in order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "../csl_ce.h"

namespace csl {
namespace {

constexpr int64_t kChunk = 4096;

int64_t count_valid(const at::Tensor& valid_c, int64_t total) {
  if (!valid_c.defined()) {
    return total;
  }
  const bool* v = valid_c.const_data_ptr<bool>();
  int64_t n = 0;
  for (int64_t i = 0; i < total; ++i) {
    n += v[i] ? 1 : 0;
  }
  return n;
}

std::tuple<at::Tensor, at::Tensor> weighted_cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& label,
                                                              const at::Tensor& weight,
                                                              const c10::optional<at::Tensor>& valid) {
  constexpr const char* op = "csl::weighted_cross_entropy";
  check_ce_inputs(logits, label, weight, valid, false, op);
  const int64_t batch = logits.size(0), num_classes = logits.size(1), height = logits.size(2),
                width = logits.size(3);
  const int64_t hw = height * width, total = batch * hw;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({batch, height, width}, logits.options().dtype(acc_dtype));
  // The B x H x W side inputs are C times smaller than the logits: contiguous copies are cheap.
  const at::Tensor label_c = label.to(at::kLong).contiguous();
  const at::Tensor weight_c = weight.to(acc_dtype).contiguous();
  const at::Tensor valid_c = valid.has_value() ? valid->contiguous() : at::Tensor();
  const bool* valid_ptr = valid_c.defined() ? valid_c.const_data_ptr<bool>() : nullptr;
  const int64_t* label_ptr = label_c.const_data_ptr<int64_t>();
  const int64_t num_chunks = ceil_div(total, kChunk);
  std::vector<double> partial(num_chunks, 0.0);
  const int64_t sb = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "weighted_ce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const acc_t* w_ptr = weight_c.const_data_ptr<acc_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t ci = begin; ci < end; ++ci) {
        double sum = 0.0;
        for (int64_t i = ci * kChunk; i < std::min(total, (ci + 1) * kChunk); ++i) {
          const acc_t w = w_ptr[i];
          if (w == acc_t(0) || (valid_ptr != nullptr && !valid_ptr[i])) {
            lse_ptr[i] = acc_t(0);
            continue;  // contributes exactly 0, whatever its logits and label
          }
          const int64_t y = label_ptr[i];
          TORCH_CHECK(y >= 0 && y < num_classes, op, ": label ", y, " of a used pixel is outside [0, ",
                      num_classes, ")");
          const int64_t b = i / hw, p = i % hw;
          const scalar_t* zp = z + b * sb + (p / width) * sh + (p % width) * sw;
          const acc_t l = pixel_logsumexp<scalar_t, acc_t>(zp, sc, num_classes);
          lse_ptr[i] = l;
          sum += static_cast<double>(w * (l - static_cast<acc_t>(zp[y * sc])));
        }
        partial[ci] = sum;
      }
    });
  });
  double loss_sum = 0.0;
  for (double s : partial) {
    loss_sum += s;
  }
  const int64_t n_valid = count_valid(valid_c, total);
  const double loss = loss_sum / static_cast<double>(std::max<int64_t>(n_valid, 1));
  at::Tensor loss_t = at::empty({}, logits.options().dtype(acc_dtype));
  if (acc_dtype == at::kDouble) {
    *loss_t.data_ptr<double>() = loss;
  } else {
    *loss_t.data_ptr<float>() = static_cast<float>(loss);
  }
  return {loss_t, lse};
}

at::Tensor weighted_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                               const at::Tensor& label, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& valid, const at::Tensor& lse) {
  constexpr const char* op = "csl::weighted_cross_entropy_backward";
  check_ce_inputs(logits, label, weight, valid, false, op);
  check_pixel_map(lse, "lse", logits, op);
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must hold one value, got shape ", grad_loss.sizes());
  const int64_t batch = logits.size(0), num_classes = logits.size(1), height = logits.size(2),
                width = logits.size(3);
  const int64_t hw = height * width, total = batch * hw;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = at::empty_like(logits);
  if (grad.numel() == 0) {
    return grad;
  }
  const at::Tensor label_c = label.to(at::kLong).contiguous();
  const at::Tensor weight_c = weight.to(acc_dtype).contiguous();
  const at::Tensor lse_c = lse.to(acc_dtype).contiguous();
  const at::Tensor valid_c = valid.has_value() ? valid->contiguous() : at::Tensor();
  const bool* valid_ptr = valid_c.defined() ? valid_c.const_data_ptr<bool>() : nullptr;
  const int64_t* label_ptr = label_c.const_data_ptr<int64_t>();
  const double scale = grad_loss.item<double>() / static_cast<double>(std::max<int64_t>(count_valid(valid_c, total), 1));
  const int64_t sb = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);
  const int64_t gb = grad.stride(0), gc = grad.stride(1), gh = grad.stride(2), gw = grad.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "weighted_ce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const acc_t* w_ptr = weight_c.const_data_ptr<acc_t>();
    const acc_t* lse_ptr = lse_c.const_data_ptr<acc_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, total, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / hw, p = i % hw, yy = p / width, xx = p % width;
        const scalar_t* zp = z + b * sb + yy * sh + xx * sw;
        scalar_t* gp = g + b * gb + yy * gh + xx * gw;
        const acc_t w = w_ptr[i];
        if (w == acc_t(0) || (valid_ptr != nullptr && !valid_ptr[i])) {
          for (int64_t k = 0; k < num_classes; ++k) {
            gp[k * gc] = scalar_t(0);
          }
          continue;
        }
        const int64_t y = label_ptr[i];
        TORCH_CHECK(y >= 0 && y < num_classes, op, ": label ", y, " of a used pixel is outside [0, ", num_classes,
                    ")");
        const acc_t s = static_cast<acc_t>(scale) * w, l = lse_ptr[i];
        for (int64_t k = 0; k < num_classes; ++k) {
          const acc_t soft = std::exp(static_cast<acc_t>(zp[k * sc]) - l);
          gp[k * gc] = static_cast<scalar_t>(s * (k == y ? soft - acc_t(1) : soft));
        }
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CPU, m) {
  m.impl("weighted_cross_entropy", &weighted_cross_entropy_cpu);
  m.impl("weighted_cross_entropy_backward", &weighted_cross_entropy_backward_cpu);
}

}  // namespace csl
