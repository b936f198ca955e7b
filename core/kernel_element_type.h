// The torch side of our CUDA kernels' element types: which ATen dtype each kernel type is.
// Included by the kernels' wrappers (core/strided_ops.cc, core/rms_norm.cc, ...) in CUDA builds.

#ifndef MOELORA_CORE_KERNEL_ELEMENT_TYPE_H_
#define MOELORA_CORE_KERNEL_ELEMENT_TYPE_H_

#include <c10/core/ScalarType.h>

#include <optional>

#include "core/kernels/element_type.h"

namespace moelora {

// The kernels' type for an ATen dtype; nullopt for the dtypes they do not take.
inline std::optional<kernels::ElementType> KernelElementType(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return kernels::ElementType::kFloat;
    case at::kBFloat16:
      return kernels::ElementType::kBFloat16;
    case at::kHalf:
      return kernels::ElementType::kHalf;
    default:
      return std::nullopt;
  }
}

}  // namespace moelora

#endif  // MOELORA_CORE_KERNEL_ELEMENT_TYPE_H_
