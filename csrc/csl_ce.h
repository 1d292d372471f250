// Checks and per-pixel math of the weighted cross-entropy, shared by the CPU and CUDA kernels.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "csl_common.h"
#include "csl_math.h"

namespace csl {

inline void check_ce_inputs(const at::Tensor& logits, const at::Tensor& label, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& valid, bool cuda, const char* op) {
  check_logits(logits, op);
  check_device(logits, "logits", cuda, op);
  check_pixel_map(label, "label", logits, op);
  TORCH_CHECK(at::isIntegralType(label.scalar_type(), /*includeBool=*/false), op,
              ": label must be an integer tensor, got ", label.scalar_type());
  check_pixel_map(weight, "weight", logits, op);
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), op, ": weight must be a floating tensor, got ",
              weight.scalar_type());
  check_valid(valid, logits, op);
}

// The backward pass's own inputs: the forward's lse (B x H x W x 2, its log-sum-exp parts) and count (one int64
// value), and grad_loss (one value), all on the logits' device.
inline void check_ce_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& lse,
                                     const at::Tensor& count, const char* op) {
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == logits.size(0) && lse.size(1) == logits.size(2) &&
                  lse.size(2) == logits.size(3) && lse.size(3) == 2 && at::isFloatingType(lse.scalar_type()),
              op, ": lse (the forward's log-sum-exp parts) must be a floating tensor of shape B x H x W x 2 = [",
              logits.size(0), ", ", logits.size(2), ", ", logits.size(3), ", 2], got ", lse.scalar_type(), " of shape ",
              lse.sizes());
  TORCH_CHECK(lse.device() == logits.device(), op, ": lse is on ", lse.device(), " but the main input is on ",
              logits.device());
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.device() == logits.device(), op,
              ": grad_loss must hold one value on ", logits.device(), ", got shape ", grad_loss.sizes(), " on ",
              grad_loss.device());
  TORCH_CHECK(count.numel() == 1 && count.scalar_type() == at::kLong && count.device() == logits.device(), op,
              ": count (the forward's number of valid pixels) must hold one int64 value on ", logits.device(),
              ", got ", count.scalar_type(), " of shape ", count.sizes(), " on ", count.device());
}

// A used pixel's log-sum-exp is kept in two parts, as PyTorch's log-softmax keeps (z - max) - log(sum): its max logit
// and log1p(t), t = sum exp(z - max) - 1 (the other logits' terms and the max's ties, accumulated apart from the
// max's own 1). CE = (max - z_y) + log1p(t) and the softmax exp((z - max) - log1p(t)) are then as exact as PyTorch's
// at every scale of the logits. One float holding max + log1p(t) would keep log1p(t) only to an ulp of the max: a
// float32 one rounds a confident pixel's CE (1e-4 at a logit gap of 10) to ~2e-6 at a logit of 20, a float64 one
// loses a CE of 1e-14 at logits of 1e3 and all of log(C) at |logits| of 1e17.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t log_of_shifted_sum(acc_t rest) {
  return std::log1p(rest);
}

// CE = (max - z_y) + log1p(t) of a used pixel from its log-sum-exp parts, in float64 (exact for float32 parts).
template <typename acc_t>
C10_HOST_DEVICE inline double pixel_ce(acc_t z_max, acc_t log_sum, acc_t z_y) {
  return (static_cast<double>(z_max) - static_cast<double>(z_y)) + static_cast<double>(log_sum);
}

// The log-sum-exp parts of one pixel's C logits (PixelLogits of csl_math.h; max-shifted, in its acc_t). A logit equal
// to the max counts as exactly 1, so an infinite max gives +inf (or -inf when every logit is -inf) as
// torch.logsumexp does, instead of exp(inf - inf) = NaN; a NaN logit still gives NaN.
template <typename Logits, typename acc_t = typename Logits::value_type>
C10_HOST_DEVICE inline void pixel_logsumexp(const Logits& z, int64_t num_classes, acc_t& z_max, acc_t& log_sum) {
  constexpr int N = Logits::kCached;
  z_max = z[0];
  for_each_class<N>(1, num_classes, [&](int64_t k) {
    const acc_t zk = z[k];
    z_max = zk > z_max ? zk : z_max;
  });
  acc_t others = 0, ties = 0;
  for_each_class<N>(0, num_classes, [&](int64_t k) {
    const acc_t zk = z[k];
    if (zk == z_max) {
      ties += acc_t(1);
    } else {
      others += std::exp(zk - z_max);
    }
  });
  log_sum = log_of_shifted_sum(others + (ties - acc_t(1)));
}

}  // namespace csl
