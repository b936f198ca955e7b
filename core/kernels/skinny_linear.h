// y = x·Wᵀ (+ bias) for a decode step's few rows: torch-free CUDA, built by nvcc.
//
// At a few tokens a projection reads its whole weight matrix to compute a few numbers a row: it
// is bound by how fast W streams from memory, and a decode step is ~90 of them back to back
// (gemma-2b: 5 a layer and the LM head). cuBLAS's kernels start reading W only once the kernel
// before has ended and they have been launched. This kernel is launched programmatically
// dependent (dependent_launch.cuh): its blocks load their first packs of W while the kernel
// before finishes, and x only after it has. Each block takes a few rows of W, its warps splitting
// `in`; fp32 sums, the bias added, rounded once, as cuBLAS rounds.

#ifndef MOELORA_CORE_KERNELS_SKINNY_LINEAR_H_
#define MOELORA_CORE_KERNELS_SKINNY_LINEAR_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

// The most rows of x the kernel takes. On an H100 (gemma-2b, bf16) it took 0.35-0.4 ms off the
// base and fused decode steps at batch 1 and 2; at 4 rows (four packs of x and 32 sums a lane) it
// lost to cuBLAS by 0.25 ms, and a tensor-core GEMM of ours for 3 to 64 rows did not beat cuBLAS
// either (docs/BENCHMARKS.md).
inline constexpr int64_t kSkinnyLinearMaxTokens = 2;

struct SkinnyLinearArgs {
  ElementType type = ElementType::kBFloat16;
  int64_t tokens = 0;          // rows of x and out
  int64_t in = 0;              // columns of x and W
  int64_t out_features = 0;    // rows of W, columns of out
  RowMajor x;                  // [tokens, in]
  RowMajor weight;             // [out_features, in]
  const void* bias = nullptr;  // [out_features], or none
  void* out = nullptr;         // [tokens, out_features]
  int64_t out_stride = 0;
};

// Whether the kernel takes these arguments: bf16 or fp16, 1 to kSkinnyLinearMaxTokens rows, `in`
// and both strides whole 16-byte packs from 16-byte aligned pointers, and sizes the 32-bit index
// math holds.
bool SkinnyLinearTakes(const SkinnyLinearArgs& args);

// Runs on `stream`; cudaErrorInvalidValue where SkinnyLinearTakes is false.
cudaError_t LaunchSkinnyLinear(const SkinnyLinearArgs& args, cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_SKINNY_LINEAR_H_
