// Rotary position embedding of a step's queries and keys, with the keys and values written into
// the KV cache, in one kernel: torch-free CUDA, built by nvcc.
//
// As ATen ops this is ~5 kernels per tensor (two multiplies, a negation, a concatenation and an
// add) plus one index_put_ each for the keys and the values: 12 launches per layer, about a third
// of a small-batch decode step's kernels; and 7 a step for the angles' cos and sin, which each
// thread computes here for its own pair.

#ifndef MOELORA_CORE_KERNELS_ROPE_H_
#define MOELORA_CORE_KERNELS_ROPE_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

struct RopeArgs {
  ElementType type = ElementType::kBFloat16;  // every tensor's
  int64_t tokens = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;
  int64_t head_dim = 0;  // even
  // [tokens, heads or kv_heads, head_dim], each token's heads contiguous, tokens `*_stride`
  // elements apart (column blocks of one q/k/v GEMM output).
  const void* queries = nullptr;
  int64_t queries_stride = 0;
  const void* keys = nullptr;
  int64_t keys_stride = 0;
  const void* values = nullptr;
  int64_t values_stride = 0;
  // [head_dim / 2], fp32: pair i of token t turns by positions[t]·inv_freq[i].
  const float* inv_freq = nullptr;
  void* rotated_queries = nullptr;  // [tokens, heads, head_dim], contiguous
  // [slots, max_seq, kv_heads, head_dim], contiguous: token t's rotated key and its value go to
  // [slots[t], positions[t]].
  void* key_cache = nullptr;
  void* value_cache = nullptr;
  int64_t max_seq = 0;
  const int64_t* slots = nullptr;
  const int64_t* positions = nullptr;
};

// x·cos + rotate_half(x)·sin for the queries and keys, cos and sin those of the angle
// positions[t]·inv_freq[i] in fp32 rounded to the element type, rounding after each multiply and
// after the add as ATen does (so results equal transformers' bit for bit). Launches on `stream`.
cudaError_t LaunchRopeAndCacheWrite(const RopeArgs& args, cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_ROPE_H_
