// CUDA kernels of csl::pcos_weights.
//
// The five stages of PCOS (named as in the CPU and Triton kernels), one launch each on the current stream, no host
// synchronisation and no float atomics: A) features + per-chunk Gram sums (pcos_features_kernel; where C <=
// kRegisterClasses a pixel's C logits are loaded together into registers: PixelLogits in csl_math.h); B) group
// parameters: per-group eigen-decomposition, chunk partials reduced in chunk order (pcos_group_params_kernel);
// C) cluster assignment + per-chunk shifted cluster sums (pcos_cluster_kernel); D) cluster statistics per group
// (pcos_cluster_stats_kernel); E) weights (pcos_weight_kernel).
// A chunk is a fixed run of pixels of one image handled by one block. Image groups reduce a chunk with a fixed-order
// block reduction; class groups (up to C groups per chunk) are reduced by one thread per class that scans the chunk's
// tile of pixels in shared memory in pixel order. Both orders are fixed, so results are bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "../csl_common.h"
#include "../csl_math.h"
#include "cuda_utils.cuh"

namespace csl {
namespace {

constexpr int kTile = 1024;  // pixels per tile: 4 per thread
constexpr int kPerThread = kTile / kThreads;

struct ChunkLayout {
  int64_t hw, width, chunk, chunks_per_image, groups_per_image;
};

template <typename scalar_t, typename acc_t, int N>
__global__ void pcos_features_kernel(const scalar_t* __restrict__ z, PixelValidity is_valid,
                                     acc_t* __restrict__ fx, acc_t* __restrict__ fy, uint8_t* __restrict__ keep,
                                     int64_t* __restrict__ label, double* __restrict__ gram_partial,
                                     unsigned long long* __restrict__ n_nonfinite, ChunkLayout layout,
                                     int64_t num_classes, int64_t sb, int64_t sc, int64_t sh, int64_t sw,
                                     bool log_confidence, bool released, bool class_groups, int64_t first_image) {
  __shared__ acc_t tile_x[kTile];
  __shared__ acc_t tile_y[kTile];
  __shared__ int32_t tile_label[kTile];
  __shared__ double scratch[(kGramStats + 1) * kWarps];
  const int64_t b = first_image + blockIdx.y, k = blockIdx.x;
  const int64_t chunk_id = b * layout.chunks_per_image + k;
  const int64_t p_begin = k * layout.chunk;
  const int64_t p_end = p_begin + layout.chunk < layout.hw ? p_begin + layout.chunk : layout.hw;
  double sums[kGramStats + 1] = {0, 0, 0, 0, 0, 0, 0};  // image Gram sums and the non-finite count
  for (int64_t t0 = p_begin; t0 < p_end; t0 += kTile) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int slot = j * kThreads + threadIdx.x;
      const int64_t p = t0 + slot;
      int32_t lab = -1;
      if (p < p_end) {
        const int64_t i = b * layout.hw + p, y = p / layout.width, x = p - y * layout.width;
        const auto feat = pixel_features<scalar_t, acc_t, N>(z + b * sb + y * sh + x * sw, sc, num_classes,
                                                          log_confidence, released);
        const bool kp = feat.finite && is_valid(i);
        const acc_t xv = kp ? feat.f0 : acc_t(0), yv = kp ? feat.v : acc_t(0);
        fx[i] = xv;
        fy[i] = yv;
        keep[i] = kp;
        label[i] = kp ? feat.label : 0;
        sums[kGramStats] += feat.finite ? 0.0 : 1.0;
        if (class_groups) {  // each class's thread sums its pixels of the tile below
          lab = kp ? static_cast<int32_t>(feat.label) : -1;
          tile_x[slot] = xv;
          tile_y[slot] = yv;
        } else if (kp) {
          const double xd = xv, yd = yv;
          sums[0] += 1.0;
          sums[1] += xd;
          sums[2] += yd;
          sums[3] += xd * xd;
          sums[4] += xd * yd;
          sums[5] += yd * yd;
        }
      }
      if (class_groups) {
        tile_label[slot] = lab;
      }
    }
    if (class_groups) {
      __syncthreads();
      for (int64_t c = threadIdx.x; c < num_classes; c += kThreads) {
        double s[kGramStats] = {0, 0, 0, 0, 0, 0};
        for (int j = 0; j < kTile; ++j) {
          if (tile_label[j] == c) {
            const double xd = tile_x[j], yd = tile_y[j];
            s[0] += 1.0;
            s[1] += xd;
            s[2] += yd;
            s[3] += xd * xd;
            s[4] += xd * yd;
            s[5] += yd * yd;
          }
        }
        double* dst = gram_partial + (chunk_id * layout.groups_per_image + c) * kGramStats;
        for (int q = 0; q < kGramStats; ++q) {
          dst[q] += s[q];  // this thread owns the slot: tile after tile, in order
        }
      }
      __syncthreads();
    }
  }
  block_reduce_sum<kGramStats + 1>(sums, scratch);
  if (threadIdx.x == 0) {
    if (!class_groups) {
      for (int q = 0; q < kGramStats; ++q) {
        gram_partial[chunk_id * kGramStats + q] = sums[q];
      }
    }
    if (sums[kGramStats] > 0) {
      atomicAdd(n_nonfinite + b, static_cast<unsigned long long>(sums[kGramStats]));  // integer: order-free
    }
  }
}

// Chunk records a per-group thread loads before adding them (sum_records_in_order): 96 / 80 doubles in flight. The
// per-group kernels run few threads (one per group), so they are built for one block per SM (__launch_bounds__):
// ptxas then keeps a batch's loads ahead of its additions (200+ registers) instead of interleaving them (60-70).
constexpr int kGramBatch = 16;
constexpr int kClusterBatch = 8;

__global__ void __launch_bounds__(kThreads, 1)
    pcos_group_params_kernel(const double* __restrict__ gram_partial, double* __restrict__ params,
                             double* __restrict__ eigen, ChunkLayout layout, int64_t num_groups) {
  // Grid-stride: grid_for caps the blocks, so one thread may take several groups.
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < num_groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = g / layout.groups_per_image, cls = g - b * layout.groups_per_image;
    double sums[kGramStats] = {0, 0, 0, 0, 0, 0};
    sum_records_in_order<kGramStats, kGramBatch>(
        gram_partial + (b * layout.chunks_per_image * layout.groups_per_image + cls) * kGramStats,
        layout.groups_per_image * kGramStats, layout.chunks_per_image, sums);
    group_params_from_gram(sums, params + g * kGroupParams, eigen + g * 2);
  }
}

// Adds one sample to cluster ``cl`` of ``s`` (2 x kClusterStats sums). Both clusters are visited with constant
// indices and a select, so ``s`` stays in registers (indexing it by ``cl`` put it in local memory: 160 B of stack per
// thread on sm_90, per cuobjdump -res-usage); the kept sums are the same values as with ``s[cl * 5 + q] += v``.
__device__ inline void add_cluster_sample(double* s, const double* gp, double x, double y, int cl) {
  const double dx = x - gp[0], dy = y - gp[1];
  const double v[kClusterStats] = {1.0, dx, dy, dx * dx, dy * dy};
#pragma unroll
  for (int c = 0; c < 2; ++c) {
#pragma unroll
    for (int q = 0; q < kClusterStats; ++q) {
      const double sum = s[c * kClusterStats + q];
      s[c * kClusterStats + q] = c == cl ? sum + v[q] : sum;
    }
  }
}

template <typename acc_t>
__global__ void pcos_cluster_kernel(const acc_t* __restrict__ fx, const acc_t* __restrict__ fy,
                                    const uint8_t* __restrict__ keep, const int64_t* __restrict__ label,
                                    const double* __restrict__ params, double* __restrict__ cluster_partial,
                                    ChunkLayout layout, bool class_groups, int64_t first_image) {
  __shared__ acc_t tile_x[kTile];
  __shared__ acc_t tile_y[kTile];
  __shared__ int32_t tile_label[kTile];
  __shared__ int8_t tile_cluster[kTile];
  __shared__ double scratch[2 * kClusterStats * kWarps];
  const int64_t b = first_image + blockIdx.y, k = blockIdx.x;
  const int64_t chunk_id = b * layout.chunks_per_image + k;
  const int64_t p_begin = k * layout.chunk;
  const int64_t p_end = p_begin + layout.chunk < layout.hw ? p_begin + layout.chunk : layout.hw;
  double sums[2 * kClusterStats] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  const double* image_params = params + b * layout.groups_per_image * kGroupParams;
  for (int64_t t0 = p_begin; t0 < p_end; t0 += kTile) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int slot = j * kThreads + threadIdx.x;
      const int64_t p = t0 + slot;
      int32_t lab = -1;
      if (p < p_end) {
        const int64_t i = b * layout.hw + p;
        if (keep[i]) {
          lab = class_groups ? static_cast<int32_t>(label[i]) : 0;
          const double* gp = image_params + static_cast<int64_t>(lab) * kGroupParams;
          const double x = fx[i], y = fy[i];
          const int cl = assign_cluster(gp, x, y);
          if (class_groups) {
            tile_x[slot] = fx[i];
            tile_y[slot] = fy[i];
            tile_cluster[slot] = static_cast<int8_t>(cl);
          } else {
            add_cluster_sample(sums, gp, x, y, cl);
          }
        }
      }
      tile_label[slot] = lab;
    }
    if (class_groups) {
      __syncthreads();
      for (int64_t c = threadIdx.x; c < layout.groups_per_image; c += kThreads) {
        double s[2 * kClusterStats] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        const double* gp = image_params + c * kGroupParams;
        for (int j = 0; j < kTile; ++j) {
          if (tile_label[j] == c) {
            add_cluster_sample(s, gp, tile_x[j], tile_y[j], tile_cluster[j]);
          }
        }
        double* dst = cluster_partial + (chunk_id * layout.groups_per_image + c) * 2 * kClusterStats;
        for (int q = 0; q < 2 * kClusterStats; ++q) {
          dst[q] += s[q];
        }
      }
      __syncthreads();
    }
  }
  if (!class_groups) {
    block_reduce_sum<2 * kClusterStats>(sums, scratch);
    if (threadIdx.x == 0) {
      for (int q = 0; q < 2 * kClusterStats; ++q) {
        cluster_partial[chunk_id * 2 * kClusterStats + q] = sums[q];
      }
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    pcos_cluster_stats_kernel(const double* __restrict__ cluster_partial, const double* __restrict__ params,
                              double* __restrict__ mu, double* __restrict__ var, int64_t* __restrict__ count,
                              int64_t* __restrict__ chosen, double* __restrict__ weight_params, ChunkLayout layout,
                              int64_t num_groups, bool released) {
  // Grid-stride: grid_for caps the blocks, so one thread may take several groups.
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < num_groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = g / layout.groups_per_image, cls = g - b * layout.groups_per_image;
    double sums[2 * kClusterStats] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    sum_records_in_order<2 * kClusterStats, kClusterBatch>(
        cluster_partial + (b * layout.chunks_per_image * layout.groups_per_image + cls) * 2 * kClusterStats,
        layout.groups_per_image * 2 * kClusterStats, layout.chunks_per_image, sums);
    cluster_stats(sums, params + g * kGroupParams, mu + g * 4, var + g * 4, count + g * 2, chosen + g,
                  weight_params + g * kWeightParams, released);
  }
}

template <typename acc_t>
__global__ void pcos_weight_kernel(const acc_t* __restrict__ fx, const acc_t* __restrict__ fy,
                                   const uint8_t* __restrict__ keep, const int64_t* __restrict__ label,
                                   const double* __restrict__ weight_params, float* __restrict__ weight,
                                   bool* __restrict__ reliable, int64_t total, int64_t hw, int64_t groups_per_image,
                                   bool class_groups, double alpha) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    float w = 0.0f;
    const bool kp = keep[i] != 0;
    if (kp) {
      const int64_t g = (i / hw) * groups_per_image + (class_groups ? label[i] : 0);
      w = pixel_weight(weight_params + g * kWeightParams, static_cast<double>(fx[i]), static_cast<double>(fy[i]),
                       alpha);
    }
    weight[i] = w;
    reliable[i] = kp && w == 1.0f;
  }
}

PcosOutputs pcos_weights_cuda(const at::Tensor& logits, const c10::optional<at::Tensor>& valid, double alpha,
                              bool log_confidence, bool class_groups, bool released) {
  constexpr const char* op = "csl::pcos_weights";
  check_logits(logits, op);
  check_device(logits, "logits", true, op);
  check_valid(valid, logits, op);
  TORCH_CHECK(alpha > 0, op, ": alpha must be positive, got ", alpha);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t batch = logits.size(0), num_classes = logits.size(1), height = logits.size(2),
                width = logits.size(3);
  const int64_t hw = height * width;
  const int64_t groups_per_image = class_groups ? num_classes : 1;
  const int64_t num_groups = batch * groups_per_image;
  TORCH_CHECK(num_classes < (int64_t(1) << 31), op, ": too many classes (", num_classes, ")");
  const auto options = logits.options();
  PcosOutputTensors outputs(logits, num_groups);
  if (batch == 0 || hw == 0) {
    return outputs.empty_input();
  }
  constexpr int64_t kRecordBytes = 2 * kClusterStats * sizeof(double);
  const int64_t chunk = chunk_pixels(batch, hw, groups_per_image, kRecordBytes, kTile);
  const int64_t chunks_per_image = ceil_div(hw, chunk);
  TORCH_CHECK(chunks_per_image < (int64_t(1) << 31), op, ": input too large (H x W = ", hw, ")");
  const ChunkLayout layout{hw, width, chunk, chunks_per_image, groups_per_image};
  const int64_t num_chunks = batch * chunks_per_image;
  const ValidityInput validity(valid, op);
  const auto feature_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor fx = at::empty({batch * hw}, options.dtype(feature_dtype));
  at::Tensor fy = at::empty({batch * hw}, options.dtype(feature_dtype));
  at::Tensor keep = at::empty({batch * hw}, options.dtype(at::kByte));
  // Class groups accumulate tile after tile into their slots: they start from zero.
  at::Tensor gram_partial =
      class_groups ? at::zeros({num_chunks * groups_per_image * kGramStats}, options.dtype(at::kDouble))
                   : at::empty({num_chunks * kGramStats}, options.dtype(at::kDouble));
  at::Tensor cluster_partial =
      class_groups ? at::zeros({num_chunks * groups_per_image * 2 * kClusterStats}, options.dtype(at::kDouble))
                   : at::empty({num_chunks * 2 * kClusterStats}, options.dtype(at::kDouble));
  at::Tensor params = at::empty({num_groups * kGroupParams}, options.dtype(at::kDouble));
  at::Tensor weight_params = at::empty({num_groups * kWeightParams}, options.dtype(at::kDouble));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // The chunk passes take the images as grid y, at most kMaxGridY per launch.
  constexpr int64_t kMaxGridY = 65535;
  const unsigned int group_blocks = grid_for(num_groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "pcos_weights_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t first = 0; first < batch; first += kMaxGridY) {
      const dim3 chunk_grid(static_cast<unsigned int>(chunks_per_image),
                            static_cast<unsigned int>(std::min(kMaxGridY, batch - first)));
      auto features_kernel = classes_in_registers(num_classes)
                                 ? pcos_features_kernel<scalar_t, acc_t, kRegisterClasses>
                                 : pcos_features_kernel<scalar_t, acc_t, 0>;
      features_kernel<<<chunk_grid, kThreads, 0, stream>>>(
          logits.const_data_ptr<scalar_t>(), validity.view, fx.data_ptr<acc_t>(), fy.data_ptr<acc_t>(),
          keep.data_ptr<uint8_t>(), outputs.label.data_ptr<int64_t>(), gram_partial.data_ptr<double>(),
          reinterpret_cast<unsigned long long*>(outputs.n_nonfinite.data_ptr<int64_t>()), layout, num_classes,
          logits.stride(0), logits.stride(1), logits.stride(2), logits.stride(3), log_confidence, released,
          class_groups, first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    pcos_group_params_kernel<<<group_blocks, kThreads, 0, stream>>>(
        gram_partial.const_data_ptr<double>(), params.data_ptr<double>(), outputs.eigenvalues.data_ptr<double>(),
        layout, num_groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    for (int64_t first = 0; first < batch; first += kMaxGridY) {
      const dim3 chunk_grid(static_cast<unsigned int>(chunks_per_image),
                            static_cast<unsigned int>(std::min(kMaxGridY, batch - first)));
      pcos_cluster_kernel<acc_t><<<chunk_grid, kThreads, 0, stream>>>(
          fx.const_data_ptr<acc_t>(), fy.const_data_ptr<acc_t>(), keep.const_data_ptr<uint8_t>(),
          outputs.label.const_data_ptr<int64_t>(), params.const_data_ptr<double>(),
          cluster_partial.data_ptr<double>(), layout, class_groups, first);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    pcos_cluster_stats_kernel<<<group_blocks, kThreads, 0, stream>>>(
        cluster_partial.const_data_ptr<double>(), params.const_data_ptr<double>(), outputs.mu.data_ptr<double>(),
        outputs.var.data_ptr<double>(), outputs.count.data_ptr<int64_t>(), outputs.chosen.data_ptr<int64_t>(),
        weight_params.data_ptr<double>(), layout, num_groups, released);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pcos_weight_kernel<acc_t><<<grid_for(batch * hw), kThreads, 0, stream>>>(
        fx.const_data_ptr<acc_t>(), fy.const_data_ptr<acc_t>(), keep.const_data_ptr<uint8_t>(),
        outputs.label.const_data_ptr<int64_t>(), weight_params.const_data_ptr<double>(),
        outputs.weight.data_ptr<float>(), outputs.reliable.data_ptr<bool>(), batch * hw, hw, groups_per_image,
        class_groups, alpha);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return outputs.tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(csl, CUDA, m) { m.impl("pcos_weights", &pcos_weights_cuda); }

}  // namespace csl
