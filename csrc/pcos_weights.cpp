// Schema of csl::pcos_weights (kernels: cpu/pcos_weights_kernel.cpp, cuda/pcos_weights_kernel.cu).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(csl, m) {
  // valid (every op): None, a bool mask (True = valid) or an integer ignore map (255 = ignored; an integer tensor is
  // never read as a 0/1 mask), csrc/pixel_validity.h.
  // G = B (image groups) or B * C (class groups, group index b * C + label).
  m.def(
      "pcos_weights(Tensor logits, Tensor? valid, float alpha, bool log_confidence, bool class_groups, "
      "bool released=False) -> "
      "(Tensor weight, Tensor label, Tensor reliable, Tensor mu, Tensor var, Tensor count, Tensor eigenvalues, "
      "Tensor chosen, Tensor n_nonfinite)");
}
