// Sparse-routing LoRA, laid out for a decode step's latency: every (token, expert) pair reads
// only its own rows, so the work is many small independent dot products and column sums; what
// counts is how soon every load is in flight, and launching few kernels (the projections that
// read one input, q/k/v or gate/up, are the targets of one launch).
//
// Shrink, grid (pairs, splits of `in`, targets): a block of 4 warps takes kSplitElements of `in`
// for one pair; each warp takes a batch of 4 rank rows at a time, its lanes loading every pack of
// the batch (8 × 16 bytes) before any product, then one shuffle reduction per row. Partial sums
// go to the workspace [target][split][pair][rank] in fp32 (no atomics: a fixed order).
// Expand, grid (tokens, column tiles of every target), launched programmatically dependent on the
// shrink (it starts while the shrink runs): a block of 4 warps first loads its token's routes and
// its outputs, then, after one barrier, its first loads of Bᵀ; only then does it wait for the
// shrink, add up the split sums and round them (round(round(s)·round(w)), as the dense path's
// GEMM and multiply round) into shared memory. Bᵀ with unit column stride: a tile is 256
// columns, each lane 8 of them (16-byte packs), the warps splitting the k·R rows and adding their
// sums in shared memory in a fixed order. Bᵀ in a column room (unit row stride): a tile is 128
// columns, one a thread, each column's rank rows read in 16-byte packs. Each output is rounded
// once. A pair of weight 0 reads nothing in either kernel.
// Index math is 32-bit and divides by the runtime rank at most once a batch (the cursors below):
// with 64-bit divisions (~70 instructions each) a first version issued ~1600 instructions a warp
// and took 11 µs (31 µs for gate/up at batch 8), bound by issue latency, not memory.

#include <cstdint>
#include <type_traits>

#include "core/kernels/dependent_launch.cuh"
#include "core/kernels/element.cuh"
#include "core/kernels/sparse_lora.h"

namespace moelora::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kVec = 8;  // elements per 16-byte pack (bf16, fp16)
constexpr int kElementBytes = 2;
constexpr int64_t kSplitElements = 512;  // of `in` per shrink block
constexpr int kPacksPerLane = kSplitElements / kVec / kWarpSize;
constexpr int kRowBatch = 4;   // rank rows a shrink warp loads before reducing
constexpr int kLoadBatch = 8;  // packs of Bᵀ an expand thread loads before using them
constexpr int kRowMajorTile = kWarpSize * kVec;  // expand columns a block, unit column stride
constexpr int kColumnRoomTile = kThreads;        // expand columns a block, unit row stride

__host__ __device__ constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ Pack<T, kVec> LoadPack(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T, kVec> pack;
  static_assert(sizeof(pack) == sizeof(raw));
  memcpy(&pack, &raw, sizeof(raw));
  return pack;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) SparseShrinkKernel(const SparseLoraArgs args) {
  const int pair = blockIdx.x;
  if (args.weights[pair] == 0.0f) return;  // the expand reads nothing of this pair
  const SparseLoraTarget& target = args.targets[blockIdx.z];
  const int pairs = gridDim.x, splits = gridDim.y, split = blockIdx.y;
  const int token = pair / static_cast<int>(args.experts_per_token);
  const int64_t begin = split * kSplitElements;
  const int count = static_cast<int>(min(kSplitElements, args.in - begin));
  const T* x = static_cast<const T*>(args.x.data) + token * args.x.row_stride + begin;
  const T* a =
      static_cast<const T*>(target.a.data) + args.slots[pair] * target.a.slot_stride + begin;
  const int rank = static_cast<int>(args.rank);
  float* partial = args.workspace + ((blockIdx.z * splits + split) * pairs + pair) * rank;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;

  bool valid[kPacksPerLane];
#pragma unroll
  for (int p = 0; p < kPacksPerLane; ++p) valid[p] = (lane + p * kWarpSize) * kVec < count;
  Pack<T, kVec> rows[kRowBatch][kPacksPerLane];
  auto load_rows = [&](int r0) {
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
#pragma unroll
      for (int p = 0; p < kPacksPerLane; ++p) {
        if (r0 + b < rank && valid[p]) {
          rows[b][p] = LoadPack(a + (r0 + b) * target.a.row_stride + (lane + p * kWarpSize) * kVec);
        }
      }
    }
  };
  // A is a weight, and the routes were written before the kernel before this one: the first
  // batch of A's rows is loaded while that kernel (the GEMM beside which x was read) finishes
  // (dependent_launch.cuh); x once it has.
  load_rows(warp * kRowBatch);
  AwaitPrerequisitesThenAllowDependents();
  Pack<T, kVec> xs[kPacksPerLane];
#pragma unroll
  for (int p = 0; p < kPacksPerLane; ++p) {
    if (valid[p]) xs[p] = LoadPack(x + (lane + p * kWarpSize) * kVec);
  }
  for (int r0 = warp * kRowBatch; r0 < rank; r0 += kWarps * kRowBatch) {
    if (r0 != warp * kRowBatch) load_rows(r0);
    float sums[kRowBatch];
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
      sums[b] = 0.0f;
#pragma unroll
      for (int p = 0; p < kPacksPerLane; ++p) {
        if (r0 + b < rank && valid[p]) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            sums[b] += ToFloat(xs[p].values[e]) * ToFloat(rows[b][p].values[e]);
          }
        }
      }
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        sums[b] += __shfl_xor_sync(0xffffffffu, sums[b], offset);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int b = 0; b < kRowBatch; ++b) {
        if (r0 + b < rank) partial[r0 + b] = sums[b];
      }
    }
  }
}

// The expand block's target and its first column, from the tile index over every target's tiles.
template <int kTileColumns>
__device__ __forceinline__ int TargetOfTile(const SparseLoraArgs& args, int64_t& first_column) {
  int tile = blockIdx.y;
  for (int g = 0; g < args.count; ++g) {
    const int tiles = static_cast<int>(args.targets[g].columns + kTileColumns - 1) / kTileColumns;
    if (tile < tiles) {
      first_column = tile * kTileColumns;
      return g;
    }
    tile -= tiles;
  }
  return -1;
}

// The expand's prologue: the token's routes and outputs, then (the loads of Bᵀ in flight) the
// shrink's split sums, then their rounding. Values i = j·R + r < k·R; `lanes` threads add each
// value's splits (strided, so their loads go out together), or one thread a value when there are
// many.
struct ExpandShared {
  float scaled[kSparseLoraMaxExpertsPerToken * kSparseLoraMaxRank];
  float lane_sums[kThreads];
  int64_t slots[kSparseLoraMaxExpertsPerToken];
  float weights[kSparseLoraMaxExpertsPerToken];
};

// log2 of the lanes a value: up to 8, as long as every value's lanes fit in the block.
__device__ __forceinline__ int SplitSumLanesLog2(int values) {
  int log2 = 0;
  while (log2 < 3 && (values << (log2 + 1)) <= kThreads) ++log2;
  return log2;
}

// The token's slots and weights into shared memory (before a barrier).
__device__ __forceinline__ void StoreRoutes(const SparseLoraArgs& args, ExpandShared& shared) {
  const int k = static_cast<int>(args.experts_per_token);
  if (threadIdx.x < k) {
    shared.slots[threadIdx.x] = args.slots[blockIdx.x * k + threadIdx.x];
    shared.weights[threadIdx.x] = args.weights[blockIdx.x * k + threadIdx.x];
  }
}

// After AwaitPrerequisites, before a barrier: each thread's share of the split sums
// (unrounded) into lane_sums, or into scaled with one lane a value.
__device__ __forceinline__ void SumSplits(const SparseLoraArgs& args, int target, int splits,
                                          int lanes_log2, ExpandShared& shared) {
  const int k = static_cast<int>(args.experts_per_token), rank = static_cast<int>(args.rank);
  const int values = k * rank, pairs = static_cast<int>(args.tokens) * k;
  const int first_pair = blockIdx.x * k;
  // A pair of weight 0 was never written by the shrink: its sums are read but not used.
  const float* partials = args.workspace + (target * splits * pairs + first_pair) * rank;
  const int split_stride = pairs * rank;
  if (lanes_log2 > 0) {
    const int lanes = 1 << lanes_log2, i = threadIdx.x >> lanes_log2;
    float sum = 0.0f;
    if (i < values) {
#pragma unroll 8
      for (int s = threadIdx.x & (lanes - 1); s < splits; s += lanes) {
        sum += partials[s * split_stride + i];
      }
    }
    shared.lane_sums[threadIdx.x] = sum;
  } else {
    for (int i = threadIdx.x; i < values; i += kThreads) {
      float sum = 0.0f;
#pragma unroll 8
      for (int s = 0; s < splits; ++s) sum += partials[s * split_stride + i];
      shared.scaled[i] = sum;
    }
  }
}

// After the barrier: scaled[i] = round(round(Σ splits) · round(w_j)), as the dense path's GEMM
// and multiply round; 0 for a pair of weight 0.
template <typename T>
__device__ __forceinline__ void FinishPrologue(const SparseLoraArgs& args, int lanes_log2,
                                               ExpandShared& shared) {
  const int rank = static_cast<int>(args.rank);
  const int values = static_cast<int>(args.experts_per_token) * rank;
  for (int i = threadIdx.x; i < values; i += kThreads) {
    float sum = 0.0f;
    if (lanes_log2 > 0) {
      for (int l = 0; l < (1 << lanes_log2); ++l) sum += shared.lane_sums[(i << lanes_log2) + l];
    } else {
      sum = shared.scaled[i];
    }
    const float w = shared.weights[i / rank];
    shared.scaled[i] =
        w == 0.0f ? 0.0f
                  : ToFloat(FromFloat<T>(ToFloat(FromFloat<T>(sum)) * ToFloat(FromFloat<T>(w))));
  }
}

// The part of the expand's prologue that needs the shrink: waits for it, then rounds its split
// sums into shared.scaled (two barriers).
template <typename T>
__device__ __forceinline__ void ScaleSplitSums(const SparseLoraArgs& args, int target, int splits,
                                               ExpandShared& shared) {
  const int lanes_log2 =
      SplitSumLanesLog2(static_cast<int>(args.experts_per_token) * static_cast<int>(args.rank));
  AwaitPrerequisitesThenAllowDependents();
  SumSplits(args, target, splits, lanes_log2, shared);
  __syncthreads();
  FinishPrologue<T>(args, lanes_log2, shared);
  __syncthreads();
}

// Bᵀ with unit column stride: lane l of every warp takes columns first + 8l .. +8; warp w the
// rows i = w, w + 4, ... of the token's k·R (expert i / R, rank row i % R).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SparseExpandRowMajorKernel(const SparseLoraArgs args, const int splits) {
  __shared__ ExpandShared shared;
  __shared__ float sums[kWarps][kRowMajorTile];
  int64_t first_column = 0;
  const int g = TargetOfTile<kRowMajorTile>(args, first_column);
  const SparseLoraTarget& target = args.targets[g];
  const int rank = static_cast<int>(args.rank);
  const int rows = static_cast<int>(args.experts_per_token) * rank;
  StoreRoutes(args, shared);
  // This thread's outputs in the final sum: columns first + threadIdx.x + q·kThreads.
  constexpr int kOutputs = kRowMajorTile / kThreads;
  T* out = static_cast<T*>(target.out) + blockIdx.x * target.out_stride + first_column;
  float outputs[kOutputs];
#pragma unroll
  for (int q = 0; q < kOutputs; ++q) {
    const int c = threadIdx.x + q * kThreads;
    if (first_column + c < target.columns) outputs[q] = ToFloat(out[c]);
  }
  __syncthreads();

  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t column = first_column + lane * kVec;
  const bool in_range = column < target.columns;
  const T* bt = static_cast<const T*>(target.bt.data) + column;
  // A batch: rows i = i0 + warp + b·kWarps, b < kLoadBatch; expert j and rank row r of each
  // followed from the first (rank ≥ 8 > kWarps: a step crosses at most one expert).
  Pack<T, kVec> packs[kLoadBatch];
  auto load_batch = [&](int i0) {
    int j = (i0 + warp) / rank, r = i0 + warp - j * rank;
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      if (i0 + warp + b * kWarps < rows && in_range && shared.weights[j] != 0.0f) {
        packs[b] = LoadPack(bt + shared.slots[j] * target.bt.slot_stride +
                            static_cast<int64_t>(r) * target.bt.row_stride);
      }
      r += kWarps;
      if (r >= rank) r -= rank, ++j;
    }
  };
  load_batch(0);
  ScaleSplitSums<T>(args, g, splits, shared);
  float acc[kVec] = {};
  for (int i0 = 0; i0 < rows; i0 += kLoadBatch * kWarps) {
    if (i0 > 0) load_batch(i0);
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int i = i0 + warp + b * kWarps;
      if (i < rows && shared.scaled[i] != 0.0f) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += shared.scaled[i] * ToFloat(packs[b].values[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) sums[warp][lane * kVec + e] = acc[e];
  __syncthreads();
#pragma unroll
  for (int q = 0; q < kOutputs; ++q) {
    const int c = threadIdx.x + q * kThreads;
    if (first_column + c >= target.columns) break;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += sums[w][c];
    out[c] = FromFloat<T>(outputs[q] + total);
  }
}

// Bᵀ in a column room (unit row stride): thread c takes column first + c, reading each expert's
// R rows of it in R / 8 packs.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SparseExpandColumnRoomKernel(const SparseLoraArgs args, const int splits) {
  __shared__ ExpandShared shared;
  int64_t first_column = 0;
  const int g = TargetOfTile<kColumnRoomTile>(args, first_column);
  const SparseLoraTarget& target = args.targets[g];
  const int rank = static_cast<int>(args.rank);
  const int values = static_cast<int>(args.experts_per_token) * rank;
  StoreRoutes(args, shared);
  const int64_t column = first_column + threadIdx.x;
  const bool in_range = column < target.columns;
  T* out = static_cast<T*>(target.out) + blockIdx.x * target.out_stride + column;
  const float output = in_range ? ToFloat(*out) : 0.0f;
  __syncthreads();

  const int packs_per_expert = rank / kVec, packs_total = values / kVec;
  const T* bt = static_cast<const T*>(target.bt.data) + column * target.bt.column_stride;
  // A batch: packs p = p0 + b, b < kLoadBatch, of expert j and pack q of its rows, followed from
  // the first.
  Pack<T, kVec> packs[kLoadBatch];
  auto load_batch = [&](int p0) {
    int j = p0 / packs_per_expert, q = p0 - j * packs_per_expert;
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      if (p0 + b < packs_total && in_range && shared.weights[j] != 0.0f) {
        packs[b] = LoadPack(bt + shared.slots[j] * target.bt.slot_stride + q * kVec);
      }
      if (++q == packs_per_expert) q = 0, ++j;
    }
  };
  load_batch(0);
  ScaleSplitSums<T>(args, g, splits, shared);
  if (!in_range) return;
  float acc = 0.0f;
  for (int p0 = 0; p0 < packs_total; p0 += kLoadBatch) {
    if (p0 > 0) load_batch(p0);
    int j = p0 / packs_per_expert, q = p0 - j * packs_per_expert;
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int p = p0 + b;
      // A pair of weight 0 loaded nothing.
      if (p < packs_total && shared.weights[j] != 0.0f) {
        const float* s = shared.scaled + p * kVec;  // p·8 = j·R + q·8
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc += s[e] * ToFloat(packs[b].values[e]);
      }
      if (++q == packs_per_expert) q = 0, ++j;
    }
  }
  *out = FromFloat<T>(output + acc);
}

bool InColumnRoom(const SlotStack& bt) { return bt.column_stride != 1 && bt.row_stride == 1; }

bool Packed(const SlotStack& stack, int64_t stride) {
  return stack.slot_stride % kVec == 0 && Aligned(stack.data, stride, kVec, kElementBytes);
}

}  // namespace

int64_t SparseLoraWorkspaceFloats(const SparseLoraArgs& args) {
  return args.count * CeilDiv(args.in, kSplitElements) * args.tokens * args.experts_per_token *
         args.rank;
}

bool SparseLoraTakes(const SparseLoraArgs& args) {
  if (args.type != ElementType::kBFloat16 && args.type != ElementType::kHalf) return false;
  if (args.tokens < 1 || args.tokens > kSparseLoraMaxTokens) return false;
  if (args.experts_per_token < 1 || args.experts_per_token > kSparseLoraMaxExpertsPerToken) {
    return false;
  }
  if (args.rank < 1 || args.rank > kSparseLoraMaxRank || args.rank % kVec != 0) return false;
  if (args.in < 1 || args.in % kVec != 0 || args.count < 1 || args.count > kMaxSparseLoraTargets) {
    return false;
  }
  if (args.slots == nullptr || args.weights == nullptr) return false;
  if (!Aligned(args.x.data, args.x.row_stride, kVec, kElementBytes)) return false;
  const bool column_room = InColumnRoom(args.targets[0].bt);
  for (int g = 0; g < args.count; ++g) {
    const SparseLoraTarget& target = args.targets[g];
    if (target.out == nullptr || target.columns < 1 || target.columns % kVec != 0) return false;
    if (target.a.column_stride != 1 || !Packed(target.a, target.a.row_stride)) return false;
    if (InColumnRoom(target.bt) != column_room) return false;
    if (column_room ? !Packed(target.bt, target.bt.column_stride)
                    : target.bt.column_stride != 1 || !Packed(target.bt, target.bt.row_stride)) {
      return false;
    }
  }
  return true;
}

cudaError_t LaunchSparseLora(const SparseLoraArgs& args, cudaStream_t stream) {
  if (!SparseLoraTakes(args) || args.workspace == nullptr) return cudaErrorInvalidValue;
  const int splits = static_cast<int>(CeilDiv(args.in, kSplitElements));
  const bool column_room = InColumnRoom(args.targets[0].bt);
  int64_t tiles = 0;
  for (int g = 0; g < args.count; ++g) {
    tiles += CeilDiv(args.targets[g].columns, column_room ? kColumnRoomTile : kRowMajorTile);
  }
  return WithElementType(args.type, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      const dim3 shrink_grid(static_cast<unsigned>(args.tokens * args.experts_per_token),
                             static_cast<unsigned>(splits), static_cast<unsigned>(args.count));
      if (const cudaError_t error =
              LaunchDependent(SparseShrinkKernel<T>, shrink_grid, dim3(kThreads), 0, stream, args);
          error != cudaSuccess) {
        return error;
      }
      // Tokens vary fastest: the blocks that run together read the same rows of Bᵀ (their
      // experts' chunks of one room row lie close together).
      const dim3 expand_grid(static_cast<unsigned>(args.tokens), static_cast<unsigned>(tiles));
      return LaunchDependent(
          column_room ? SparseExpandColumnRoomKernel<T> : SparseExpandRowMajorKernel<T>,
          expand_grid, dim3(kThreads), 0, stream, args, splits);
    }
  });
}

}  // namespace moelora::kernels
