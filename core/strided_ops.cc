#include "core/strided_ops.h"

#include <ATen/ATen.h>

#ifdef MOELORA_HAVE_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <optional>

#include "core/kernel_element_type.h"
#include "core/kernels/row_strided.h"
#endif

namespace moelora {
namespace {

#ifdef MOELORA_HAVE_CUDA_KERNELS
// Runs out = a op b through our kernel when all three are 2-D CUDA matrices of one supported
// dtype and shape with contiguous rows; returns false (nothing done) otherwise.
bool TryRowStrided(kernels::BinaryOp op, const at::Tensor& out, const at::Tensor& a,
                   const at::Tensor& b) {
  const std::optional<kernels::ElementType> type = KernelElementType(a.scalar_type());
  if (!type.has_value() || !a.is_cuda() || a.dim() != 2) return false;
  for (const at::Tensor* t : {&out, &a, &b}) {
    if (!t->is_cuda() || t->device() != a.device() || t->scalar_type() != a.scalar_type() ||
        t->sizes() != a.sizes() || !ColumnsContiguous(*t) || t->requires_grad()) {
      return false;
    }
  }
  auto operand = [](const at::Tensor& t) {
    return kernels::RowStridedOperand{const_cast<void*>(t.data_ptr()), t.stride(0)};
  };
  const cudaError_t error = kernels::LaunchRowStridedBinary(
      op, *type, a.size(0), a.size(1), operand(out), operand(a), operand(b),
      c10::cuda::getCurrentCUDAStream(a.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "row-strided elementwise kernel: ", cudaGetErrorString(error));
  return true;
}
#endif

}  // namespace

void MultiplyInPlace(const at::Tensor& x, const at::Tensor& y) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (TryRowStrided(kernels::BinaryOp::kMultiply, x, x, y)) return;
#endif
  const_cast<at::Tensor&>(x).mul_(y);
}

at::Tensor Add(const at::Tensor& a, const at::Tensor& b) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (a.is_cuda() && !a.requires_grad() && !b.requires_grad()) {
    at::Tensor out = at::empty(a.sizes(), a.options());
    if (TryRowStrided(kernels::BinaryOp::kAdd, out, a, b)) return out;
  }
#endif
  return a + b;
}

at::Tensor GatedActivation(const at::Tensor& gate, const at::Tensor& up, Activation activation) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (gate.is_cuda() && !gate.requires_grad() && !up.requires_grad()) {
    const kernels::BinaryOp op = activation == Activation::kSilu ? kernels::BinaryOp::kSiluTimes
                                 : activation == Activation::kGeluTanh
                                     ? kernels::BinaryOp::kGeluTanhTimes
                                     : kernels::BinaryOp::kGeluTimes;
    at::Tensor out = at::empty(gate.sizes(), gate.options());
    if (TryRowStrided(op, out, gate, up)) return out;
  }
#endif
  switch (activation) {
    case Activation::kSilu:
      return at::silu(gate) * up;
    case Activation::kGeluTanh:
      return at::gelu(gate, "tanh") * up;
    case Activation::kGeluExact:
      return at::gelu(gate) * up;
  }
  return gate * up;
}

}  // namespace moelora
