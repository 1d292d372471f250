// Schema of csl::residual_features (kernels: cpu/residual_features_kernel.cpp, cuda/residual_features_kernel.cu).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(csl, m) {
  // valid: None, a bool mask (True = valid) or an integer ignore map (255 = ignored; an integer tensor is
  // never read as a 0/1 mask), csrc/pixel_validity.h.
  // -> (f0, v, label): B x H x W float32 (float64 for float64 logits), float32/64, int64.
  // released: the released code's residual variance (docs/selection.md Sec. 2b).
  m.def("residual_features(Tensor logits, Tensor? valid, bool log_confidence, bool released=False) -> "
        "(Tensor, Tensor, Tensor)");
}
