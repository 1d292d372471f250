// Schema of csl::weighted_cross_entropy (kernels: cpu/ and cuda/weighted_cross_entropy_kernel.*).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(csl, m) {
  // valid: None, a bool mask (True = valid) or an integer ignore map (255 = ignored; an integer tensor is
  // never read as a 0/1 mask), csrc/pixel_validity.h.
  // -> (loss 0-dim, lse B x H x W x 2, count 0-dim int64): the log-sum-exp of every used pixel in two parts, its max
  // logit and log1p of the rest of the shifted sum (float32; float64 for float64 logits: csrc/csl_ce.h), and the
  // number of valid pixels N_valid are kept for the backward pass, which then needs no pass of its own over the
  // validity map.
  m.def(
      "weighted_cross_entropy(Tensor logits, Tensor label, Tensor weight, Tensor? valid) -> (Tensor, Tensor, "
      "Tensor)");
  // grad_logits = grad_loss * w * (softmax - onehot) / max(count, 1) on used pixels, exactly 0 elsewhere (lse and
  // count: the forward's outputs).
  m.def(
      "weighted_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor label, Tensor weight, Tensor? valid, "
      "Tensor lse, Tensor count) -> Tensor");
}
