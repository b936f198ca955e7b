// Rotary position embedding (RoPE) as transformers applies it, and the step's writes into the KV
// cache that follow it. On CUDA tensors of a CUDA build, where autograd need not record, both are
// one kernel (core/kernels/rope.h); elsewhere ATen ops with the same roundings.

#ifndef MOELORA_CORE_ROPE_H_
#define MOELORA_CORE_ROPE_H_

#include <ATen/core/Tensor.h>

namespace moelora {

// x·cos + rotate_half(x)·sin. x: [tokens, heads, head_dim]; cos, sin: [tokens, head_dim] in x's
// dtype.
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// Rotates the queries and keys of a step's packed tokens, writes each token's rotated key and its
// value into the caches at [slots[t], positions[t]], and returns the rotated queries.
// queries [tokens, heads, head_dim], keys and values [tokens, kv_heads, head_dim] (column blocks
// of one GEMM output are fine); caches [slots, max_seq, kv_heads, head_dim]; slots and positions
// [tokens], int64.
at::Tensor RotateAndCache(const at::Tensor& queries, const at::Tensor& keys,
                          const at::Tensor& values, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& slots, const at::Tensor& positions);

}  // namespace moelora

#endif  // MOELORA_CORE_ROPE_H_
