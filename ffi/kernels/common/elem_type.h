// The element types the kernels of every mode compute with (reductions,
// casts), as the handlers name them when they decode an XLA dtype. Plain
// C++, for host and device code; the device-side conversions of each type
// are in elem_types.cuh.
#pragma once

#include <cstdint>

namespace jax_ep {

enum class ElemType : int32_t { kBF16 = 0, kF16 = 1, kF32 = 2, kF8E4M3FN = 3 };

// Bytes per element.
inline constexpr int ElemTypeBytes(ElemType type) {
  switch (type) {
    case ElemType::kBF16:
    case ElemType::kF16:
      return 2;
    case ElemType::kF32:
      return 4;
    case ElemType::kF8E4M3FN:
      return 1;
  }
  return 0;
}

}  // namespace jax_ep
