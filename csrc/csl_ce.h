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

// The backward pass's own inputs: the forward's lse (B x H x W) and count (one int64 value), and grad_loss (one
// value), all on the logits' device.
inline void check_ce_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& lse,
                                     const at::Tensor& count, const char* op) {
  check_pixel_map(lse, "lse", logits, op);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.device() == logits.device(), op,
              ": grad_loss must hold one value on ", logits.device(), ", got shape ", grad_loss.sizes(), " on ",
              grad_loss.device());
  TORCH_CHECK(count.numel() == 1 && count.scalar_type() == at::kLong && count.device() == logits.device(), op,
              ": count (the forward's number of valid pixels) must hold one int64 value on ", logits.device(),
              ", got ", count.scalar_type(), " of shape ", count.sizes(), " on ", count.device());
}

// The log-sum-exp of a pixel in float64 from its max logit and the rest of its max-shifted sum, t = sum exp(z - max)
// - 1 (the other logits' terms and the max's ties, accumulated apart from the max's own 1): max + log1p(t). Kept in
// float64, CE = lse - z_y and the softmax exp(z - lse) are as exact as PyTorch's (z - max) - log(sum); a float32 lse
// rounds a confident pixel's CE (1e-4 at a logit gap of 10) to an ulp of the max (~2e-6 at a logit of 20).
template <typename acc_t>
C10_HOST_DEVICE inline double lse_from_rest(acc_t z_max, acc_t rest) {
  return static_cast<double>(z_max) + static_cast<double>(std::log1p(rest));
}

// The float64 lse as two acc_t values, hi + lo = lse to ~2 ulp of acc_t: exp((z - hi) - lo) is the softmax as exactly
// as exp(z - lse) in float64 would give it.
template <typename acc_t>
C10_HOST_DEVICE inline void split_lse(double lse, acc_t& hi, acc_t& lo) {
  hi = static_cast<acc_t>(lse);
  // An infinite lse (an infinite max, or every logit -inf) has no remainder: lse - hi would be inf - inf = NaN.
  lo = is_finite(hi) ? static_cast<acc_t>(lse - static_cast<double>(hi)) : acc_t(0);
}

// log-sum-exp of one pixel's C logits (PixelLogits of csl_math.h; max-shifted, in its acc_t, returned in float64 by
// lse_from_rest). A logit equal to the max counts as exactly 1, so an infinite max gives +inf (or -inf when every
// logit is -inf), as torch.logsumexp does, instead of exp(inf - inf) = NaN; a NaN logit still gives NaN.
template <typename Logits, typename acc_t = typename Logits::value_type>
C10_HOST_DEVICE inline double pixel_logsumexp(const Logits& z, int64_t num_classes) {
  constexpr int N = Logits::kCached;
  acc_t z_max = z[0];
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
  return lse_from_rest(z_max, others + (ties - acc_t(1)));
}

}  // namespace csl
