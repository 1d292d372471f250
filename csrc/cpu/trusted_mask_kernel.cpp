// CPU kernel of csl::trusted_mask: nearest-upsampled block grid AND reliable, written into a copy of the images.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../csl_common.h"

namespace csl {
namespace {

std::tuple<at::Tensor, at::Tensor> trusted_mask_cpu(const at::Tensor& images, const at::Tensor& cells,
                                                    const at::Tensor& reliable, double fill) {
  constexpr const char* op = "csl::trusted_mask";
  TORCH_CHECK(images.dim() == 4 && at::isFloatingType(images.scalar_type()), op,
              ": images must be a floating B x K x H x W tensor, got ", images.scalar_type(), " of shape ",
              images.sizes());
  check_device(images, "images", false, op);
  check_pixel_map(reliable, "reliable", images, op);
  TORCH_CHECK(reliable.scalar_type() == at::kBool, op, ": reliable must be bool, got ", reliable.scalar_type());
  TORCH_CHECK(cells.dim() == 3 && cells.size(0) == images.size(0) && cells.size(1) >= 1 && cells.size(2) >= 1, op,
              ": cells must have shape B x gh x gw with B = ", images.size(0), " and gh, gw >= 1, got ", cells.sizes());
  TORCH_CHECK(cells.scalar_type() == at::kBool, op, ": cells must be bool, got ", cells.scalar_type());
  TORCH_CHECK(cells.device() == images.device(), op, ": cells is on ", cells.device(), " but images are on ",
              images.device());
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  const int64_t gh = cells.size(1), gw = cells.size(2);
  at::Tensor masked = at::empty_like(images);  // keeps NCHW / channels_last
  at::Tensor cover = at::empty({batch, height, width}, reliable.options());
  if (cover.numel() == 0) {
    return {masked, cover};
  }
  const at::Tensor cells_c = cells.contiguous(), reliable_c = reliable.contiguous();  // small B x H x W maps
  const bool* cells_ptr = cells_c.data_ptr<bool>();
  const bool* reliable_ptr = reliable_c.data_ptr<bool>();
  bool* cover_ptr = cover.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "trusted_mask_cpu", [&] {
    const scalar_t* in = images.const_data_ptr<scalar_t>();
    scalar_t* out = masked.data_ptr<scalar_t>();
    const scalar_t fill_value = static_cast<scalar_t>(fill);
    at::parallel_for(0, batch * height, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / height, y = row % height;
        const bool* cell_row = cells_ptr + (b * gh + y * gh / height) * gw;
        bool* cover_row = cover_ptr + row * width;
        for (int64_t x = 0; x < width; ++x) {
          cover_row[x] = cell_row[x * gw / width] && reliable_ptr[row * width + x];
        }
        for (int64_t k = 0; k < channels; ++k) {
          const scalar_t* src = in + b * images.stride(0) + k * images.stride(1) + y * images.stride(2);
          scalar_t* dst = out + b * masked.stride(0) + k * masked.stride(1) + y * masked.stride(2);
          const int64_t s_in = images.stride(3), s_out = masked.stride(3);
          for (int64_t x = 0; x < width; ++x) {
            dst[x * s_out] = cover_row[x] ? fill_value : src[x * s_in];
          }
        }
      }
    });
  });
  return {masked, cover};
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CPU, m) { m.impl("trusted_mask", &trusted_mask_cpu); }

}  // namespace csl
