// The second half of a LoRA mixture's delta: out += (s ⊙ w)·Bᵀ, s the shrink beside a
// projection's output, w the routing weights over rank rows. For a decode step's few tokens on
// CUDA (a CUDA build) it is one kernel (core/kernels/weighted_expand.h), the multiply folded in,
// reading only the non-zero blocks of a block-diagonal Bᵀ (q/k/v's) or adding to several
// projections' outputs at once (gate's and up's); elsewhere (prefill, more
// rows, the CPU, a CPU-only libtorch) it is MultiplyInPlace and addmm_, with the same roundings.

#ifndef MOELORA_CORE_WEIGHTED_EXPAND_H_
#define MOELORA_CORE_WEIGHTED_EXPAND_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "absl/types/span.h"

namespace moelora {

// A block-diagonal Bᵀ: rows ordered [expert][member][rank] (`rank` rows a block), columns
// [member 0 | member 1 | ...], member m `member_columns[m]` wide; block (expert, m) is zero
// outside member m's columns.
struct BlockDiagonalRows {
  absl::Span<const int64_t> member_columns;
  int64_t rank = 0;
};

// out += round(shrink ⊙ weights[:, :rows]) · bt, rounded once, as addmm_ rounds. shrink
// [tokens, rows]; weights [tokens, ≥ rows]; bt [rows, columns]; out [tokens, columns] (column
// blocks of wider buffers are fine; out must not overlap the others). `blocks`, when given,
// describes bt. `shrink` is scratch: its values afterwards are unspecified. Inference only
// (nothing that autograd records).
void WeightedExpandAdd(const at::Tensor& out, const at::Tensor& shrink, const at::Tensor& weights,
                       const at::Tensor& bt, const BlockDiagonalRows* blocks = nullptr);

// One output of WeightedExpandAddEach, as WeightedExpandAdd's arguments.
struct WeightedExpandTarget {
  at::Tensor out;
  at::Tensor shrink;
  at::Tensor bt;
};

// WeightedExpandAdd(target.out, target.shrink, weights, target.bt) for every target (projections
// with one routing, such as gate and up), in one kernel where the kernel takes all of them.
// Outputs must not overlap each other or any input.
void WeightedExpandAddEach(absl::Span<const WeightedExpandTarget> targets,
                           const at::Tensor& weights);

}  // namespace moelora

#endif  // MOELORA_CORE_WEIGHTED_EXPAND_H_
