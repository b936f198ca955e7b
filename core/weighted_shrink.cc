#include "core/weighted_shrink.h"

#include <ATen/ATen.h>

#include "core/strided_ops.h"

#ifdef MOELORA_HAVE_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <optional>

#include "core/kernel_element_type.h"
#include "core/kernels/weighted_shrink.h"
#endif

namespace moelora {
namespace {

#ifdef MOELORA_HAVE_CUDA_KERNELS
// Runs every part through our kernel when it takes them: few tokens of bf16 or fp16 on one CUDA
// device, matrices with contiguous rows, no autograd. Returns false (nothing done) otherwise.
bool TryKernel(const at::Tensor& x, const at::Tensor& weights, absl::Span<const ShrinkPart> parts) {
  const std::optional<kernels::ElementType> type = KernelElementType(x.scalar_type());
  if (!type.has_value() || !KernelMatrix(x, x) || !KernelMatrix(weights, x) ||
      weights.size(0) != x.size(0) ||
      parts.size() > static_cast<size_t>(kernels::kMaxShrinkTargets)) {
    return false;
  }
  kernels::WeightedShrinkArgs args;
  args.type = *type;
  args.tokens = x.size(0);
  args.in = x.size(1);
  args.x = {x.data_ptr(), x.stride(0)};
  args.weights = {weights.data_ptr(), weights.stride(0)};
  for (const ShrinkPart& part : parts) {
    if (!KernelMatrix(part.a, x) || !KernelMatrix(part.out, x) || part.a.size(1) != args.in ||
        part.out.size(0) != args.tokens || part.out.size(1) != part.a.size(0) ||
        weights.size(1) < part.a.size(0)) {
      return false;
    }
    args.targets[args.count++] = {{part.a.data_ptr(), part.a.stride(0)},
                                  part.a.size(0),
                                  part.out.data_ptr(),
                                  part.out.stride(0)};
  }
  if (!kernels::WeightedShrinkTakes(args)) return false;
  const cudaError_t error = kernels::LaunchWeightedShrink(
      args, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "weighted shrink kernel: ", cudaGetErrorString(error));
  return true;
}
#endif

}  // namespace

void WeightedShrinkInto(const at::Tensor& x, const at::Tensor& weights,
                        absl::Span<const ShrinkPart> parts) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (TryKernel(x, weights, parts)) return;
#endif
  for (const ShrinkPart& part : parts) {
    at::Tensor out = part.out;
    at::mm_out(out, x, part.a.t());
    MultiplyInPlace(out, weights.narrow(1, 0, part.a.size(0)));
  }
}

}  // namespace moelora
