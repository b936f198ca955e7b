#include "core/sparse_lora.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

#ifdef MOELORA_HAVE_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "core/kernel_element_type.h"
#include "core/kernels/sparse_lora.h"
#endif

namespace moelora {
namespace {

#ifdef MOELORA_HAVE_CUDA_KERNELS
kernels::SlotStack Stack(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

// Runs the kernels when they take the operands: few tokens of bf16 or fp16 on one CUDA device,
// 16-byte packs, no autograd. Returns false (nothing done) otherwise.
bool TryKernels(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& weights,
                absl::Span<const SparseLoraTarget> targets) {
  const std::optional<kernels::ElementType> type = KernelElementType(x.scalar_type());
  if (!type.has_value() || !KernelMatrix(x, x) ||
      targets.size() > static_cast<size_t>(kernels::kMaxSparseLoraTargets)) {
    return false;
  }
  if (slots.device() != x.device() || weights.device() != x.device() ||
      weights.scalar_type() != at::kFloat || weights.requires_grad()) {
    return false;
  }
  const at::Tensor dense_slots = slots.contiguous();
  const at::Tensor dense_weights = weights.contiguous();
  kernels::SparseLoraArgs args;
  args.type = *type;
  args.tokens = x.size(0);
  args.experts_per_token = slots.size(1);
  args.rank = targets.front().a_stack.size(1);
  args.in = x.size(1);
  args.x = {x.data_ptr(), x.stride(0)};
  args.slots = dense_slots.data_ptr<int64_t>();
  args.weights = dense_weights.data_ptr<float>();
  for (const SparseLoraTarget& target : targets) {
    if (!KernelMatrix(target.out, x) || !KernelOperand(target.a_stack, x) ||
        !KernelOperand(target.bt_stack, x) || target.a_stack.size(1) != args.rank) {
      return false;
    }
    args.targets[args.count++] = {.a = Stack(target.a_stack),
                                  .bt = Stack(target.bt_stack),
                                  .out = target.out.data_ptr(),
                                  .out_stride = target.out.stride(0),
                                  .columns = target.out.size(1)};
  }
  if (!kernels::SparseLoraTakes(args)) return false;
  const at::Tensor workspace =
      at::empty({kernels::SparseLoraWorkspaceFloats(args)}, x.options().dtype(at::kFloat));
  args.workspace = workspace.data_ptr<float>();
  const cudaError_t error =
      kernels::LaunchSparseLora(args, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "sparse LoRA kernels: ", cudaGetErrorString(error));
  return true;
}
#endif

}  // namespace

void SparseLoraAdd(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& weights,
                   absl::Span<const SparseLoraTarget> targets) {
  TORCH_CHECK(x.dim() == 2 && slots.dim() == 2 && slots.size(0) == x.size(0) &&
                  weights.sizes() == slots.sizes(),
              "sparse LoRA: x ", x.sizes(), ", slots ", slots.sizes(), " and weights ",
              weights.sizes(), " do not fit");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "sparse LoRA: slots must be long");
  for (const SparseLoraTarget& target : targets) {
    const at::Tensor &a = target.a_stack, &bt = target.bt_stack, &out = target.out;
    TORCH_CHECK(a.dim() == 3 && bt.dim() == 3 && out.dim() == 2 && out.size(0) == x.size(0) &&
                    a.size(2) == x.size(1) && bt.size(2) == out.size(1) &&
                    a.size(0) == bt.size(0) && a.size(1) == bt.size(1),
                "sparse LoRA: shapes out ", out.sizes(), ", x ", x.sizes(), ", A ", a.sizes(),
                ", Bt ", bt.sizes(), " do not fit");
  }
  if (x.size(0) == 0 || slots.size(1) == 0 || targets.empty()) return;
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (TryKernels(x, slots, weights, targets)) return;
#endif
  // Each token's experts' rows, gathered, in batched GEMMs: round(x·Aᵀ), times the rounded
  // weight (rounded), then every expert's expand summed in fp32 and added to out, rounded once.
  const at::Tensor rounded_weights = weights.to(x.scalar_type());
  for (const SparseLoraTarget& target : targets) {
    at::Tensor sum = at::zeros(target.out.sizes(), target.out.options().dtype(at::kFloat));
    for (int64_t j = 0; j < slots.size(1); ++j) {
      const at::Tensor index = slots.select(1, j);
      const at::Tensor shrink =
          at::bmm(target.a_stack.index_select(0, index), x.unsqueeze(2)).squeeze(2) *
          rounded_weights.select(1, j).unsqueeze(1);
      sum += at::bmm(shrink.unsqueeze(1).to(at::kFloat),
                     target.bt_stack.index_select(0, index).to(at::kFloat))
                 .squeeze(1);
    }
    target.out.copy_(target.out.to(at::kFloat) + sum);
  }
}

}  // namespace moelora
