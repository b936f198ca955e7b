#include "core/weighted_expand.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "core/strided_ops.h"

#ifdef MOELORA_HAVE_CUDA_KERNELS
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "core/kernel_element_type.h"
#include "core/kernels/weighted_expand.h"
#endif

namespace moelora {
namespace {

#ifdef MOELORA_HAVE_CUDA_KERNELS
kernels::RowMajor Operand(const at::Tensor& t) { return {t.data_ptr(), t.stride(0)}; }

// Runs the expand through our kernel when it takes it: few tokens of bf16 or fp16 on one CUDA
// device, matrices with contiguous rows and 16-byte packs, no autograd. Returns false (nothing
// done) otherwise.
bool TryKernel(const at::Tensor& out, const at::Tensor& shrink, const at::Tensor& weights,
               const at::Tensor& bt, const BlockDiagonalRows* blocks) {
  const std::optional<kernels::ElementType> type = KernelElementType(out.scalar_type());
  if (!type.has_value() || !KernelMatrix(out, out) || !KernelMatrix(shrink, out) ||
      !KernelMatrix(weights, out) || !KernelMatrix(bt, out)) {
    return false;
  }
  const int64_t tokens = out.size(0), rows = shrink.size(1);
  kernels::WeightedExpandArgs args;
  args.type = *type;
  args.tokens = tokens;
  args.shrink = Operand(shrink);
  args.weights = Operand(weights);
  args.bt = Operand(bt);
  args.out = out.data_ptr();
  args.out_stride = out.stride(0);
  if (blocks == nullptr) {
    args.segments[args.count++] = {.first_column = 0,
                                   .columns = out.size(1),
                                   .first_row = 0,
                                   .blocks = 1,
                                   .block_rows = rows,
                                   .block_stride = rows};
  } else {
    const int64_t members = static_cast<int64_t>(blocks->member_columns.size());
    if (members < 1 || members > kernels::kMaxExpandSegments || blocks->rank < 1 ||
        rows % (members * blocks->rank) != 0) {
      return false;
    }
    int64_t first_column = 0;
    for (int64_t m = 0; m < members; ++m) {
      args.segments[args.count++] = {.first_column = first_column,
                                     .columns = blocks->member_columns[m],
                                     .first_row = m * blocks->rank,
                                     .blocks = rows / (members * blocks->rank),
                                     .block_rows = blocks->rank,
                                     .block_stride = members * blocks->rank};
      first_column += blocks->member_columns[m];
    }
    if (first_column != out.size(1)) return false;
  }
  if (!kernels::WeightedExpandTakes(args)) return false;
  const cudaError_t error = kernels::LaunchWeightedExpand(
      args, c10::cuda::getCurrentCUDAStream(out.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "weighted expand kernel: ", cudaGetErrorString(error));
  return true;
}
#endif

}  // namespace

void WeightedExpandAdd(const at::Tensor& out, const at::Tensor& shrink, const at::Tensor& weights,
                       const at::Tensor& bt, const BlockDiagonalRows* blocks) {
  TORCH_CHECK(shrink.dim() == 2 && out.dim() == 2 && bt.dim() == 2 && weights.dim() == 2 &&
                  shrink.size(0) == out.size(0) && weights.size(0) == out.size(0) &&
                  bt.size(0) == shrink.size(1) && bt.size(1) == out.size(1) &&
                  weights.size(1) >= shrink.size(1),
              "weighted expand: shapes out ", out.sizes(), ", shrink ", shrink.sizes(),
              ", weights ", weights.sizes(), ", bt ", bt.sizes(), " do not fit");
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (TryKernel(out, shrink, weights, bt, blocks)) return;
#endif
  MultiplyInPlace(shrink, weights.narrow(1, 0, shrink.size(1)));
  out.addmm_(shrink, bt);
}

}  // namespace moelora
