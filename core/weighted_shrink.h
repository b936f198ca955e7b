// The first half of a LoRA mixture's delta for projections that read the same input:
// out_i = (x·a_iᵀ) ⊙ weights, with the weights being the routing weights over rank rows. For a
// decode step's few tokens and rows (up to 16 experts of rank 16 for a pair) in bf16 or fp16 on
// CUDA (a CUDA build) every part is one kernel together (core/kernels/weighted_shrink.h), the
// multiply folded in; elsewhere (prefill, more rows, fp32, the CPU, a CPU-only libtorch) each part
// is a GEMM and MultiplyInPlace, with the same roundings.

#ifndef MOELORA_CORE_WEIGHTED_SHRINK_H_
#define MOELORA_CORE_WEIGHTED_SHRINK_H_

#include <ATen/core/Tensor.h>

#include "absl/types/span.h"

namespace moelora {

// One projection's part: a [rows, in] and out [tokens, rows] (a column block of a wider buffer
// is fine: the shrink columns beside a projection's input).
struct ShrinkPart {
  at::Tensor a;
  at::Tensor out;
};

// For every part: out = (x·aᵀ) ⊙ weights[:, :rows]. x [tokens, in]; weights [tokens, ≥ rows]. Up
// to two parts share one kernel; inference only (nothing that autograd records).
void WeightedShrinkInto(const at::Tensor& x, const at::Tensor& weights,
                        absl::Span<const ShrinkPart> parts);

}  // namespace moelora

#endif  // MOELORA_CORE_WEIGHTED_SHRINK_H_
