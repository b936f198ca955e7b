// The attention core of a decode step (one query per sequence) read straight from the KV cache
// by our CUDA kernel (core/kernels/decode_attention.h): no gather of the sequences' keys and
// values, no fp32 copies of them, two kernels per layer instead of about ten.

#ifndef MOELORA_CORE_DECODE_ATTENTION_H_
#define MOELORA_CORE_DECODE_ATTENTION_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace moelora {

// queries: [seqs, heads, head_dim] with RoPE applied; keys, values: one layer's cache [slots,
// max_seq, kv_heads, head_dim], this step's keys written; slots, positions: [seqs] int64 (the
// query's position, so keys 0..position attend, or the last sliding_window of them when it is
// > 0); max_keys: the step's context, above every position. Returns [seqs, heads, head_dim] in
// the queries' dtype; softmax(q·kᵀ·scale)·v with fp32 scores and accumulation.
//
// Undefined where the kernel does not apply: a build without our CUDA kernels, a CPU or fp32
// model, a head_dim other than 64/128/256, more than 8 query heads per KV head, or autograd. The
// caller then runs ATen's path.
at::Tensor DecodeAttentionFromCache(const at::Tensor& queries, const at::Tensor& keys,
                                    const at::Tensor& values, const at::Tensor& slots,
                                    const at::Tensor& positions, int64_t sliding_window,
                                    double scale, int64_t max_keys);

}  // namespace moelora

#endif  // MOELORA_CORE_DECODE_ATTENTION_H_
