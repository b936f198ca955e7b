#include "core/rms_norm.h"

#include <ATen/ATen.h>

#include <utility>

#include "core/strided_ops.h"

#ifdef MOELORA_HAVE_CUDA_KERNELS
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <optional>

#include "core/kernel_element_type.h"
#include "core/kernels/rms_norm.h"
#endif

namespace moelora {
namespace {

#ifdef MOELORA_HAVE_CUDA_KERNELS
bool SameLayoutAs(const at::Tensor& t, const at::Tensor& x) {
  return t.sizes() == x.sizes() && t.scalar_type() == x.scalar_type() && t.device() == x.device() &&
         ColumnsContiguous(t);
}

// The kernel's norm of x (+ residual, written to `sum`, when residual is defined; also into
// out_copy when defined), or undefined (nothing done) where it does not apply.
at::Tensor KernelRmsNorm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                         double eps, NormWeighting weighting, at::Tensor out,
                         const at::Tensor& out_copy, at::Tensor* sum) {
  const std::optional<kernels::ElementType> type = KernelElementType(x.scalar_type());
  const std::optional<kernels::ElementType> weight_type = KernelElementType(weight.scalar_type());
  if (!type.has_value() || !weight_type.has_value() || !x.is_cuda() || x.dim() != 2 ||
      weight.dim() != 1 || weight.device() != x.device() || !weight.is_contiguous() ||
      weight.size(0) != x.size(1) || !ColumnsContiguous(x) ||
      (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad()))) {
    return at::Tensor();
  }
  if (residual.defined() &&
      (!SameLayoutAs(residual, x) || (at::GradMode::is_enabled() && residual.requires_grad()))) {
    return at::Tensor();
  }
  if (out_copy.defined() && !SameLayoutAs(out_copy, x)) return at::Tensor();
  if (out.defined()) {
    if (!SameLayoutAs(out, x)) return at::Tensor();
  } else {
    out = at::empty(x.sizes(), x.options());
  }
  kernels::RmsNormArgs args;
  args.type = *type;
  args.weight_type = *weight_type;
  args.rows = x.size(0);
  args.cols = x.size(1);
  args.x = x.data_ptr();
  args.x_stride = x.stride(0);
  if (residual.defined()) {
    *sum = at::empty(x.sizes(), x.options());
    args.residual = residual.data_ptr();
    args.residual_stride = residual.stride(0);
    args.sum = sum->data_ptr();
    args.sum_stride = sum->stride(0);
  }
  args.weight = weight.data_ptr();
  args.eps = static_cast<float>(eps);
  args.round_before_weight = weighting == NormWeighting::kRoundThenWeight;
  args.out = out.data_ptr();
  args.out_stride = out.stride(0);
  if (out_copy.defined()) {
    args.out_copy = out_copy.data_ptr();
    args.out_copy_stride = out_copy.stride(0);
  }
  const cudaError_t error =
      kernels::LaunchRmsNorm(args, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "RMSNorm kernel: ", cudaGetErrorString(error));
  return out;
}
#endif

}  // namespace

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
                   NormWeighting weighting, at::Tensor out) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (at::Tensor normed =
          KernelRmsNorm(x, at::Tensor(), weight, eps, weighting, out, at::Tensor(), nullptr);
      normed.defined()) {
    return normed;
  }
#endif
  const at::ScalarType accumulate = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor xf = x.to(accumulate);
  xf = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
  if (weighting == NormWeighting::kWeightInFp32) {
    return out.defined() ? out.copy_(xf * weight) : (xf * weight).to(x.scalar_type());
  }
  return out.defined() ? at::mul_out(out, weight, xf.to(x.scalar_type()))
                       : weight * xf.to(x.scalar_type());
}

AddAndNorm AddRmsNorm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                      double eps, NormWeighting weighting, at::Tensor out, at::Tensor out_copy) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  at::Tensor sum;
  if (at::Tensor normed = KernelRmsNorm(x, residual, weight, eps, weighting, out, out_copy, &sum);
      normed.defined()) {
    return {std::move(sum), std::move(normed)};
  }
#endif
  at::Tensor added = Add(x, residual);
  at::Tensor normed = RmsNorm(added, weight, eps, weighting, std::move(out));
  if (out_copy.defined()) out_copy.copy_(normed);
  return {std::move(added), std::move(normed)};
}

}  // namespace moelora
