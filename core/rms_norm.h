// RMSNorm as the HF families compute it. On CUDA tensors of a CUDA build it is one kernel
// (core/kernels/rms_norm.h) wherever autograd need not record it; elsewhere ATen ops with the
// same roundings.

#ifndef MOELORA_CORE_RMS_NORM_H_
#define MOELORA_CORE_RMS_NORM_H_

#include <ATen/core/Tensor.h>

namespace moelora {

// How the norm's weight applies: Llama, Mistral and Qwen2 round the normalised x to the model's
// dtype and multiply by the weight there; Gemma multiplies by (1 + w) in fp32 and rounds once
// (the caller passes the fp32 1 + w).
enum class NormWeighting { kRoundThenWeight, kWeightInFp32 };

// x: [tokens, hidden] (rows may be strided); weight: [hidden]. Returns the normalised x in x's
// dtype: written into `out` and returned when `out` is defined ([tokens, hidden], any row
// stride), else a new tensor. Accumulates in fp32 (fp64 for fp64 inputs, as gradient checks use).
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps,
                   NormWeighting weighting, at::Tensor out = at::Tensor());

// A decoder's residual add and the norm after it: sum = x + residual (a new contiguous tensor,
// rounded once as Add rounds) and normed = RmsNorm(sum, ...) (into `out` when defined, and also
// into `out_copy` when that is defined: both [tokens, hidden], any row stride). One kernel where
// RmsNorm's applies; residual may be row-strided.
struct AddAndNorm {
  at::Tensor sum;
  at::Tensor normed;
};
AddAndNorm AddRmsNorm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                      double eps, NormWeighting weighting, at::Tensor out = at::Tensor(),
                      at::Tensor out_copy = at::Tensor());

}  // namespace moelora

#endif  // MOELORA_CORE_RMS_NORM_H_
