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

void CheckShapes(const at::Tensor& out, const at::Tensor& shrink, const at::Tensor& weights,
                 const at::Tensor& bt) {
  TORCH_CHECK(shrink.dim() == 2 && out.dim() == 2 && bt.dim() == 2 && weights.dim() == 2 &&
                  shrink.size(0) == out.size(0) && weights.size(0) == out.size(0) &&
                  bt.size(0) == shrink.size(1) && bt.size(1) == out.size(1) &&
                  weights.size(1) >= shrink.size(1),
              "weighted expand: shapes out ", out.sizes(), ", shrink ", shrink.sizes(),
              ", weights ", weights.sizes(), ", bt ", bt.sizes(), " do not fit");
}

void AddUnfused(const WeightedExpandTarget& target, const at::Tensor& weights) {
  MultiplyInPlace(target.shrink, weights.narrow(1, 0, target.shrink.size(1)));
  target.out.addmm_(target.shrink, target.bt);
}

#ifdef MOELORA_HAVE_CUDA_KERNELS
kernels::RowMajor Operand(const at::Tensor& t) { return {t.data_ptr(), t.stride(0)}; }

// A segment of `target` over all of its rows (blocks: set the row blocks after).
kernels::ExpandSegment Segment(const WeightedExpandTarget& target, const at::Tensor& weights) {
  const int64_t rows = target.shrink.size(1);
  return {.shrink = Operand(target.shrink),
          .weights = Operand(weights),
          .bt = Operand(target.bt),
          .out = target.out.data_ptr(),
          .out_stride = target.out.stride(0),
          .first_column = 0,
          .columns = target.out.size(1),
          .first_row = 0,
          .blocks = 1,
          .block_rows = rows,
          .block_stride = rows};
}

// Runs the expands through our kernel when it takes them all: few tokens of bf16 or fp16 on one
// CUDA device, matrices with contiguous rows and 16-byte packs, no autograd. `blocks` (one
// target only) splits its Bᵀ into the block-diagonal's members. Returns false (nothing done)
// otherwise.
bool TryKernel(absl::Span<const WeightedExpandTarget> targets, const at::Tensor& weights,
               const BlockDiagonalRows* blocks) {
  const at::Tensor& first = targets.front().out;
  const std::optional<kernels::ElementType> type = KernelElementType(first.scalar_type());
  if (!type.has_value() || !KernelMatrix(weights, first)) return false;
  kernels::WeightedExpandArgs args;
  args.type = *type;
  args.tokens = first.size(0);
  for (const WeightedExpandTarget& target : targets) {
    if (!KernelMatrix(target.out, first) || !KernelMatrix(target.shrink, first) ||
        !KernelMatrix(target.bt, first) || target.out.size(0) != args.tokens) {
      return false;
    }
  }
  if (blocks == nullptr) {
    if (targets.size() > static_cast<size_t>(kernels::kMaxExpandSegments)) return false;
    for (const WeightedExpandTarget& target : targets) {
      args.segments[args.count++] = Segment(target, weights);
    }
  } else {
    const WeightedExpandTarget& target = targets.front();
    const int64_t members = static_cast<int64_t>(blocks->member_columns.size());
    const int64_t rows = target.shrink.size(1);
    if (targets.size() != 1 || members < 1 || members > kernels::kMaxExpandSegments ||
        blocks->rank < 1 || rows % (members * blocks->rank) != 0) {
      return false;
    }
    int64_t first_column = 0;
    for (int64_t m = 0; m < members; ++m) {
      kernels::ExpandSegment segment = Segment(target, weights);
      segment.first_column = first_column;
      segment.columns = blocks->member_columns[m];
      segment.first_row = m * blocks->rank;
      segment.blocks = rows / (members * blocks->rank);
      segment.block_rows = blocks->rank;
      segment.block_stride = members * blocks->rank;
      args.segments[args.count++] = segment;
      first_column += blocks->member_columns[m];
    }
    if (first_column != target.out.size(1)) return false;
  }
  if (!kernels::WeightedExpandTakes(args)) return false;
  const cudaError_t error = kernels::LaunchWeightedExpand(
      args, c10::cuda::getCurrentCUDAStream(first.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "weighted expand kernel: ", cudaGetErrorString(error));
  return true;
}
#endif

}  // namespace

void WeightedExpandAdd(const at::Tensor& out, const at::Tensor& shrink, const at::Tensor& weights,
                       const at::Tensor& bt, const BlockDiagonalRows* blocks) {
  CheckShapes(out, shrink, weights, bt);
  const WeightedExpandTarget target{out, shrink, bt};
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (TryKernel({&target, 1}, weights, blocks)) return;
#endif
  AddUnfused(target, weights);
}

void WeightedExpandAddEach(absl::Span<const WeightedExpandTarget> targets,
                           const at::Tensor& weights) {
  if (targets.empty()) return;
  for (const WeightedExpandTarget& target : targets) {
    CheckShapes(target.out, target.shrink, weights, target.bt);
  }
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (TryKernel(targets, weights, nullptr)) return;
#endif
  for (const WeightedExpandTarget& target : targets) AddUnfused(target, weights);
}

}  // namespace moelora
