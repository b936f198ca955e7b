// The LoRA mixture's weighted shrink for a few tokens (a decode step): torch-free CUDA, built by
// nvcc.
//
// In a decode step gate and up each need s = (x·Aᵀ) ⊙ w beside their input before their GEMM:
// through cuBLAS that is a small GEMM and a multiply each, four kernels of a few µs that move
// well under 1 MB. This computes the weighted shrink of several projections that read the same x
// in one kernel, the multiply folded in: bf16 or fp16 on tensor cores, fp32 accumulators, each of
// a thread-block cluster's 8 blocks summing an eighth of `in` for 16 rows and the cluster adding
// the partial sums through its shared memory. It rounds where the unfused path rounds: the shrink
// once before the weight multiply, the product once.

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
  ElementType type = ElementType::kBFloat16;  // every operand; bf16 or fp16
  int64_t tokens = 0;
  int64_t in = 0;
  RowMajor x;        // [tokens, in]
  RowMajor weights;  // [tokens, ≥ every target's rows]: row j of each target takes column j
  ShrinkTarget targets[kMaxShrinkTargets];
  int count = 0;  // targets used
};

// Whether LaunchWeightedShrink takes `args`: bf16 or fp16; 1 ≤ count ≤ kMaxShrinkTargets;
// 0 ≤ tokens ≤ kWeightedShrinkMaxTokens; in ≥ 0 and a multiple of 8; every used target's
// rows ≥ 0, together ≤ kWeightedShrinkMaxRows; x and every used target's a 16-byte aligned with
// row strides a multiple of 8 (16-byte packs). The weights and outputs need only their elements'
// 2-byte alignment, and any row stride.
bool WeightedShrinkTakes(const WeightedShrinkArgs& args);

// For each target i < count, t < tokens, j < rows_i:
//   out_i[t][j] = round(round(Σ_k x[t][k]·a_i[j][k]) · weights[t][j]),
// the sum in fp32 in a fixed order (deterministic); in = 0 writes round(0 · w). The outputs must
// not overlap x, the a's, the weights or each other. cudaErrorInvalidValue when
// !WeightedShrinkTakes(args); cudaSuccess without a launch when there are no tokens or rows.
// Launches on `stream` (CUDA-graph capturable) and returns the launch error, if any.
cudaError_t LaunchWeightedShrink(const WeightedShrinkArgs& args, cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_WEIGHTED_SHRINK_H_
