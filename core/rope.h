// Rotary position embedding (RoPE) as transformers applies it, and the step's writes into the KV
// cache that follow it. On CUDA tensors of a CUDA build, where autograd need not record, both are
// one kernel (core/kernels/rope.h); elsewhere ATen ops with the same roundings.

#ifndef MOELORA_CORE_ROPE_H_
#define MOELORA_CORE_ROPE_H_

#include <ATen/core/Tensor.h>

#include <utility>

namespace moelora {

// x·cos + rotate_half(x)·sin. x: [tokens, heads, head_dim]; cos, sin: [tokens, head_dim] in x's
// dtype.
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// The rotation's cos and sin for each token: angles position·inv_freq in fp32 (the same for both
// halves of head_dim), their cos and sin rounded to `dtype`, as transformers computes them.
// positions [tokens] int64, inv_freq [head_dim / 2] fp32 -> {cos, sin}, each [tokens, head_dim].
std::pair<at::Tensor, at::Tensor> RopeCosSin(const at::Tensor& positions,
                                             const at::Tensor& inv_freq, at::ScalarType dtype);

// Rotates the queries and keys of a step's packed tokens by RopeCosSin(positions, inv_freq,
// their dtype) (the kernel computes those itself: no per-step kernels for the angles), writes
// each token's rotated key and its value into the caches at [slots[t], positions[t]], and returns
// the rotated queries. queries [tokens, heads, head_dim], keys and values [tokens, kv_heads,
// head_dim] (column blocks of one GEMM output are fine); caches [slots, max_seq, kv_heads,
// head_dim]; slots and positions [tokens], int64.
at::Tensor RotateAndCache(const at::Tensor& queries, const at::Tensor& keys,
                          const at::Tensor& values, const at::Tensor& inv_freq,
                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& slots, const at::Tensor& positions);

}  // namespace moelora

#endif  // MOELORA_CORE_ROPE_H_
