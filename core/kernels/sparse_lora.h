// Per-token LoRA for sparse routing (each token weights at most k of the attached experts):
// torch-free CUDA, built by nvcc.
//
// With top-k routing over many experts the dense mixture still reads every attached expert's
// rows each step: K = 64 experts of rank 16 are 2.5 GB a gemma-2b decode step, half the base
// model's weights again. Here a token reads only the rows of the experts it routes to (Punica's
// BGMV, for a decode step's few tokens): one kernel computes every (token, expert) pair's
// x·Aᵀ as fp32 partial sums over splits of `in`, a second adds the splits up, rounds where the
// dense path rounds, and adds Σ_j round(s_j·w_j)·Bᵀ_j to the output.

#ifndef MOELORA_CORE_KERNELS_SPARSE_LORA_H_
#define MOELORA_CORE_KERNELS_SPARSE_LORA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

// A read-only stack of per-slot matrices: element (slot, row, column) at
// data + slot·slot_stride + row·row_stride + column·column_stride (in elements).
struct SlotStack {
  const void* data = nullptr;
  int64_t slot_stride = 0;
  int64_t row_stride = 0;
  int64_t column_stride = 0;
};

// The most tokens, experts per token, rank rows a slot and targets the kernels take.
inline constexpr int64_t kSparseLoraMaxTokens = 64;
inline constexpr int64_t kSparseLoraMaxExpertsPerToken = 8;
inline constexpr int64_t kSparseLoraMaxRank = 64;
inline constexpr int kMaxSparseLoraTargets = 3;

// One projection reading the shared input: its stacks and its output.
struct SparseLoraTarget {
  SlotStack a;  // A: (slot, r < rank, i < in); column_stride 1
  SlotStack
      bt;  // Bᵀ: (slot, r < rank, c < columns); row_stride 1 (a column room) or column_stride 1
  void* out = nullptr;  // [tokens, columns], read and written
  int64_t out_stride = 0;
  int64_t columns = 0;
};

struct SparseLoraArgs {
  ElementType type = ElementType::kBFloat16;  // x, the stacks and the outputs; bf16 or fp16
  int64_t tokens = 0;
  int64_t experts_per_token = 0;  // k
  int64_t rank = 0;               // R rows read of each slot
  int64_t in = 0;
  RowMajor x;                      // [tokens, in]
  const int64_t* slots = nullptr;  // [tokens, k] row-major: each token's experts' slots
  const float* weights = nullptr;  // [tokens, k] row-major: their routing weights
  SparseLoraTarget targets[kMaxSparseLoraTargets];
  int count = 0;               // targets used
  float* workspace = nullptr;  // SparseLoraWorkspaceFloats(args) floats
};

// The fp32 scratch the kernels need between them.
int64_t SparseLoraWorkspaceFloats(const SparseLoraArgs& args);

// Whether LaunchSparseLora takes `args`: bf16 or fp16; 1 ≤ tokens ≤ kSparseLoraMaxTokens;
// 1 ≤ k ≤ kSparseLoraMaxExpertsPerToken; 1 ≤ R ≤ kSparseLoraMaxRank, R a multiple of 8;
// 1 ≤ count ≤ kMaxSparseLoraTargets; in and every target's columns multiples of 8; x, every A and
// every Bᵀ in 16-byte packs (aligned pointers, strides multiples of 8); every Bᵀ with unit column
// stride, or every Bᵀ with unit row stride.
bool SparseLoraTakes(const SparseLoraArgs& args);

// For every target, t < tokens, c < columns:
//   out[t][c] = round(out[t][c] + Σ_j Σ_r round(round(x_t·A_{slot(t,j)}[r]) · round(w[t][j]))
//                                            · Bᵀ_{slot(t,j)}[r][c])
// (round: to the element type; sums in fp32). A pair whose weight is 0 reads nothing. Outputs
// must not overlap each other or the inputs. Two kernels on `stream`, the second launched
// programmatically dependent on the first (its start overlaps the first; CUDA-graph capturable);
// returns the launch error, if any; cudaErrorInvalidValue when !SparseLoraTakes(args) or
// without a workspace.
cudaError_t LaunchSparseLora(const SparseLoraArgs& args, cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_SPARSE_LORA_H_
