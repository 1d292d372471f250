// Schema of csl::trusted_mask (kernels: cpu/trusted_mask_kernel.cpp, cuda/trusted_mask_kernel.cu).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(csl, m) {
  // images B x K x H x W, cells bool B x gh x gw, reliable bool B x H x W -> (masked images, cover bool B x H x W).
  m.def("trusted_mask(Tensor images, Tensor cells, Tensor reliable, float fill) -> (Tensor, Tensor)");
}
