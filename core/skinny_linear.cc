#include "core/skinny_linear.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#ifdef MOELORA_HAVE_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "core/kernel_element_type.h"
#include "core/kernels/skinny_linear.h"
#endif

namespace moelora {
namespace {

#ifdef MOELORA_HAVE_CUDA_KERNELS
// The product through our kernel when it takes it: 2-D x of a few rows, bf16 or fp16 on one CUDA
// device, 16-byte packs, no autograd. Undefined (nothing done) otherwise.
at::Tensor TryKernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const std::optional<kernels::ElementType> type = KernelElementType(x.scalar_type());
  if (!type.has_value() || !KernelMatrix(x, x) || !KernelMatrix(weight, x) ||
      weight.size(1) != x.size(1) ||
      (bias.defined() && (!KernelOperand(bias, x) || bias.dim() != 1 ||
                          bias.size(0) != weight.size(0) || !bias.is_contiguous()))) {
    return at::Tensor();
  }
  kernels::SkinnyLinearArgs args;
  args.type = *type;
  args.tokens = x.size(0);
  args.in = x.size(1);
  args.out_features = weight.size(0);
  args.x = {x.data_ptr(), x.stride(0)};
  args.weight = {weight.data_ptr(), weight.stride(0)};
  args.bias = bias.defined() ? bias.data_ptr() : nullptr;
  args.out_stride = weight.size(0);  // the contiguous output allocated below
  // Its row count and sizes are SkinnyLinearTakes' to judge; the output is allocated only when
  // the kernel runs.
  if (!kernels::SkinnyLinearTakes(args)) return at::Tensor();
  at::Tensor out = at::empty({x.size(0), weight.size(0)}, x.options());
  args.out = out.data_ptr();
  const cudaError_t error = kernels::LaunchSkinnyLinear(
      args, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "skinny linear kernel: ", cudaGetErrorString(error));
  return out;
}
#endif

}  // namespace

at::Tensor SkinnyLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (at::Tensor out = TryKernel(x, weight, bias); out.defined()) return out;
#endif
  return at::linear(x, weight, bias);
}

}  // namespace moelora
