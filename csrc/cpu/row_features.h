// Features of a run of neighbouring pixels of one row (CPU), tile by tile (tile_kernels.h): float32 / float64 rows
// with contiguous pixels are read in place, other dtypes and layouts through a class-major copy.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tile_kernels.h"
#include "vec_math.h"

namespace csl {
namespace cpu {

// Pixel j's logits are at z[j * sw + k * sc]; writes f0, v, label and finite for the n pixels. Non-finite pixels
// get (0, 0, 0) and finite = 0.
template <typename scalar_t, typename acc_t>
void row_features(const scalar_t* z, int64_t sc, int64_t sw, int64_t n, int64_t num_classes, bool log_confidence,
                  bool released, acc_t* f0, acc_t* v, int64_t* label, uint8_t* finite) {
  thread_local std::vector<acc_t> tile;  // the exponentials (and the copy of the logits when not in place)
  tile.resize(num_classes * kTile);
  alignas(64) int32_t tile_label[kTile], tile_finite[kTile];
  for (int64_t j0 = 0; j0 < n; j0 += kTile) {
    const int64_t len = std::min(kTile, n - j0);
    if constexpr (std::is_same<scalar_t, acc_t>::value) {
      if (in_place_rows<scalar_t, acc_t>(sw)) {
        features_tile(z + j0, sc, len, num_classes, log_confidence, released, tile.data(), f0 + j0, v + j0, tile_label,
                      tile_finite);
      }
    }
    if (!in_place_rows<scalar_t, acc_t>(sw)) {
      load_tile(z + j0 * sw, sc, sw, len, num_classes, tile.data());
      features_tile(tile.data(), kTile, len, num_classes, log_confidence, released, tile.data(), f0 + j0, v + j0,
                    tile_label,
                    tile_finite);
    }
    for (int64_t j = 0; j < len; ++j) {
      label[j0 + j] = tile_label[j];
      finite[j0 + j] = static_cast<uint8_t>(tile_finite[j]);
    }
  }
}

}  // namespace cpu
}  // namespace csl
