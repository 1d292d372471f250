// Schema of csl::confusion_matrix (kernels: cpu/confusion_matrix_kernel.cpp, cuda/confusion_matrix_kernel.cu).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(csl, m) {
  // -> num_classes x num_classes int64, rows = target, columns = prediction.
  m.def("confusion_matrix(Tensor pred, Tensor target, int num_classes, int ignore_index) -> Tensor");
}
