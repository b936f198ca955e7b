// Elementwise ops on the row-strided views a GEMM with room produces (its base output and the
// LoRA shrink beside it). On CUDA tensors of a CUDA build they run our vectorised kernels
// (core/kernels/row_strided.h): ATen's do not vectorise non-contiguous views, which made each
// such multiply or residual add cost 2-3x its memory traffic in prefill. Anywhere else (the CPU,
// a CPU-only libtorch, autograd) they are the ATen ops, with the same results.

#ifndef MOELORA_CORE_STRIDED_OPS_H_
#define MOELORA_CORE_STRIDED_OPS_H_

#include <ATen/core/Tensor.h>

#include "core/model_config.h"

namespace moelora {

// x *= y in place (same shape and dtype).
void MultiplyInPlace(const at::Tensor& x, const at::Tensor& y);

// a + b as a new contiguous tensor (same shape and dtype); through ATen where autograd records.
at::Tensor Add(const at::Tensor& a, const at::Tensor& b);

// The gated MLP's activation(gate) * up as a new contiguous tensor, with ATen's roundings (the
// activation rounded to the dtype, then the product): one kernel instead of two passes over the
// [tokens, intermediate] outputs.
at::Tensor GatedActivation(const at::Tensor& gate, const at::Tensor& up, Activation activation);

}  // namespace moelora

#endif  // MOELORA_CORE_STRIDED_OPS_H_
