// Which pixels are valid, as the ``valid`` argument of csl::residual_features, csl::pcos_weights and
// csl::weighted_cross_entropy(_backward) gives it: absent (every pixel), a bool mask (True = valid) or an integer
// ignore map (kIgnoreIndex = ignored) of any integer dtype but int8, which the kernels compare in place (no
// B x H x W comparison pass, launch or allocation before them). An integer tensor is always a map, never a 0/1 mask.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace csl {

// The ignore value of an integer map: csl_kernels._checks.IGNORE_INDEX, as segmentation datasets code it.
constexpr int64_t kIgnoreIndex = 255;

// What a kernel reads: pixel i (in B x H x W order) of a contiguous mask or map, compared where it is a map.
struct PixelValidity {
  enum Kind : int32_t { kAll, kMask, kUInt8, kInt16, kInt32, kInt64, kUInt16, kUInt32, kUInt64 };
  const void* data = nullptr;
  Kind kind = kAll;

  C10_HOST_DEVICE bool operator()(int64_t i) const {
    switch (kind) {
      case kMask:
        return static_cast<const uint8_t*>(data)[i] != 0;  // any nonzero byte is True, as in PyTorch's own ops
      case kUInt8:
        return static_cast<const uint8_t*>(data)[i] != kIgnoreIndex;
      case kInt16:
        return static_cast<const int16_t*>(data)[i] != kIgnoreIndex;
      case kInt32:
        return static_cast<const int32_t*>(data)[i] != kIgnoreIndex;
      case kInt64:
        return static_cast<const int64_t*>(data)[i] != kIgnoreIndex;
      case kUInt16:
        return static_cast<const uint16_t*>(data)[i] != kIgnoreIndex;
      case kUInt32:
        return static_cast<const uint32_t*>(data)[i] != kIgnoreIndex;
      case kUInt64:
        return static_cast<const uint64_t*>(data)[i] != static_cast<uint64_t>(kIgnoreIndex);
      default:
        return true;
    }
  }
};

// The kind of a ``valid`` tensor, with a clear error for every dtype that is neither a mask nor a map.
inline PixelValidity::Kind validity_kind(const at::Tensor& valid, const char* op) {
  switch (valid.scalar_type()) {
    case at::kBool:
      return PixelValidity::kMask;
    case at::kByte:
      return PixelValidity::kUInt8;
    case at::kShort:
      return PixelValidity::kInt16;
    case at::kInt:
      return PixelValidity::kInt32;
    case at::kLong:
      return PixelValidity::kInt64;
    case at::kUInt16:
      return PixelValidity::kUInt16;
    case at::kUInt32:
      return PixelValidity::kUInt32;
    case at::kUInt64:
      return PixelValidity::kUInt64;
    default:
      break;
  }
  TORCH_CHECK_TYPE(valid.scalar_type() != at::kChar, op, ": valid is an int8 ignore map, which cannot hold the ",
                   "ignore value ", kIgnoreIndex, "; use uint8 / int16 / int32 / int64, or a bool mask (True = valid)");
  TORCH_CHECK_TYPE(false, op, ": valid must be a bool mask (True = valid) or an integer ignore map (", kIgnoreIndex,
                   " = ignored), got ", valid.scalar_type());
  return PixelValidity::kAll;  // not reached
}

// A checked ``valid`` argument made contiguous (the B x H x W map is C times smaller than the logits: a copy, where
// one is needed, is cheap), kept alive while the kernels that read it through ``view`` run.
struct ValidityInput {
  at::Tensor tensor;  // undefined: every pixel is valid
  PixelValidity view;

  ValidityInput(const c10::optional<at::Tensor>& valid, const char* op) {
    if (valid.has_value()) {
      const PixelValidity::Kind kind = validity_kind(*valid, op);
      tensor = valid->contiguous();
      view.data = tensor.const_data_ptr();
      view.kind = kind;
    }
  }
};

}  // namespace csl
