// The float tile kernels of tile_kernels.h compiled three times: for the x86-64 baseline (SSE2), AVX2 and AVX-512,
// each copy with the loop bodies inlined and vectorised for its ISA, and the widest one the CPU (and OS) supports
// picked at first use. The arithmetic is the same IEEE operations in every copy (-ffp-contract=off: no FMA), so all
// copies give bitwise the same results; the choice changes only the speed. Other architectures get the baseline.
#include "tile_kernels.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace csl {
namespace cpu {
namespace {

#define CSL_FLOAT_TILE_KERNELS(NAME, ATTR)                                                                          \
  ATTR void features_##NAME(const float* z, int64_t zsc, int64_t n, int64_t num_classes, bool log_confidence,       \
                            bool released, float* e, float* f0, float* v, int32_t* label, int32_t* finite) {        \
    features_body<float>(z, zsc, n, num_classes, log_confidence, released, e, f0, v, label, finite);             \
  }                                                                                                                 \
  ATTR void logsumexp_##NAME(const float* z, int64_t zsc, int64_t n, int64_t num_classes, float* z_max,           \
                             float* rest) {                                                                         \
    logsumexp_body<float>(z, zsc, n, num_classes, z_max, rest);                                                   \
  }                                                                                                                 \
  ATTR void ce_grad_##NAME(const float* z, int64_t zsc, float* g, int64_t gsc, int64_t n, int64_t num_classes,     \
                           const float* lse_hi, const float* lse_lo, const float* scale, const int32_t* label,      \
                           const int32_t* used) {                                                                   \
    ce_grad_body<float>(z, zsc, g, gsc, n, num_classes, lse_hi, lse_lo, scale, label, used);                      \
  }                                                                                                                 \
  ATTR void gram_sums_##NAME(const float* fx, const float* fy, int64_t n, double* out) {                          \
    gram_sums_body<float>(fx, fy, n, out);                                                                        \
  }                                                                                                                 \
  ATTR void cluster_sums_##NAME(const float* fx, const float* fy, int64_t n, const double* params, double* out) {  \
    cluster_sums_body<float>(fx, fy, n, params, out);                                                             \
  }                                                                                                                 \
  ATTR void weights_##NAME(const float* fx, const float* fy, const int64_t* label, int64_t n, const double* params,\
                           double alpha, float* weight, bool* reliable) {                                           \
    weights_body<float>(fx, fy, label, n, params, alpha, weight, reliable);                                        \
  }                                                                                                                 \
  constexpr FloatTileKernels k_##NAME{#NAME,           &features_##NAME,     &logsumexp_##NAME, &ce_grad_##NAME,    \
                                      &gram_sums_##NAME, &cluster_sums_##NAME, &weights_##NAME};

CSL_FLOAT_TILE_KERNELS(baseline, )

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CSL_X86_TILE_KERNELS 1
CSL_FLOAT_TILE_KERNELS(avx2, __attribute__((target("avx2"))))
#if defined(__clang__)
CSL_FLOAT_TILE_KERNELS(avx512, __attribute__((target("avx512f"))))
#else
CSL_FLOAT_TILE_KERNELS(avx512, __attribute__((target("avx512f,prefer-vector-width=512"))))
#endif
#endif

FloatTileKernels pick_float_tile_kernels() {
  const char* env = std::getenv("CSL_CPU_ISA");
  const std::string want = env != nullptr && env[0] != '\0' ? env : "avx512";
  TORCH_CHECK(want == "avx512" || want == "avx2" || want == "baseline",
              "CSL_CPU_ISA must be avx512, avx2 or baseline, got '", want, "'");
#ifdef CSL_X86_TILE_KERNELS
  __builtin_cpu_init();
  if (want == "avx512" && __builtin_cpu_supports("avx512f")) {
    return k_avx512;
  }
  if (want != "baseline" && __builtin_cpu_supports("avx2")) {
    return k_avx2;
  }
#endif
  return k_baseline;
}

}  // namespace

const FloatTileKernels& float_tile_kernels() {
  static const FloatTileKernels kernels = pick_float_tile_kernels();
  return kernels;
}

}  // namespace cpu
}  // namespace csl
