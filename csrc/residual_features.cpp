// Schema of csl::residual_features (kernels: cpu/residual_features_kernel.cpp, cuda/residual_features_kernel.cu).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(csl, m) {
  // -> (f0, v, label): B x H x W float32 (float64 for float64 logits), float32/64, int64.
  m.def("residual_features(Tensor logits, Tensor? valid, bool log_confidence) -> (Tensor, Tensor, Tensor)");
}
