// Host-side helpers shared by the CPU and CUDA launchers: input checks and the fixed chunking of reductions.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace csl {

inline void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 4, op, ": logits must have shape B x C x H x W (4 dims), got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, op,
              ": logits must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(logits.size(1) >= 2, op, ": logits must have at least 2 classes (dim 1), got C = ", logits.size(1));
}

// A B x H x W tensor that goes with ``logits`` (B x C x H x W) or ``images`` (B x K x H x W).
inline void check_pixel_map(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* op) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == ref.size(0) && t.size(1) == ref.size(2) && t.size(2) == ref.size(3), op,
              ": ", name, " must have shape B x H x W = [", ref.size(0), ", ", ref.size(2), ", ", ref.size(3),
              "], got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the main input is on ",
              ref.device());
}

inline void check_valid(const c10::optional<at::Tensor>& valid, const at::Tensor& logits, const char* op) {
  if (valid.has_value()) {
    check_pixel_map(*valid, "valid", logits, op);
    TORCH_CHECK(valid->scalar_type() == at::kBool, op, ": valid must be a bool tensor (True = valid), got ",
                valid->scalar_type());
  }
}

inline void check_device(const at::Tensor& t, const char* name, bool cuda, const char* op) {
  TORCH_CHECK(t.is_cuda() == cuda, op, ": the ", (cuda ? "CUDA" : "CPU"), " kernel needs ", name, " on ",
              (cuda ? "a CUDA device" : "the CPU"), ", got ", t.device());
}

// Pixels per reduction chunk. Chunks never straddle images and depend only on the shapes (never on the number of
// threads), so every partial sum is reduced in the same order on every run. ``slots_per_chunk`` partial records of
// ``record_bytes`` each are kept per chunk; the chunk grows so that they stay below ``budget_bytes``.
inline int64_t chunk_pixels(int64_t batch, int64_t hw, int64_t slots_per_chunk, int64_t record_bytes, int64_t base,
                            int64_t budget_bytes = int64_t(64) << 20) {
  const int64_t total = std::max<int64_t>(1, batch * hw);
  const int64_t max_chunks = std::max<int64_t>(1, budget_bytes / (slots_per_chunk * record_bytes));
  const int64_t min_chunk = (total + max_chunks - 1) / max_chunks;
  const int64_t chunk = std::max(base, min_chunk);
  return (chunk + base - 1) / base * base;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace csl
