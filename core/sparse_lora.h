// Per-token LoRA for sparse routing: each token adds only its own experts' terms,
//   out_t += Σ_j round(round(x_t·A_{slot(t,j)}ᵀ) ⊙ round(w_tj)) · Bᵀ_{slot(t,j)}   (rounded once),
// reading only those experts' rows of the stacks. For a decode step's few tokens in bf16 or fp16
// on CUDA (a CUDA build) it is two kernels for up to three projections that read one input
// (core/kernels/sparse_lora.h); elsewhere it gathers each token's rows and runs batched GEMMs,
// with the same roundings.

#ifndef MOELORA_CORE_SPARSE_LORA_H_
#define MOELORA_CORE_SPARSE_LORA_H_

#include <ATen/core/Tensor.h>

#include "absl/types/span.h"

namespace moelora {

// One projection: a_stack [slots, R, in] and bt_stack [slots, R, out] (strided views, such as a
// projection's room, are fine); out [tokens, out] (a column block of a wider buffer is fine).
struct SparseLoraTarget {
  at::Tensor a_stack;
  at::Tensor bt_stack;
  at::Tensor out;
};

// For every target, out += the experts' terms above. x [tokens, in]; slots [tokens, k] long, on
// the device, every value a slot of the stacks; weights [tokens, k] fp32. A pair of weight 0 adds
// nothing. Inference only (nothing that autograd records).
void SparseLoraAdd(const at::Tensor& x, const at::Tensor& slots, const at::Tensor& weights,
                   absl::Span<const SparseLoraTarget> targets);

}  // namespace moelora

#endif  // MOELORA_CORE_SPARSE_LORA_H_
