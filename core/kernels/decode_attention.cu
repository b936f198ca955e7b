#include <algorithm>
#include <cmath>

#include "core/kernels/decode_attention.h"
#include "core/kernels/element.cuh"

namespace moelora::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxGroups = 8;         // query heads per KV head
constexpr int kTileKeys = kWarpSize;  // keys a warp scores at once, one per lane
constexpr int kMinKeysPerSplit = kTileKeys;
constexpr int kChunk = 8;  // elements of a key row per 16-byte load
constexpr float kLog2E = 1.4426950408889634f;

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// One block per (sequence, KV head, split of the keys). A split is an even share of the
// sequence's own keys (read on the device, so a graph captured for a context bucket still gives
// every block work), in whole tiles of 32 keys. The block's warps share each tile:
//   scores: lane l takes key l of the tile; warp w its dot products over a quarter of the
//           dimensions with every query head of the group (the queries in shared memory, read as
//           broadcasts), and the quarters add up through shared memory: no warp sum per score;
//   softmax: every warp makes the same online update per head for the tile (a warp max);
//   values: warp w accumulates keys 8w..8w+7 of the tile, each lane kDim / 32 dimensions of
//           every head's output.
// Earlier versions gave the lanes dimensions in the scores and paid a 5-step warp sum per
// (head, key): instruction-bound, 57 µs a layer at batch 32. The warps then merge through shared
// memory (their maxima are equal), and the block writes the normalised output (one split) or its
// unnormalised partial with its max and sum for MergeSplits. kGroups is the number of query heads
// per KV head, or kMaxGroups with `groups` below it for an uncommon grouping.
template <typename T, int kDim, int kGroups>
__global__ void __launch_bounds__(kThreads) DecodeAttentionKernel(DecodeAttentionArgs args) {
  constexpr int kVec = kDim / kWarpSize;            // output dimensions per lane
  constexpr int kSliceDims = kDim / kWarps;         // score dimensions per warp
  constexpr int kKeysPerWarp = kTileKeys / kWarps;  // value rows per warp and tile
  static_assert(kSliceDims % kChunk == 0, "a warp's slice is whole 16-byte chunks");
  using P = Pack<T, kVec>;
  using Chunk = Pack<T, kChunk>;
  const int seq = blockIdx.x, kv = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int groups = static_cast<int>(args.heads / args.kv_heads);
  auto has_group = [&](int g) { return g < kGroups && (kGroups != kMaxGroups || g < groups); };

  __shared__ __align__(16) float query_s[kGroups][kDim];  // scaled into the log2 domain
  __shared__ float partial_s[kWarps][kGroups][kTileKeys];
  __shared__ __align__(16) float probs_s[kTileKeys][kGroups];
  const int64_t head0 = seq * args.heads + static_cast<int64_t>(kv) * groups;
  {
    const T* queries = static_cast<const T*>(args.queries) + head0 * kDim;
    const float query_scale = args.scale * kLog2E;
    for (int index = threadIdx.x; index < kGroups * kDim; index += kThreads) {
      const int g = index / kDim;
      query_s[g][index % kDim] = has_group(g) ? ToFloat(queries[index]) * query_scale : 0.f;
    }
  }

  const int64_t position = args.positions[seq];
  const int64_t first =
      args.sliding_window > 0 ? max(int64_t{0}, position - args.sliding_window + 1) : 0;
  // Whole tiles where the keys allow (a part-filled tile costs a whole tile's scores).
  const int64_t even_share = (position + 1 - first + args.splits - 1) / args.splits;
  const int64_t per_split = (even_share + kTileKeys - 1) / kTileKeys * kTileKeys;
  const int64_t begin = first + split * per_split;
  const int keys_in_split =
      static_cast<int>(max(int64_t{0}, min(position + 1, begin + per_split) - begin));

  const int64_t row_stride = args.kv_heads * kDim;  // one cache position
  const int64_t base =
      (args.slots[seq] * args.max_seq + begin) * row_stride + static_cast<int64_t>(kv) * kDim;
  const T* keys = static_cast<const T*>(args.keys) + base + warp * kSliceDims;
  const T* values = static_cast<const T*>(args.values) + base + lane * kVec;

  float running_max[kGroups], lane_sum[kGroups], acc[kGroups][kVec];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    running_max[g] = -INFINITY;
    lane_sum[g] = 0.f;
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[g][i] = 0.f;
  }
  __syncthreads();  // the queries

  for (int tile = 0; tile < keys_in_split; tile += kTileKeys) {
    const bool valid = tile + lane < keys_in_split;
    {
      float partial[kGroups];
#pragma unroll
      for (int g = 0; g < kGroups; ++g) partial[g] = 0.f;
      if (valid) {
        const T* key_row = keys + static_cast<int64_t>(tile + lane) * row_stride;
#pragma unroll
        for (int c = 0; c < kSliceDims; c += kChunk) {
          const Chunk packed = *reinterpret_cast<const Chunk*>(key_row + c);
          float k[kChunk];
#pragma unroll
          for (int i = 0; i < kChunk; ++i) k[i] = ToFloat(packed.values[i]);
          const int d = warp * kSliceDims + c;
#pragma unroll
          for (int g = 0; g < kGroups; ++g) {
            if (!has_group(g)) continue;
            const float4 q0 = *reinterpret_cast<const float4*>(&query_s[g][d]);
            const float4 q1 = *reinterpret_cast<const float4*>(&query_s[g][d + 4]);
            partial[g] += q0.x * k[0] + q0.y * k[1] + q0.z * k[2] + q0.w * k[3] + q1.x * k[4] +
                          q1.y * k[5] + q1.z * k[6] + q1.w * k[7];
          }
        }
      }
#pragma unroll
      for (int g = 0; g < kGroups; ++g) partial_s[warp][g][lane] = partial[g];
    }
    // This warp's value rows of the tile, loaded before the barrier so that their latency
    // overlaps the wait and the softmax (rows past the split are zeros, their probabilities 0).
    P value_rows[kKeysPerWarp];
#pragma unroll
    for (int r = 0; r < kKeysPerWarp; ++r) {
      const int j = warp * kKeysPerWarp + r;
      if (tile + j < keys_in_split) {
        value_rows[r] =
            *reinterpret_cast<const P*>(values + static_cast<int64_t>(tile + j) * row_stride);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) value_rows[r].values[i] = FromFloat<T>(0.f);
      }
    }
    __syncthreads();

    // Every warp makes the same update (its first key is always valid); each keeps the sum and
    // the probabilities of its own value rows.
    const bool own_key = lane / kKeysPerWarp == warp;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      if (!has_group(g)) continue;
      float score = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) score += partial_s[w][g][lane];
      const float new_max = fmaxf(running_max[g], WarpMax(valid ? score : -INFINITY));
      const float rescale = exp2f(running_max[g] - new_max);  // 0 on the first tile
      const float prob = valid ? exp2f(score - new_max) : 0.f;
      lane_sum[g] = lane_sum[g] * rescale + (own_key ? prob : 0.f);
      running_max[g] = new_max;
      if (own_key) probs_s[lane][g] = prob;
#pragma unroll
      for (int i = 0; i < kVec; ++i) acc[g][i] *= rescale;
    }
    __syncwarp();
#pragma unroll
    for (int r = 0; r < kKeysPerWarp; ++r) {
      const int j = warp * kKeysPerWarp + r;
      float v[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) v[i] = ToFloat(value_rows[r].values[i]);
      float probs[kGroups];
      if constexpr (kGroups % 4 == 0) {
#pragma unroll
        for (int g = 0; g < kGroups; g += 4) {
          const float4 p4 = *reinterpret_cast<const float4*>(&probs_s[j][g]);
          probs[g] = p4.x;
          probs[g + 1] = p4.y;
          probs[g + 2] = p4.z;
          probs[g + 3] = p4.w;
        }
      } else {
#pragma unroll
        for (int g = 0; g < kGroups; ++g) probs[g] = probs_s[j][g];
      }
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        if (!has_group(g)) continue;
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[g][i] += probs[g] * v[i];
      }
    }
    __syncthreads();  // partial_s and probs_s are rewritten by the next tile
  }

  __shared__ float warp_max[kWarps][kGroups];
  __shared__ float warp_sum[kWarps][kGroups];
  __shared__ float warp_acc[kWarps][kGroups][kDim];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    if (has_group(g)) {
      const float sum = WarpSum(lane_sum[g]);
      if (lane == 0) {
        warp_max[warp][g] = running_max[g];
        warp_sum[warp][g] = sum;
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) warp_acc[warp][g][lane * kVec + i] = acc[g][i];
    }
  }
  __syncthreads();

  const int block_groups = kGroups == kMaxGroups ? groups : kGroups;
  for (int index = threadIdx.x; index < block_groups * kDim; index += kThreads) {
    const int g = index / kDim, d = index % kDim;
    float block_max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w][g]);
    float block_sum = 0.f, block_acc = 0.f;
    if (block_max != -INFINITY) {  // a split past the sequence's keys has none
      for (int w = 0; w < kWarps; ++w) {
        const float rescale = exp2f(warp_max[w][g] - block_max);  // 1: the warps share one max
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
#pragma unroll 4
  for (int s = 0; s < args.splits; ++s) global_max = fmaxf(global_max, maxima[s]);
  float sum = 0.f, acc = 0.f;
#pragma unroll 4
  for (int s = 0; s < args.splits; ++s) {
    const float rescale = exp2f(maxima[s] - global_max);  // 0 for a split without keys
    sum += sums[s] * rescale;
    acc += accs[s * args.head_dim] * rescale;
  }
  static_cast<T*>(args.out)[head * args.head_dim + d] = FromFloat<T>(acc / sum);
}

template <typename T, int kDim, int kGroups>
void LaunchKernels(const DecodeAttentionArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.seqs), static_cast<unsigned>(args.kv_heads),
                  static_cast<unsigned>(args.splits));
  DecodeAttentionKernel<T, kDim, kGroups><<<grid, kThreads, 0, stream>>>(args);
  if (args.splits > 1) {
    MergeSplitsKernel<T><<<static_cast<unsigned>(args.seqs * args.heads), kDim, 0, stream>>>(args);
  }
}

// The grouping as a template argument, so each head's scores and updates unroll without checks.
template <typename T, int kDim>
void LaunchForGroups(const DecodeAttentionArgs& args, cudaStream_t stream) {
  switch (args.heads / args.kv_heads) {
    case 1:
      return LaunchKernels<T, kDim, 1>(args, stream);
    case 2:
      return LaunchKernels<T, kDim, 2>(args, stream);
    case 4:
      return LaunchKernels<T, kDim, 4>(args, stream);
    default:  // 8, or up to 8 with the heads past `groups` skipped
      return LaunchKernels<T, kDim, kMaxGroups>(args, stream);
  }
}

template <typename T>
cudaError_t LaunchForDim(const DecodeAttentionArgs& args, cudaStream_t stream) {
  switch (args.head_dim) {
    case 64:
      LaunchForGroups<T, 64>(args, stream);
      break;
    case 128:
      LaunchForGroups<T, 128>(args, stream);
      break;
    case 256:
      LaunchForGroups<T, 256>(args, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
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
