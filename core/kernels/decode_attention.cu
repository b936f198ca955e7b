#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/kernels/decode_attention.h"
#include "core/kernels/dependent_launch.cuh"
#include "core/kernels/element.cuh"
#include "core/kernels/ptx.cuh"

namespace moelora::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxGroups = 8;  // query heads per KV head: the 8 columns of an mma
constexpr int kTileKeys = 32;  // keys of a split its warps take per step, 8 each
constexpr int kWarpKeys = kTileKeys / kWarps;
constexpr int kMinKeysPerSplit = kTileKeys;
constexpr int kStages = 2;  // tiles of a warp's keys and values in flight
constexpr int kRowPad = 8;  // elements: staged rows 16 bytes apart mod 128, for ldmatrix
constexpr int kAccPad = 4;  // floats: the merge's head rows 4 banks apart
constexpr float kLog2E = 1.4426950408889634f;

// Shared memory of one warp: kStages x {keys, values} x kWarpKeys rows of kDim + kRowPad
// elements. The merge reuses it for the warp's accumulators.
__host__ __device__ constexpr int WarpStagedElements(int dim) {
  return kStages * 2 * kWarpKeys * (dim + kRowPad);
}
template <typename T>
constexpr size_t SharedBytes(int dim) {
  return sizeof(T) * kWarps * WarpStagedElements(dim);
}

// d += A·B, m16n8k16, A's rows 8-15 zero (only a0 and a2 given).
template <typename T>
__device__ __forceinline__ void MmaK16(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0,
                                       uint32_t b1);
template <>
__device__ __forceinline__ void MmaK16<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a2,
                                                      uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void MmaK16<__half>(float (&d)[4], uint32_t a0, uint32_t a2, uint32_t b0,
                                               uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
}

// d += A·B, m16n8k8.
template <typename T>
__device__ __forceinline__ void MmaK8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0);
template <>
__device__ __forceinline__ void MmaK8<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                     uint32_t b0) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
}
template <>
__device__ __forceinline__ void MmaK8<__half>(float (&d)[4], uint32_t a0, uint32_t a1,
                                              uint32_t b0) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

// lo and hi rounded to T and packed (lo in the low half), their rounded values added to sum.
__device__ __forceinline__ uint32_t RoundPair(float lo, float hi, float& sum, __nv_bfloat16) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  sum += __low2float(pair) + __high2float(pair);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}
__device__ __forceinline__ uint32_t RoundPair(float lo, float hi, float& sum, __half) {
  const __half2 pair = __floats2half2_rn(lo, hi);
  sum += __low2float(pair) + __high2float(pair);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// One block per (sequence, KV head, split of the keys). A split is an even share of the
// sequence's own keys (read on the device, so a graph captured for a context bucket still gives
// every block work), in whole tiles of 32 keys; warp w takes keys 8w..8w+7 of each tile, all
// dimensions, all query heads of the group, on tensor cores (lane = 4g + q below):
//   staging: the warp copies its own key and value rows with cp.async into its own shared memory,
//            kStages tiles ahead, so a tile's loads are in flight before the previous one is
//            used and no registers hold them; it reads only what it copied (__syncwarp, no
//            __syncthreads in the loop);
//   scores:  S = Q·Kᵀ with m16n8k16: A = the queries (rows = heads, zero past the group),
//            staged once per block; B = the 8 key rows; both read with ldmatrix, 32 dimensions
//            per x4 (in registers the queries took 32 of them at head_dim 256 and the kernel
//            spilled). D gives lane 4g + q the scores of head g with keys 2q and 2q + 1, in fp32,
//            scaled into the log2 domain after the mma (the queries stay exact);
//   softmax: online, per head and warp: a max over a quad (two shuffles), the probabilities
//            rounded to T (their sum taken from the rounded values, so the output is an exact
//            weighted mean of the values);
//   values:  Oᵀ += Vᵀ·Pᵀ with m16n8k8: A = 16 dimensions x the warp's 8 keys (ldmatrix .trans
//            of the staged value rows), B = the probabilities: the score fragment as it stands.
//            With the dimensions as the mma's rows no accumulator is wasted on missing heads'
//            rows: lane 4g + q accumulates heads 2q, 2q + 1 at dimensions g, g + 8 of each 16.
// Splitting the tile's keys over the warps rather than the dimensions means no warp repeats
// another's scores and no probabilities cross warps; the price is kDim / 4 accumulators per lane
// and one merge per block. An earlier version did all of this on the FP32 units: issue-bound at
// 25.8 µs a layer (gemma-2b, batch 32). The warps merge through shared memory (their maxima
// differ), and the block writes the normalised output (one split) or its unnormalised partial
// with its max and sum for MergeSplits. kGroups is the number of query heads per KV head, or
// kMaxGroups with `groups` below it for an uncommon grouping.
template <typename T, int kDim, int kGroups>
__global__ void __launch_bounds__(kThreads, 3) DecodeAttentionKernel(DecodeAttentionArgs args) {
  constexpr int kStride = kDim + kRowPad;                     // elements per staged row
  constexpr int kChunks = kDim / 32;                          // 32 dimensions: one ldmatrix.x4
  constexpr int kSegments = kDim / 8;                         // 16-byte segments per row
  constexpr int kCopies = kWarpKeys * kSegments / kWarpSize;  // per lane, keys or values
  constexpr int kStageElements = 2 * kWarpKeys * kStride;
  constexpr int kWarpElements = WarpStagedElements(kDim);
  constexpr int kChains = 4;  // independent score accumulators: a shorter chain of mmas
  constexpr int kAccStride = kDim + kAccPad;
  constexpr uint32_t kBytes = sizeof(T);  // per element, for shared-memory addresses
  static_assert(kCopies * kWarpSize == kWarpKeys * kSegments, "whole copies per lane");
  static_assert(kMaxGroups * kAccStride * sizeof(float) <= kWarpElements * sizeof(T),
                "the merge fits in a warp's staging memory");
  extern __shared__ uint4 dynamic_shared[];
  __shared__ float warp_max[kWarps][kMaxGroups];
  __shared__ float warp_sum[kWarps][kMaxGroups];
  AwaitPrerequisitesThenAllowDependents();

  const int seq = blockIdx.x, kv = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, q = lane % 4;
  const int groups = static_cast<int>(args.heads / args.kv_heads);
  auto has_group = [&](int h) { return h < kGroups && (kGroups != kMaxGroups || h < groups); };
  const int64_t head0 = seq * args.heads + static_cast<int64_t>(kv) * groups;

  // The queries, unscaled, as rows of the score mma's A (zeros past the group): loaded here,
  // stored to shared memory once the first tiles' copies are in flight.
  constexpr int kQueryCopies = (kMaxGroups * kSegments + kThreads - 1) / kThreads;
  __shared__ __align__(16) T query_s[kMaxGroups][kStride];
  Pack<T, 8> query_chunks[kQueryCopies];
#pragma unroll
  for (int i = 0; i < kQueryCopies; ++i) {
    const int index = threadIdx.x + i * kThreads, h = index / kSegments;
#pragma unroll
    for (int e = 0; e < 8; ++e) query_chunks[i].values[e] = FromFloat<T>(0.f);
    if (index < kMaxGroups * kSegments && has_group(h)) {
      query_chunks[i] = *reinterpret_cast<const Pack<T, 8>*>(
          static_cast<const T*>(args.queries) + (head0 + h) * kDim + index % kSegments * 8);
    }
  }

  const int64_t position = args.positions[seq];
  const int64_t first =
      args.sliding_window > 0 ? max(int64_t{0}, position - args.sliding_window + 1) : 0;
  // Whole tiles where the keys allow (a part-filled tile costs a whole tile's work).
  const int64_t even_share = (position + 1 - first + args.splits - 1) / args.splits;
  const int64_t per_split = (even_share + kTileKeys - 1) / kTileKeys * kTileKeys;
  const int64_t begin = first + split * per_split;
  const int keys_in_split =
      static_cast<int>(max(int64_t{0}, min(position + 1, begin + per_split) - begin));
  // This warp's tiles: those with at least one of its keys in the split.
  const int warp_first = warp * kWarpKeys;
  const int tiles =
      keys_in_split > warp_first ? (keys_in_split - warp_first + kTileKeys - 1) / kTileKeys : 0;

  const int64_t row_stride = args.kv_heads * kDim;  // one cache position
  const int64_t base =
      (args.slots[seq] * args.max_seq + begin) * row_stride + static_cast<int64_t>(kv) * kDim;
  const T* keys = static_cast<const T*>(args.keys) + base;
  const T* values = static_cast<const T*>(args.values) + base;
  T* staged = reinterpret_cast<T*>(dynamic_shared) + warp * kWarpElements;
  // Copies tile t's key and value rows into stage t % kStages; past the split a row repeats the
  // split's last key (its probability is 0, and its values finite where uninitialised memory
  // could hold NaN). Always one group, possibly empty, so that WaitCopies counts tiles.
  auto stage_tile = [&](int t) {
    if (t < tiles) {
      T* stage = staged + t % kStages * kStageElements;
#pragma unroll
      for (int i = 0; i < kCopies; ++i) {
        const int index = lane + i * kWarpSize;
        const int r = index / kSegments, column = index % kSegments * 8;
        const int key = min(t * kTileKeys + warp_first + r, keys_in_split - 1);
        const int64_t offset = key * row_stride + column;
        CopyAsync(SharedAddress(stage + r * kStride + column), keys + offset);
        CopyAsync(SharedAddress(stage + (kWarpKeys + r) * kStride + column), values + offset);
      }
    }
    CommitCopies();
  };
#pragma unroll
  for (int t = 0; t < kStages; ++t) stage_tile(t);
#pragma unroll
  for (int i = 0; i < kQueryCopies; ++i) {
    const int index = threadIdx.x + i * kThreads;
    if (index < kMaxGroups * kSegments) {
      *reinterpret_cast<Pack<T, 8>*>(&query_s[index / kSegments][index % kSegments * 8]) =
          query_chunks[i];
    }
  }
  __syncthreads();  // the queries

  // Output fragments: acc[i] = Oᵀ rows 16i + g (c0, c1) and 16i + g + 8 (c2, c3), columns (heads)
  // 2q and 2q + 1.
  float acc[kDim / 16][4];
#pragma unroll
  for (int i = 0; i < kDim / 16; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  }
  float running_max = -INFINITY;  // head g's, in the log2 domain
  float lane_sum = 0.f;           // head g's rounded probabilities of keys 2q, 2q + 1
  const float score_scale = args.scale * kLog2E;
  // ldmatrix: lane 8j + r addresses row r, dimensions 8j..8j+7 of each 32.
  const uint32_t lane_rows = SharedAddress(staged + lane % 8 * kStride + lane / 8 * 8);
  const uint32_t query_rows = SharedAddress(&query_s[lane % 8][lane / 8 * 8]);

  for (int t = 0; t < tiles; ++t) {
    WaitCopies<kStages - 1>();
    __syncwarp();  // the other lanes' copies
    const uint32_t key_rows = lane_rows + t % kStages * kStageElements * kBytes;
    const uint32_t value_rows = key_rows + kWarpKeys * kStride * kBytes;

    float chains[kChains][4] = {};
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      // Fragments of dims 32c..32c+15 ([0] and [1]) and of the next 16 ([2] and [3]): A's a0
      // and a2 from the queries, B's b0 and b1 from the keys.
      uint32_t a[4], b[4];
      LoadMatrices<false>(a, query_rows + c * 32 * kBytes);
      LoadMatrices<false>(b, key_rows + c * 32 * kBytes);
      MmaK16<T>(chains[2 * c % kChains], a[0], a[1], b[0], b[1]);
      MmaK16<T>(chains[(2 * c + 1) % kChains], a[2], a[3], b[2], b[3]);
    }
    float s0 = 0.f, s1 = 0.f;
#pragma unroll
    for (int j = 0; j < kChains; ++j) {
      s0 += chains[j][0];
      s1 += chains[j][1];
    }
    const int key = t * kTileKeys + warp_first + 2 * q;
    s0 = key < keys_in_split ? s0 * score_scale : -INFINITY;
    s1 = key + 1 < keys_in_split ? s1 * score_scale : -INFINITY;
    float tile_max = fmaxf(s0, s1);
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
    // Finite: the warp's first key of the tile is in the split.
    const float new_max = fmaxf(running_max, tile_max);
    const float rescale = exp2f(running_max - new_max);  // 0 on the first tile
    running_max = new_max;
    float tile_sum = 0.f;
    const uint32_t probs = RoundPair(exp2f(s0 - new_max), exp2f(s1 - new_max), tile_sum, T{});
    lane_sum = lane_sum * rescale + tile_sum;
    // The accumulators' heads 2q and 2q + 1 are the score rows of lanes 8q and 8q + 4.
    const float rescale_even = __shfl_sync(kFullMask, rescale, 8 * q);
    const float rescale_odd = __shfl_sync(kFullMask, rescale, 8 * q + 4);
#pragma unroll
    for (int i = 0; i < kDim / 16; ++i) {
      acc[i][0] *= rescale_even;
      acc[i][1] *= rescale_odd;
      acc[i][2] *= rescale_even;
      acc[i][3] *= rescale_odd;
    }
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      uint32_t v[4];  // A fragments of dims 32c..32c+15 (v[0], v[1]) and the next 16
      LoadMatrices<true>(v, value_rows + c * 32 * kBytes);
      MmaK8<T>(acc[2 * c], v[0], v[1], probs);
      MmaK8<T>(acc[2 * c + 1], v[2], v[3], probs);
    }
    __syncwarp();  // every lane's ldmatrix of this stage, before it is refilled
    stage_tile(t + kStages);
  }

  // The merge: each warp's accumulators as [head][dim] floats over its own (now idle) staging
  // memory, its max and sum per head.
  {
    float* own = reinterpret_cast<float*>(staged);
#pragma unroll
    for (int i = 0; i < kDim / 16; ++i) {
      own[2 * q * kAccStride + 16 * i + g] = acc[i][0];
      own[(2 * q + 1) * kAccStride + 16 * i + g] = acc[i][1];
      own[2 * q * kAccStride + 16 * i + g + 8] = acc[i][2];
      own[(2 * q + 1) * kAccStride + 16 * i + g + 8] = acc[i][3];
    }
    lane_sum += __shfl_xor_sync(kFullMask, lane_sum, 1);
    lane_sum += __shfl_xor_sync(kFullMask, lane_sum, 2);
    if (q == 0) {
      warp_max[warp][g] = running_max;
      warp_sum[warp][g] = lane_sum;
    }
  }
  __syncthreads();

  const int block_groups = kGroups == kMaxGroups ? groups : kGroups;
  for (int index = threadIdx.x; index < block_groups * kDim; index += kThreads) {
    const int h = index / kDim, d = index % kDim;
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max[w][h]);
    float block_sum = 0.f, block_acc = 0.f;
    if (block_max != -INFINITY) {  // a split past the sequence's keys has none
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float* accs = reinterpret_cast<const float*>(
            reinterpret_cast<const T*>(dynamic_shared) + w * kWarpElements);
        const float rescale = exp2f(warp_max[w][h] - block_max);  // 0 for a warp without keys
        block_sum += warp_sum[w][h] * rescale;
        block_acc += accs[h * kAccStride + d] * rescale;
      }
    }
    if (args.splits == 1) {
      static_cast<T*>(args.out)[(head0 + h) * kDim + d] = FromFloat<T>(block_acc / block_sum);
    } else {
      // Partials: [seqs * heads, splits] maxima and sums, then [seqs * heads, splits, kDim].
      const int64_t partial = (head0 + h) * args.splits + split;
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
  AwaitPrerequisitesThenAllowDependents();
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
cudaError_t LaunchKernels(const DecodeAttentionArgs& args, cudaStream_t stream) {
  constexpr size_t kShared = SharedBytes<T>(kDim);
  auto* kernel = DecodeAttentionKernel<T, kDim, kGroups>;
  if constexpr (kShared > 48 * 1024) {  // past the default limit: 66 KiB at head_dim 256
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared);
    if (error != cudaSuccess) return error;
  }
  const dim3 grid(static_cast<unsigned>(args.seqs), static_cast<unsigned>(args.kv_heads),
                  static_cast<unsigned>(args.splits));
  if (const cudaError_t error =
          LaunchDependent(kernel, grid, dim3(kThreads), kShared, stream, args);
      error != cudaSuccess || args.splits == 1) {
    return error;
  }
  return LaunchDependent(MergeSplitsKernel<T>, dim3(static_cast<unsigned>(args.seqs * args.heads)),
                         dim3(kDim), 0, stream, args);
}

// The grouping as a template argument, so the query loads and the merge unroll without checks.
template <typename T, int kDim>
cudaError_t LaunchForGroups(const DecodeAttentionArgs& args, cudaStream_t stream) {
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
      return LaunchForGroups<T, 64>(args, stream);
    case 128:
      return LaunchForGroups<T, 128>(args, stream);
    case 256:
      return LaunchForGroups<T, 256>(args, stream);
    default:
      return cudaErrorInvalidValue;
  }
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
