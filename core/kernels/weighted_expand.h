// The LoRA mixture's weighted expand for a few tokens (a decode step): torch-free CUDA, built by
// nvcc.
//
// After a projection's GEMM has written its output and the shrink s = x·Aᵀ beside it, the
// mixture adds (s ⊙ w)·Bᵀ to the output, w being the routing weights over rank rows. Through
// cuBLAS that is a multiply and a small GEMM, two kernels of ~3 and ~4.4 µs that move well under
// 1 MB, three times a layer (q/k/v together, o, down). This is one kernel, the multiply folded
// into its staging of s. It reads only the non-zero blocks of q/k/v's block-diagonal Bᵀ.
// Tensor cores compute in fp32; it rounds where the unfused path rounds: the product s ⊙ w once,
// the output once.

#ifndef MOELORA_CORE_KERNELS_WEIGHTED_EXPAND_H_
#define MOELORA_CORE_KERNELS_WEIGHTED_EXPAND_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

// One range of output columns, its operands, and the rows of Bᵀ (= the columns of s and w) that
// it reads: row blocks b < blocks of block_rows consecutive rows, block b starting at row
// first_row + b·block_stride. A plain projection reads every row (one block); member m of a
// q/k/v group of M members with n experts of rank R reads first_row m·R, n blocks of R rows,
// block_stride M·R (the group's rows are ordered [expert][member][rank]). Segments may share
// operands (a group's members) or not (gate and up, each with its own output and Bᵀ).
struct ExpandSegment {
  RowMajor shrink;      // s: [tokens, ≥ rows read]
  RowMajor weights;     // w: [tokens, ≥ rows read], column j weighting s's column j
  RowMajor bt;          // Bᵀ: [≥ rows read, ≥ columns written]
  void* out = nullptr;  // [tokens, ≥ columns written], read and written
  int64_t out_stride = 0;
  int64_t first_column = 0;
  int64_t columns = 0;
  int64_t first_row = 0;
  int64_t blocks = 1;
  int64_t block_rows = 0;
  int64_t block_stride = 0;
  int64_t rows() const { return blocks * block_rows; }
};

inline constexpr int kMaxExpandSegments = 4;
// The most tokens, and rows a segment reads, the kernel takes; past them (prefill, many experts)
// the multiply and a cuBLAS GEMM are as fast.
inline constexpr int64_t kWeightedExpandMaxTokens = 64;
inline constexpr int64_t kWeightedExpandMaxRows = 512;

struct WeightedExpandArgs {
  ElementType type = ElementType::kBFloat16;  // every operand; bf16 or fp16
  int64_t tokens = 0;
  ExpandSegment segments[kMaxExpandSegments];
  int count = 0;  // segments used
};

// Whether LaunchWeightedExpand takes `args`: bf16 or fp16; 1 ≤ count ≤ kMaxExpandSegments;
// tokens ≤ kWeightedExpandMaxTokens; every segment's rows() ≤ kWeightedExpandMaxRows; every
// pointer 16-byte aligned; every row stride, first_column, columns, first_row, block_rows and
// block_stride a multiple of 8 (16-byte packs).
bool WeightedExpandTakes(const WeightedExpandArgs& args);

// For each segment, t < tokens, c in [first_column, first_column + columns):
//   out[t][c] = round(out[t][c] + Σ_{j read} round(s[t][j]·w[t][j]) · Bᵀ[j][c]).
// Segments must not share output elements; no output may overlap any s, w or Bᵀ (it may be
// another column block of s's buffer). cudaErrorInvalidValue when !WeightedExpandTakes(args).
// Launches on `stream` (CUDA-graph capturable) and returns the launch error, if any.
cudaError_t LaunchWeightedExpand(const WeightedExpandArgs& args, cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_WEIGHTED_EXPAND_H_
