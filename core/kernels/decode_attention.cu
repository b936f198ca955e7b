#include <algorithm>
#include <cmath>

#include "core/kernels/decode_attention.h"
#include "core/kernels/element.cuh"

namespace moelora::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxGroups = 8;  // query heads per KV head
constexpr int kMinKeysPerSplit = 32;
constexpr float kLog2E = 1.4426950408889634f;

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One block per (sequence, KV head, split of the keys). Each warp takes every kWarps-th key of
// the split; each lane holds kDim / 32 dimensions of the group's queries and of its running
// output, with an online softmax per query head (scores in the log2 domain). The warps then
// merge through shared memory, and the block writes the normalised output (one split) or its
// unnormalised partial with its max and sum for MergeSplits.
template <typename T, int kDim>
__global__ void __launch_bounds__(kThreads)
    DecodeAttentionKernel(DecodeAttentionArgs args, int keys_per_split) {
  constexpr int kVec = kDim / 32;
  using P = Pack<T, kVec>;
  const int seq = blockIdx.x, kv = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups = static_cast<int>(args.heads / args.kv_heads);

  const int64_t position = args.positions[seq];
  int64_t begin = static_cast<int64_t>(split) * keys_per_split;
  if (args.sliding_window > 0) begin = max(begin, position - args.sliding_window + 1);
  const int64_t end = min(position + 1, static_cast<int64_t>(split + 1) * keys_per_split);

  float query[kMaxGroups][kVec];
  const T* queries = static_cast<const T*>(args.queries) +
                     (seq * args.heads + static_cast<int64_t>(kv) * groups) * kDim + lane * kVec;
  const float query_scale = args.scale * kLog2E;
#pragma unroll
  for (int g = 0; g < kMaxGroups; ++g) {
    if (g < groups) {
      const P packed = *reinterpret_cast<const P*>(queries + g * kDim);
#pragma unroll
      for (int i = 0; i < kVec; ++i) query[g][i] = ToFloat(packed.values[i]) * query_scale;
    }
  }

  float running_max[kMaxGroups], running_sum[kMaxGroups], acc[kMaxGroups][kVec];
#pragma unroll
  for (int g = 0; g < kMaxGroups; ++g) {
    running_max[g] = -INFINITY;
    running_sum[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[g][i] = 0.f;
  }

  const int64_t row_stride = args.kv_heads * kDim;  // one cache position
  const int64_t offset =
      args.slots[seq] * args.max_seq * row_stride + static_cast<int64_t>(kv) * kDim + lane * kVec;
  const T* keys = static_cast<const T*>(args.keys) + offset;
  const T* values = static_cast<const T*>(args.values) + offset;
  for (int64_t key = begin + warp; key < end; key += kWarps) {
    const P key_packed = *reinterpret_cast<const P*>(keys + key * row_stride);
    const P value_packed = *reinterpret_cast<const P*>(values + key * row_stride);
    float key_row[kVec], value_row[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      key_row[i] = ToFloat(key_packed.values[i]);
      value_row[i] = ToFloat(value_packed.values[i]);
    }
#pragma unroll
    for (int g = 0; g < kMaxGroups; ++g) {
      if (g < groups) {
        float score = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) score += query[g][i] * key_row[i];
        score = WarpSum(score);
        const float new_max = fmaxf(running_max[g], score);
        const float rescale = exp2f(running_max[g] - new_max);  // 0 on the first key
        const float weight = exp2f(score - new_max);
        running_sum[g] = running_sum[g] * rescale + weight;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[g][i] = acc[g][i] * rescale + weight * value_row[i];
        running_max[g] = new_max;
      }
    }
  }

  __shared__ float warp_max[kWarps][kMaxGroups];
  __shared__ float warp_sum[kWarps][kMaxGroups];
  __shared__ float warp_acc[kWarps][kMaxGroups][kDim];
#pragma unroll
  for (int g = 0; g < kMaxGroups; ++g) {
    if (g < groups) {
      if (lane == 0) {
        warp_max[warp][g] = running_max[g];
        warp_sum[warp][g] = running_sum[g];
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) warp_acc[warp][g][lane * kVec + i] = acc[g][i];
    }
  }
  __syncthreads();

  const int64_t head0 = seq * args.heads + static_cast<int64_t>(kv) * groups;
  for (int index = threadIdx.x; index < groups * kDim; index += kThreads) {
    const int g = index / kDim, d = index % kDim;
    float block_max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w][g]);
    float block_sum = 0.f, block_acc = 0.f;
    if (block_max != -INFINITY) {  // a split past the sequence's keys has none
      for (int w = 0; w < kWarps; ++w) {
        const float rescale = exp2f(warp_max[w][g] - block_max);
        block_sum += warp_sum[w][g] * rescale;
        block_acc += warp_acc[w][g][d] * rescale;
      }
    }
    if (args.splits == 1) {
      static_cast<T*>(args.out)[(head0 + g) * kDim + d] = FromFloat<T>(block_acc / block_sum);
    } else {
      // Partials: [seqs * heads, splits] maxima and sums, then [seqs * heads, splits, kDim].
      const int64_t partial = (head0 + g) * args.splits + split;
      const int64_t partials = args.seqs * args.heads * args.splits;
      if (d == 0) {
        args.workspace[partial] = block_max;
        args.workspace[partials + partial] = block_sum;
      }
      args.workspace[2 * partials + partial * kDim + d] = block_acc;
    }
  }
}

// One block per (sequence, head), one thread per dimension: the softmax-weighted merge of the
// splits' partials.
template <typename T>
__global__ void MergeSplitsKernel(DecodeAttentionArgs args) {
  const int64_t head = static_cast<int64_t>(blockIdx.x);  // seq * heads + h
  const int d = threadIdx.x;
  const int64_t partials = args.seqs * args.heads * args.splits;
  const float* maxima = args.workspace + head * args.splits;
  const float* sums = args.workspace + partials + head * args.splits;
  const float* accs = args.workspace + 2 * partials + head * args.splits * args.head_dim + d;
  float global_max = -INFINITY;
  for (int s = 0; s < args.splits; ++s) global_max = fmaxf(global_max, maxima[s]);
  float sum = 0.f, acc = 0.f;
  for (int s = 0; s < args.splits; ++s) {
    const float rescale = exp2f(maxima[s] - global_max);  // 0 for a split without keys
    sum += sums[s] * rescale;
    acc += accs[s * args.head_dim] * rescale;
  }
  static_cast<T*>(args.out)[head * args.head_dim + d] = FromFloat<T>(acc / sum);
}

int KeysPerSplit(const DecodeAttentionArgs& args) {
  return static_cast<int>((args.max_keys + args.splits - 1) / args.splits);
}

template <typename T, int kDim>
cudaError_t Launch(const DecodeAttentionArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.seqs), static_cast<unsigned>(args.kv_heads),
                  static_cast<unsigned>(args.splits));
  DecodeAttentionKernel<T, kDim><<<grid, kThreads, 0, stream>>>(args, KeysPerSplit(args));
  if (args.splits > 1) {
    MergeSplitsKernel<T><<<static_cast<unsigned>(args.seqs * args.heads), kDim, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t LaunchForDim(const DecodeAttentionArgs& args, cudaStream_t stream) {
  switch (args.head_dim) {
    case 64:
      return Launch<T, 64>(args, stream);
    case 128:
      return Launch<T, 128>(args, stream);
    case 256:
      return Launch<T, 256>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

bool DecodeAttentionSupports(ElementType type, int64_t head_dim, int64_t heads, int64_t kv_heads) {
  return type != ElementType::kFloat && (head_dim == 64 || head_dim == 128 || head_dim == 256) &&
         kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= kMaxGroups;
}

int DecodeAttentionSplits(int64_t seqs, int64_t kv_heads, int64_t max_keys, int multiprocessors) {
  const int64_t blocks = std::max<int64_t>(seqs * kv_heads, 1);
  const int64_t wanted = (2 * static_cast<int64_t>(multiprocessors) + blocks - 1) / blocks;
  const int64_t most = std::max<int64_t>((max_keys + kMinKeysPerSplit - 1) / kMinKeysPerSplit, 1);
  return static_cast<int>(std::clamp<int64_t>(wanted, 1, most));
}

size_t DecodeAttentionWorkspaceFloats(int64_t seqs, int64_t heads, int64_t head_dim, int splits) {
  return splits > 1 ? static_cast<size_t>(seqs * heads * splits * (head_dim + 2)) : 0;
}

cudaError_t LaunchDecodeAttention(const DecodeAttentionArgs& args, cudaStream_t stream) {
  if (!DecodeAttentionSupports(args.type, args.head_dim, args.heads, args.kv_heads) ||
      args.splits < 1 || args.max_keys < 1 || (args.splits > 1 && args.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (args.seqs == 0) return cudaSuccess;
  return args.type == ElementType::kBFloat16 ? LaunchForDim<__nv_bfloat16>(args, stream)
                                             : LaunchForDim<__half>(args, stream);
}

}  // namespace moelora::kernels
