// CUDA kernel of csl::confusion_matrix: integer atomics only (counts are exact and order-free). Up to 64 x 64 cells
// (C <= 64) the block keeps a shared-memory histogram and flushes its non-zero cells; above, it adds to global memory.
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../csl_common.h"
#include "cuda_utils.cuh"

namespace csl {
namespace {

constexpr int64_t kSharedCells = 64 * 64;

template <bool kShared>
__global__ void confusion_matrix_kernel(const int64_t* __restrict__ pred, const int64_t* __restrict__ target,
                                        unsigned long long* __restrict__ out, int64_t n, int64_t num_classes,
                                        int64_t ignore_index) {
  __shared__ unsigned int hist[kShared ? kSharedCells : 1];
  const int64_t cells = num_classes * num_classes;
  if (kShared) {
    for (int64_t j = threadIdx.x; j < cells; j += blockDim.x) {
      hist[j] = 0;
    }
    __syncthreads();
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = target[i], p = pred[i];
    if (t != ignore_index && t >= 0 && t < num_classes && p >= 0 && p < num_classes) {
      if (kShared) {
        atomicAdd(hist + t * num_classes + p, 1u);
      } else {
        atomicAdd(out + t * num_classes + p, 1ull);
      }
    }
  }
  if (kShared) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < cells; j += blockDim.x) {
      if (hist[j] != 0) {
        atomicAdd(out + j, static_cast<unsigned long long>(hist[j]));
      }
    }
  }
}

at::Tensor confusion_matrix_cuda(const at::Tensor& pred, const at::Tensor& target, int64_t num_classes,
                                 int64_t ignore_index) {
  check_confusion_matrix_args(pred, target, num_classes, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor confusion = at::zeros({num_classes, num_classes}, pred.options().dtype(at::kLong));
  const int64_t n = pred.numel();
  if (n == 0) {
    return confusion;
  }
  const at::Tensor p = pred.to(at::kLong).contiguous(), t = target.to(at::kLong).contiguous();
  auto* out = reinterpret_cast<unsigned long long*>(confusion.data_ptr<int64_t>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int blocks = grid_for(n, kThreads, 1024);
  if (num_classes * num_classes <= kSharedCells) {
    confusion_matrix_kernel<true><<<blocks, kThreads, 0, stream>>>(p.const_data_ptr<int64_t>(),
                                                                   t.const_data_ptr<int64_t>(), out, n, num_classes,
                                                                   ignore_index);
  } else {
    confusion_matrix_kernel<false><<<blocks, kThreads, 0, stream>>>(p.const_data_ptr<int64_t>(),
                                                                    t.const_data_ptr<int64_t>(), out, n, num_classes,
                                                                    ignore_index);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return confusion;
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CUDA, m) { m.impl("confusion_matrix", &confusion_matrix_cuda); }

}  // namespace csl
