// The torch side of our CUDA kernels' operands: which ATen dtype each kernel type is, and which
// matrices the kernels can read. Included by the kernels' wrappers (core/strided_ops.cc,
// core/rms_norm.cc, ...) in CUDA builds.

#ifndef MOELORA_CORE_KERNEL_ELEMENT_TYPE_H_
#define MOELORA_CORE_KERNEL_ELEMENT_TYPE_H_

#include <ATen/core/Tensor.h>
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

// A 2-D view's columns are contiguous (any row stride): how our kernels take their matrices.
inline bool ColumnsContiguous(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// t is an operand a kernel can take beside `like` (any layout): like's CUDA device and dtype,
// nothing autograd records.
inline bool KernelOperand(const at::Tensor& t, const at::Tensor& like) {
  return t.is_cuda() && t.device() == like.device() && t.scalar_type() == like.scalar_type() &&
         !t.requires_grad();
}

// t is a matrix a kernel can take beside `like`: 2-D, contiguous columns, a KernelOperand.
inline bool KernelMatrix(const at::Tensor& t, const at::Tensor& like) {
  return t.dim() == 2 && ColumnsContiguous(t) && KernelOperand(t, like);
}

}  // namespace moelora

#endif  // MOELORA_CORE_KERNEL_ELEMENT_TYPE_H_
