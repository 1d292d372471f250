// CPU kernel of csl::trusted_mask: nearest-upsampled block grid AND reliable, written into a copy of the images.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../csl_common.h"

namespace csl {
namespace {

template <size_t kBytes>
struct BitsOf;
template <>
struct BitsOf<2> {
  using type = uint16_t;
};
template <>
struct BitsOf<4> {
  using type = uint32_t;
};
template <>
struct BitsOf<8> {
  using type = uint64_t;
};

// dst[x] = cover[x] ? fill : src[x] for a contiguous row (cover 0 / 1), as a bit select (no branch, vectorised;
// bf16 / half included, whose conversions are not needed to copy them).
template <typename scalar_t>
void masked_row(const scalar_t* __restrict src, const uint8_t* __restrict cover, int64_t n, scalar_t fill,
                scalar_t* __restrict dst) {
  using bits_t = typename BitsOf<sizeof(scalar_t)>::type;
  bits_t fill_bits;
  std::memcpy(&fill_bits, &fill, sizeof(fill_bits));
  for (int64_t x = 0; x < n; ++x) {
    bits_t v;
    std::memcpy(&v, src + x, sizeof(v));
    const bits_t mask = bits_t(0) - static_cast<bits_t>(cover[x]);
    v = static_cast<bits_t>((v & static_cast<bits_t>(~mask)) | (fill_bits & mask));
    std::memcpy(dst + x, &v, sizeof(v));
  }
}

std::tuple<at::Tensor, at::Tensor> trusted_mask_cpu(const at::Tensor& images, const at::Tensor& cells,
                                                    const at::Tensor& reliable, double fill) {
  check_trusted_mask_args(images, cells, reliable, fill, /*cuda=*/false);
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  const int64_t gh = cells.size(1), gw = cells.size(2);
  at::Tensor masked = at::empty_like(images);  // keeps NCHW / channels_last
  at::Tensor cover = at::empty({batch, height, width}, reliable.options());
  if (cover.numel() == 0) {
    return {masked, cover};
  }
  const at::Tensor cells_c = cells.contiguous(), reliable_c = reliable.contiguous();  // small B x H x W maps
  // The boolean maps are read as bytes, any nonzero byte True (as in PyTorch's own ops: a mask viewed from a 0 / 255
  // uint8 map holds 255); cover is written 0 / 1.
  const uint8_t* cells_ptr = reinterpret_cast<const uint8_t*>(cells_c.const_data_ptr<bool>());
  const uint8_t* reliable_ptr = reinterpret_cast<const uint8_t*>(reliable_c.const_data_ptr<bool>());
  uint8_t* cover_ptr = reinterpret_cast<uint8_t*>(cover.data_ptr<bool>());
  // Nearest upsampling: pixel column x lies in cell column floor(x * gw / W); cell column c spans the pixel columns
  // [col_begin[c], col_begin[c + 1]) (empty when gw > W).
  std::vector<int64_t> col_begin(gw + 1, width);
  for (int64_t x = width - 1; x >= 0; --x) {
    col_begin[x * gw / width] = x;
  }
  for (int64_t c = gw - 1; c >= 0; --c) {
    col_begin[c] = std::min(col_begin[c], col_begin[c + 1]);
  }
  const int64_t is0 = images.stride(0), is1 = images.stride(1), is2 = images.stride(2), is3 = images.stride(3);
  const int64_t os0 = masked.stride(0), os1 = masked.stride(1), os2 = masked.stride(2), os3 = masked.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "trusted_mask_cpu", [&] {
    const scalar_t* in = images.const_data_ptr<scalar_t>();
    scalar_t* out = masked.data_ptr<scalar_t>();
    const scalar_t fill_value = static_cast<scalar_t>(fill);
    // Rows of whole images per task: each row is a few hundred bytes of work.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width * channels));
    at::parallel_for(0, batch * height, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / height, y = row % height;
        const uint8_t* cell_row = cells_ptr + (b * gh + y * gh / height) * gw;
        const uint8_t* reliable_row = reliable_ptr + row * width;
        uint8_t* cover_row = cover_ptr + row * width;
        for (int64_t c = 0; c < gw; ++c) {
          const int64_t x0 = col_begin[c], x1 = col_begin[c + 1];
          if (cell_row[c] != 0) {
            for (int64_t x = x0; x < x1; ++x) {
              cover_row[x] = reliable_row[x] != 0;
            }
          } else {
            std::memset(cover_row + x0, 0, x1 - x0);
          }
        }
        for (int64_t k = 0; k < channels; ++k) {
          const scalar_t* src = in + b * is0 + k * is1 + y * is2;
          scalar_t* dst = out + b * os0 + k * os1 + y * os2;
          if (is3 == 1 && os3 == 1) {
            masked_row(src, cover_row, width, fill_value, dst);
          } else {
            for (int64_t x = 0; x < width; ++x) {
              dst[x * os3] = cover_row[x] != 0 ? fill_value : src[x * is3];
            }
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
