// CUDA kernel of csl::trusted_mask: one thread per pixel computes cover = up(cells) & reliable and writes every
// channel of the masked copy (images keep their strides: NCHW or channels_last).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../csl_common.h"
#include "cuda_utils.cuh"

namespace csl {
namespace {

struct ImageStrides {
  int64_t b, k, h, w;
};

template <typename scalar_t>
__global__ void trusted_mask_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                    const uint8_t* __restrict__ cells, const uint8_t* __restrict__ reliable,
                                    bool* __restrict__ cover, int64_t total, int64_t channels, int64_t height,
                                    int64_t width, int64_t gh, int64_t gw, ImageStrides si, ImageStrides so,
                                    scalar_t fill) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = i / (height * width), p = i - b * height * width, y = p / width, x = p - y * width;
    // the boolean maps read as bytes, any nonzero byte True (as in PyTorch's own ops); cover is written 0 / 1
    const bool c = cells[(b * gh + y * gh / height) * gw + x * gw / width] != 0 && reliable[i] != 0;
    cover[i] = c;
    const scalar_t* src = in + b * si.b + y * si.h + x * si.w;
    scalar_t* dst = out + b * so.b + y * so.h + x * so.w;
    for (int64_t k = 0; k < channels; ++k) {
      dst[k * so.k] = c ? fill : src[k * si.k];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> trusted_mask_cuda(const at::Tensor& images, const at::Tensor& cells,
                                                     const at::Tensor& reliable, double fill) {
  check_trusted_mask_args(images, cells, reliable, fill, /*cuda=*/true);
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  at::Tensor masked = at::empty_like(images);
  at::Tensor cover = at::empty({batch, height, width}, reliable.options());
  const int64_t total = cover.numel();
  if (total == 0) {
    return {masked, cover};
  }
  const at::Tensor cells_c = cells.contiguous(), reliable_c = reliable.contiguous();  // small maps
  const ImageStrides si{images.stride(0), images.stride(1), images.stride(2), images.stride(3)};
  const ImageStrides so{masked.stride(0), masked.stride(1), masked.stride(2), masked.stride(3)};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "trusted_mask_cuda", [&] {
    trusted_mask_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        images.const_data_ptr<scalar_t>(), masked.data_ptr<scalar_t>(),
        reinterpret_cast<const uint8_t*>(cells_c.const_data_ptr<bool>()),
        reinterpret_cast<const uint8_t*>(reliable_c.const_data_ptr<bool>()), cover.data_ptr<bool>(), total, channels,
        height, width, cells.size(1), cells.size(2), si, so, static_cast<scalar_t>(fill));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {masked, cover};
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CUDA, m) { m.impl("trusted_mask", &trusted_mask_cuda); }

}  // namespace csl
