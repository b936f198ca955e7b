// RMSNorm over rows in one kernel: torch-free CUDA, built by nvcc.
//
// Written as ATen ops the norm is ~7 kernels (fp32 copy, square, mean, add, rsqrt, two
// multiplies and a rounding copy), each a launch and a pass over [tokens, hidden]; a decode step
// runs it twice per layer, so on a 2B model it was ~0.4 ms of a ~4 ms step.

#ifndef MOELORA_CORE_KERNELS_RMS_NORM_H_
#define MOELORA_CORE_KERNELS_RMS_NORM_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

struct RmsNormArgs {
  ElementType type = ElementType::kBFloat16;  // x and out
  ElementType weight_type = ElementType::kBFloat16;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* x = nullptr;
  int64_t x_stride = 0;  // elements between rows; columns contiguous
  // Optional residual branch: the norm is then of sum = x + residual (rounded to `type`, as an
  // add kernel would), which is also written to `sum`; a decoder's residual add and the next norm
  // in one pass. `sum` may not overlap x, residual or out.
  const void* residual = nullptr;
  int64_t residual_stride = 0;
  void* sum = nullptr;
  int64_t sum_stride = 0;
  const void* weight = nullptr;  // [cols]
  float eps = 0.0f;
  // Where the normalised value is rounded to `type` before the weight multiply (Llama:
  // weight * x_normed.to(dtype)) rather than multiplied in fp32 (Gemma: x_normed * (1 + w)).
  bool round_before_weight = true;
  void* out = nullptr;
  int64_t out_stride = 0;
  // Optional: the result written a second time, e.g. into the inputs of two projections that
  // each need room beside their own copy (gate and up). May not overlap the others.
  void* out_copy = nullptr;
  int64_t out_copy_stride = 0;
};

// out[r][c] = x[r][c] / sqrt(mean_c(x[r]²) + eps) * weight[c], in fp32, rounded as above (x
// being x + residual where there is one).
// `out` may not overlap `x` unless it is `x` itself. Launches on `stream`.
cudaError_t LaunchRmsNorm(const RmsNormArgs& args, cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_RMS_NORM_H_
