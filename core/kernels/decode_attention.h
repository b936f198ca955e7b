// Attention for decode steps (one query per sequence) straight from the KV cache: torch-free CUDA,
// built by nvcc.
//
// The ATen path gathers every sequence's keys and values out of the cache, copies them to fp32
// and runs about ten kernels per layer; at batch 32 that was about half of the base decode step.
// This reads the bf16/fp16 cache rows of each sequence's slot in place, with fp32 scores, softmax
// and accumulation (flash-decoding: the keys are split over blocks, then one small kernel merges
// the splits).

#ifndef MOELORA_CORE_KERNELS_DECODE_ATTENTION_H_
#define MOELORA_CORE_KERNELS_DECODE_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

struct DecodeAttentionArgs {
  ElementType type = ElementType::kBFloat16;  // bf16 or fp16 (not fp32)
  int64_t seqs = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;  // heads / kv_heads query heads share a KV head (head = kv * groups + g)
  int64_t head_dim = 0;  // 64, 128 or 256
  const void* queries = nullptr;  // [seqs, heads, head_dim], contiguous, RoPE applied
  // The cache, [slots, max_seq, kv_heads, head_dim], contiguous; this step's keys already written.
  const void* keys = nullptr;
  const void* values = nullptr;
  int64_t max_seq = 0;
  const int64_t* slots = nullptr;      // [seqs]: each sequence's cache slot
  const int64_t* positions = nullptr;  // [seqs]: the query's position; keys 0..position attend
  int64_t sliding_window = 0;          // > 0: only keys with position - key < sliding_window
  float scale = 1.0f;                  // applied to q·k
  int64_t max_keys = 0;  // an upper bound on position + 1 (the step's context); sizes the splits
  void* out = nullptr;   // [seqs, heads, head_dim], contiguous, the queries' dtype
  int splits = 1;        // from DecodeAttentionSplits
  float* workspace = nullptr;  // DecodeAttentionWorkspaceFloats(...) floats when splits > 1
};

// Whether the kernels handle this element type, head_dim and grouping.
bool DecodeAttentionSupports(ElementType type, int64_t head_dim, int64_t heads, int64_t kv_heads);
// How many blocks share one sequence's keys: enough blocks for `multiprocessors` SMs, at least
// 32 keys each.
int DecodeAttentionSplits(int64_t seqs, int64_t kv_heads, int64_t max_keys, int multiprocessors);
size_t DecodeAttentionWorkspaceFloats(int64_t seqs, int64_t heads, int64_t head_dim, int splits);

// Launches on `stream` (CUDA-graph capturable): every value read on the device.
cudaError_t LaunchDecodeAttention(const DecodeAttentionArgs& args, cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_DECODE_ATTENTION_H_
