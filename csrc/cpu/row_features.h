// Features of a run of neighbouring pixels of one row (CPU), pixel by pixel with the exponentials of the first pass
// kept for the variance pass (C <= kExpCache).
#pragma once

#include <cstdint>

#include "../csl_math.h"

namespace csl {
namespace cpu {

constexpr int kExpCache = 256;

// Pixel j's logits are at z[j * sw + k * sc]; writes f0, v, label and finite for the n pixels.
template <typename scalar_t, typename acc_t>
void row_features(const scalar_t* z, int64_t sc, int64_t sw, int64_t n, int64_t num_classes, bool log_confidence,
                  acc_t* f0, acc_t* v, int64_t* label, uint8_t* finite) {
  for (int64_t j = 0; j < n; ++j) {
    const auto feat = pixel_features<scalar_t, acc_t, kExpCache>(z + j * sw, sc, num_classes, log_confidence);
    f0[j] = feat.f0;
    v[j] = feat.v;
    label[j] = feat.label;
    finite[j] = feat.finite;
  }
}

}  // namespace cpu
}  // namespace csl
