// The element types and matrix operands our CUDA kernels take, named without CUDA's or torch's
// headers.

#ifndef MOELORA_CORE_KERNELS_ELEMENT_TYPE_H_
#define MOELORA_CORE_KERNELS_ELEMENT_TYPE_H_

#include <cstdint>

namespace moelora::kernels {

enum class ElementType { kFloat, kBFloat16, kHalf };

// A read-only matrix with contiguous rows, each `row_stride` elements after the one before.
struct RowMajor {
  const void* data = nullptr;
  int64_t row_stride = 0;
};

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_ELEMENT_TYPE_H_
