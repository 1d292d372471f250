// CPU kernels of csl::weighted_cross_entropy (forward: loss, per-pixel log-sum-exp parts and the valid-pixel count;
// backward: the gradient).
// No B x C x H x W intermediate is materialised; the loss is summed per fixed chunk in float64, chunks in order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../csl_ce.h"
#include "huge_pages.h"
#include "tile_kernels.h"
#include "vec_math.h"

namespace csl {
namespace {

constexpr int64_t kChunk = 4096;

// Pixels whose ``keep(value)`` holds, in one loop over the typed mask or map (one that the compiler vectorises).
template <typename T, typename Keep>
int64_t count_kept(const void* data, int64_t total, Keep keep) {
  const T* v = static_cast<const T*>(data);
  int64_t n = 0;
  for (int64_t i = 0; i < total; ++i) {
    n += keep(v[i]) ? 1 : 0;
  }
  return n;
}

int64_t count_valid(const PixelValidity& validity, int64_t total) {
  const auto not_ignored = [](auto value) { return static_cast<int64_t>(value) != kIgnoreIndex; };
  switch (validity.kind) {
    case PixelValidity::kMask:
      return count_kept<uint8_t>(validity.data, total, [](uint8_t value) { return value != 0; });
    case PixelValidity::kUInt8:
      return count_kept<uint8_t>(validity.data, total, not_ignored);
    case PixelValidity::kInt16:
      return count_kept<int16_t>(validity.data, total, not_ignored);
    case PixelValidity::kInt32:
      return count_kept<int32_t>(validity.data, total, not_ignored);
    case PixelValidity::kInt64:
      return count_kept<int64_t>(validity.data, total, not_ignored);
    case PixelValidity::kAll:
      return total;
    default: {  // the rarer map dtypes: one read through the view per pixel
      int64_t n = 0;
      for (int64_t i = 0; i < total; ++i) {
        n += validity(i) ? 1 : 0;
      }
      return n;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weighted_cross_entropy_cpu(const at::Tensor& logits,
                                                                          const at::Tensor& label,
                                                                          const at::Tensor& weight,
                                                                          const c10::optional<at::Tensor>& valid) {
  constexpr const char* op = "csl::weighted_cross_entropy";
  check_ce_inputs(logits, label, weight, valid, false, op);
  const int64_t batch = logits.size(0), num_classes = logits.size(1), height = logits.size(2),
                width = logits.size(3);
  const int64_t hw = height * width, total = batch * hw;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({batch, height, width, 2}, logits.options().dtype(acc_dtype));  // csl_ce.h: max, log1p(t)
  // The B x H x W side inputs are C times smaller than the logits: contiguous copies are cheap.
  const at::Tensor label_c = label.to(at::kLong).contiguous();
  const at::Tensor weight_c = weight.to(acc_dtype).contiguous();
  const ValidityInput validity(valid, op);
  const PixelValidity is_valid = validity.view;
  const int64_t* label_ptr = label_c.const_data_ptr<int64_t>();
  const int64_t num_chunks = ceil_div(total, kChunk);
  std::vector<double> partial(num_chunks, 0.0);
  const int64_t sb = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "weighted_ce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const acc_t* w_ptr = weight_c.const_data_ptr<acc_t>();
    acc_t* lse_ptr = lse.data_ptr<acc_t>();
    at::parallel_for(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<acc_t> tile;
      tile.resize(num_classes * cpu::kTile);
      alignas(64) acc_t tile_max[cpu::kTile], tile_rest[cpu::kTile];
      for (int64_t ci = begin; ci < end; ++ci) {
        double sum = 0.0;
        cpu::for_each_tile(ci * kChunk, std::min(total, (ci + 1) * kChunk), height, width,
                           [&](int64_t b, int64_t yy, int64_t x0, int64_t len, int64_t i0) {
          const scalar_t* zt = z + b * sb + yy * sh + x0 * sw;
          const acc_t* src = tile.data();
          int64_t src_sc = cpu::kTile;
          if (cpu::in_place_rows<scalar_t, acc_t>(sw)) {  // scalar_t is acc_t: the logits are read in place
            src = reinterpret_cast<const acc_t*>(zt);
            src_sc = sc;
          } else {
            cpu::load_tile(zt, sc, sw, len, num_classes, tile.data());
          }
          cpu::logsumexp_tile(src, src_sc, len, num_classes, tile_max, tile_rest);
          for (int64_t j = 0; j < len; ++j) {
            const int64_t i = i0 + j;
            const acc_t w = w_ptr[i];
            if (w == acc_t(0) || !is_valid(i)) {
              lse_ptr[2 * i] = acc_t(0);
              lse_ptr[2 * i + 1] = acc_t(0);
              continue;  // contributes exactly 0, whatever its logits and label
            }
            const int64_t y = label_ptr[i];
            TORCH_CHECK(y >= 0 && y < num_classes, op, ": label ", y, " of a used pixel is outside [0, ",
                        num_classes, ")");
            const acc_t log_sum = log_of_shifted_sum(tile_rest[j]);
            lse_ptr[2 * i] = tile_max[j];
            lse_ptr[2 * i + 1] = log_sum;
            sum += static_cast<double>(w * static_cast<acc_t>(pixel_ce(tile_max[j], log_sum, src[y * src_sc + j])));
          }
        });
        partial[ci] = sum;
      }
    });
  });
  double loss_sum = 0.0;
  for (double s : partial) {
    loss_sum += s;
  }
  const int64_t n_valid = count_valid(is_valid, total);
  const double loss = loss_sum / static_cast<double>(std::max<int64_t>(n_valid, 1));
  at::Tensor loss_t = at::empty({}, logits.options().dtype(acc_dtype));
  if (acc_dtype == at::kDouble) {
    *loss_t.data_ptr<double>() = loss;
  } else {
    *loss_t.data_ptr<float>() = static_cast<float>(loss);
  }
  at::Tensor count = at::empty({}, logits.options().dtype(at::kLong));
  *count.data_ptr<int64_t>() = n_valid;
  return {loss_t, lse, count};
}

at::Tensor weighted_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                               const at::Tensor& label, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& valid, const at::Tensor& lse,
                                               const at::Tensor& count) {
  constexpr const char* op = "csl::weighted_cross_entropy_backward";
  check_ce_inputs(logits, label, weight, valid, false, op);
  check_ce_backward_inputs(grad_loss, logits, lse, count, op);
  const int64_t batch = logits.size(0), num_classes = logits.size(1), height = logits.size(2),
                width = logits.size(3);
  const int64_t hw = height * width, total = batch * hw;
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad = at::empty_like(logits);
  if (grad.numel() == 0) {
    return grad;
  }
  cpu::advise_huge_pages(grad.data_ptr(), grad.storage().nbytes());
  const at::Tensor label_c = label.to(at::kLong).contiguous();
  const at::Tensor weight_c = weight.to(acc_dtype).contiguous();
  const at::Tensor lse_c = lse.to(acc_dtype).contiguous();
  const ValidityInput validity(valid, op);
  const PixelValidity is_valid = validity.view;
  const int64_t* label_ptr = label_c.const_data_ptr<int64_t>();
  const double scale = grad_loss.item<double>() / static_cast<double>(std::max<int64_t>(count.item<int64_t>(), 1));
  const int64_t sb = logits.stride(0), sc = logits.stride(1), sh = logits.stride(2), sw = logits.stride(3);
  const int64_t gb = grad.stride(0), gc = grad.stride(1), gh = grad.stride(2), gw = grad.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "weighted_ce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* z = logits.const_data_ptr<scalar_t>();
    const acc_t* w_ptr = weight_c.const_data_ptr<acc_t>();
    const acc_t* lse_ptr = lse_c.const_data_ptr<acc_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    const acc_t scale_acc = static_cast<acc_t>(scale);
    // Any split of the pixels gives the same gradient (no reduction), so the grain only balances the work.
    at::parallel_for(0, total, kChunk, [&](int64_t begin, int64_t end) {
      thread_local std::vector<acc_t> tile;
      tile.resize(num_classes * cpu::kTile);
      alignas(64) acc_t tile_hi[cpu::kTile], tile_lo[cpu::kTile], tile_scale[cpu::kTile];
      alignas(64) int32_t tile_label[cpu::kTile], tile_used[cpu::kTile];
      cpu::for_each_tile(begin, end, height, width, [&](int64_t b, int64_t yy, int64_t x0, int64_t len, int64_t i0) {
        for (int64_t j = 0; j < len; ++j) {
          const int64_t i = i0 + j;
          const bool used = w_ptr[i] != acc_t(0) && is_valid(i);
          tile_used[j] = used ? 1 : 0;
          tile_label[j] = 0;
          tile_hi[j] = acc_t(0);
          tile_lo[j] = acc_t(0);
          tile_scale[j] = acc_t(0);
          if (used) {
            const int64_t y = label_ptr[i];
            TORCH_CHECK(y >= 0 && y < num_classes, op, ": label ", y, " of a used pixel is outside [0, ",
                        num_classes, ")");
            tile_label[j] = static_cast<int32_t>(y);
            tile_hi[j] = lse_ptr[2 * i];
            tile_lo[j] = lse_ptr[2 * i + 1];
            tile_scale[j] = scale_acc * w_ptr[i];
          }
        }
        const scalar_t* zt = z + b * sb + yy * sh + x0 * sw;
        scalar_t* gt = g + b * gb + yy * gh + x0 * gw;
        if (cpu::in_place_rows<scalar_t, acc_t>(sw) && gw == 1) {  // straight from the logits into the gradient
          cpu::ce_grad_tile(reinterpret_cast<const acc_t*>(zt), sc, reinterpret_cast<acc_t*>(gt), gc, len,
                            num_classes, tile_hi, tile_lo, tile_scale, tile_label, tile_used);
        } else {
          cpu::load_tile(zt, sc, sw, len, num_classes, tile.data());
          cpu::ce_grad_tile(tile.data(), cpu::kTile, tile.data(), cpu::kTile, len, num_classes, tile_hi, tile_lo,
                            tile_scale, tile_label, tile_used);
          cpu::store_tile(tile.data(), len, num_classes, gt, gc, gw);
        }
      });
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CPU, m) {
  m.impl("weighted_cross_entropy", &weighted_cross_entropy_cpu);
  m.impl("weighted_cross_entropy_backward", &weighted_cross_entropy_backward_cpu);
}

}  // namespace csl
