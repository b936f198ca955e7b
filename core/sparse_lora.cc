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
bool TryKernels(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a_stack,
                const at::Tensor& bt_stack, const at::Tensor& slots, const at::Tensor& weights) {
  const std::optional<kernels::ElementType> type = KernelElementType(out.scalar_type());
  if (!type.has_value() || !KernelMatrix(out, out) || !KernelMatrix(x, out)) return false;
  for (const at::Tensor* stack : {&a_stack, &bt_stack}) {
    if (!stack->is_cuda() || stack->device() != out.device() ||
        stack->scalar_type() != out.scalar_type() || stack->requires_grad()) {
      return false;
    }
  }
  if (slots.device() != out.device() || weights.device() != out.device() ||
      weights.scalar_type() != at::kFloat || weights.requires_grad()) {
    return false;
  }
  const at::Tensor dense_slots = slots.contiguous();
  const at::Tensor dense_weights = weights.contiguous();
  kernels::SparseLoraArgs args;
  args.type = *type;
  args.tokens = out.size(0);
  args.experts_per_token = slots.size(1);
  args.rank = a_stack.size(1);
  args.in = x.size(1);
  args.out = out.size(1);
  args.x = {x.data_ptr(), x.stride(0)};
  args.a = Stack(a_stack);
  args.bt = Stack(bt_stack);
  args.slots = dense_slots.data_ptr<int64_t>();
  args.weights = dense_weights.data_ptr<float>();
  args.out_data = out.data_ptr();
  args.out_stride = out.stride(0);
  if (!kernels::SparseLoraTakes(args)) return false;
  const at::Tensor workspace =
      at::empty({kernels::SparseLoraWorkspaceFloats(args)}, out.options().dtype(at::kFloat));
  args.workspace = workspace.data_ptr<float>();
  const cudaError_t error = kernels::LaunchSparseLora(
      args, c10::cuda::getCurrentCUDAStream(out.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "sparse LoRA kernels: ", cudaGetErrorString(error));
  return true;
}
#endif

}  // namespace

void SparseLoraAdd(const at::Tensor& out, const at::Tensor& x, const at::Tensor& a_stack,
                   const at::Tensor& bt_stack, const at::Tensor& slots, const at::Tensor& weights) {
  TORCH_CHECK(out.dim() == 2 && x.dim() == 2 && a_stack.dim() == 3 && bt_stack.dim() == 3 &&
                  slots.dim() == 2 && weights.dim() == 2 && x.size(0) == out.size(0) &&
                  slots.size(0) == out.size(0) && weights.sizes() == slots.sizes() &&
                  a_stack.size(2) == x.size(1) && bt_stack.size(2) == out.size(1) &&
                  a_stack.size(0) == bt_stack.size(0) && a_stack.size(1) == bt_stack.size(1),
              "sparse LoRA: shapes out ", out.sizes(), ", x ", x.sizes(), ", A ", a_stack.sizes(),
              ", Bt ", bt_stack.sizes(), ", slots ", slots.sizes(), ", weights ", weights.sizes(),
              " do not fit");
  TORCH_CHECK(slots.scalar_type() == at::kLong, "sparse LoRA: slots must be long");
  if (out.size(0) == 0 || slots.size(1) == 0) return;
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (TryKernels(out, x, a_stack, bt_stack, slots, weights)) return;
#endif
  // Each token's experts' rows, gathered, in batched GEMMs: round(x·Aᵀ), times the rounded
  // weight (rounded), then every expert's expand summed in fp32 and added to out, rounded once.
  const at::Tensor rounded_weights = weights.to(out.scalar_type());
  at::Tensor sum = at::zeros(out.sizes(), out.options().dtype(at::kFloat));
  for (int64_t j = 0; j < slots.size(1); ++j) {
    const at::Tensor index = slots.select(1, j);
    const at::Tensor shrink = at::bmm(a_stack.index_select(0, index), x.unsqueeze(2)).squeeze(2) *
                              rounded_weights.select(1, j).unsqueeze(1);
    sum +=
        at::bmm(shrink.unsqueeze(1).to(at::kFloat), bt_stack.index_select(0, index).to(at::kFloat))
            .squeeze(1);
  }
  out.copy_(out.to(at::kFloat) + sum);
}

}  // namespace moelora
