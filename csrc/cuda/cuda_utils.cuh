// Launch helpers and a deterministic block reduction shared by the CUDA kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "../csl_math.h"

namespace csl {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Whether the kernels of ``num_classes`` classes load a pixel's logits together into registers (PixelLogits of
// csl_math.h) instead of class by class: C <= kRegisterClasses, unless CSL_CUDA_REGISTER_CLASSES=0 (read once per
// process; both give bitwise the same outputs, and the plain loop stays so that a GPU can time one against the other).
inline bool classes_in_registers(int64_t num_classes) {
  static const bool enabled = [] {
    const char* env = std::getenv("CSL_CUDA_REGISTER_CLASSES");
    const std::string value = env != nullptr ? env : "";
    TORCH_CHECK(value.empty() || value == "0" || value == "1", "CSL_CUDA_REGISTER_CLASSES must be 0 or 1, got '",
                value, "'");
    return value != "0";
  }();
  return enabled && num_classes <= kRegisterClasses;
}

inline unsigned int grid_for(int64_t n, int64_t per_block = kThreads, int64_t max_blocks = int64_t(1) << 20) {
  const int64_t blocks = (n + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > max_blocks ? max_blocks : blocks));
}

// Sums N values over a block of kThreads threads in a fixed order (warp shuffles, then one warp over the warp sums),
// so the result is bitwise reproducible. ``scratch`` holds N * kWarps doubles. The result is valid in thread 0.
// Every launch that calls it uses blocks of kThreads threads (whole warps; the full shuffle mask assumes them).
template <int N>
__device__ inline void block_reduce_sum(double (&v)[N], double* scratch) {
  static_assert(kThreads % 32 == 0 && kWarps <= 32, "block_reduce_sum: whole warps, and one warp of warp sums");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < N; ++j) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      v[j] += __shfl_down_sync(0xffffffffu, v[j], offset);
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      scratch[j * kWarps + warp] = v[j];
    }
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      v[j] = lane < kWarps ? scratch[j * kWarps + lane] : 0.0;
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) {
        v[j] += __shfl_down_sync(0xffffffffu, v[j], offset);
      }
    }
  }
  __syncthreads();  // scratch may be reused right after
}

}  // namespace csl
