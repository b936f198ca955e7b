// The LoRA mixture's weighted shrink for a few tokens (a decode step): torch-free CUDA, built by
// nvcc.
//
// In a decode step gate and up each need s = (x·Aᵀ) ⊙ w beside their input before their GEMM:
// through cuBLAS that is a small GEMM and a multiply each, four kernels of a few µs that move
// well under 1 MB. This computes the weighted shrink of several projections that read the same x
// in one kernel, the multiply folded in. It computes in fp32 and rounds where the unfused path
// rounds: the shrink once before the weight multiply, the product once.

#ifndef MOELORA_CORE_KERNELS_WEIGHTED_SHRINK_H_
#define MOELORA_CORE_KERNELS_WEIGHTED_SHRINK_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

// One projection's part: its shrink matrix a [rows, in] and where its [tokens, rows] result goes.
struct ShrinkTarget {
  RowMajor a;
  int64_t rows = 0;
  void* out = nullptr;
  int64_t out_stride = 0;
};

inline constexpr int kMaxShrinkTargets = 2;
// The most tokens, and rows of all targets together, the kernel takes; cuBLAS is faster past
// them: prefill's tokens, and at K = 64 experts of rank 16 (2 × 1024 rows) the kernel made a
// gemma-2b decode step at batch 32 0.3 ms slower than two GEMMs and multiplies.
inline constexpr int64_t kWeightedShrinkMaxTokens = 64;
inline constexpr int64_t kWeightedShrinkMaxRows = 512;

struct WeightedShrinkArgs {
  ElementType type = ElementType::kBFloat16;  // every operand
  int64_t tokens = 0;
  int64_t in = 0;
  RowMajor x;        // [tokens, in]
  RowMajor weights;  // [tokens, ≥ every target's rows]: row j of each target takes column j
  ShrinkTarget targets[kMaxShrinkTargets];
  int count = 0;  // targets used
};

// For each target i < count, t < tokens, j < rows_i:
//   out_i[t][j] = round(round(Σ_k x[t][k]·a_i[j][k]) · weights[t][j]).
// The outputs must not overlap x, the a's, the weights or each other. Launches on `stream`.
cudaError_t LaunchWeightedShrink(const WeightedShrinkArgs& args, cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_WEIGHTED_SHRINK_H_
