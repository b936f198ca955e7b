// Sparse-routing LoRA, laid out for a decode step's latency: every (token, expert) pair reads
// only its own rows, so the work is many small independent dot products and column sums; what
// counts is how soon every load is in flight, and launching few kernels (the projections that
// read one input, q/k/v or gate/up, are the targets of one launch).
//
// Shrink, grid (pairs, splits of `in`, targets): a block of 4 warps takes kSplitElements of `in`
// for one pair; each warp takes a batch of 4 rank rows at a time, its lanes loading every pack of
// the batch (8 × 16 bytes) before any product, then one shuffle reduction per row. Partial sums
// go to the workspace [target][split][pair][rank] in fp32 (no atomics: a fixed order).
// Expand, grid (column tiles of every target, tokens): a block of 4 warps first reads its token's
// slots and weights and issues its first loads of Bᵀ, then adds up the splits of the token's
// pairs and rounds them (round(round(s)·round(w)), as the dense path's GEMM and multiply round)
// into shared memory while those loads are in flight. Bᵀ with unit column stride: a tile is 256
// columns, each lane 8 of them (16-byte packs), the warps splitting the k·R rows and adding their
// sums in shared memory in a fixed order. Bᵀ in a column room (unit row stride): a tile is 128
// columns, one a thread, each column's rank rows read in 16-byte packs. Each output is rounded
// once. A pair of weight 0 reads nothing in either kernel.

#include <cstdint>
#include <type_traits>

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
  const int64_t pair = blockIdx.x;
  if (args.weights[pair] == 0.0f) return;  // the expand reads nothing of this pair
  const SparseLoraTarget& target = args.targets[blockIdx.z];
  const int64_t pairs = args.tokens * args.experts_per_token;
  const int64_t splits = gridDim.y, split = blockIdx.y;
  const int64_t token = pair / args.experts_per_token;
  const int64_t begin = split * kSplitElements;
  const int64_t count = min(kSplitElements, args.in - begin);
  const T* x = static_cast<const T*>(args.x.data) + token * args.x.row_stride + begin;
  const T* a =
      static_cast<const T*>(target.a.data) + args.slots[pair] * target.a.slot_stride + begin;
  float* partial = args.workspace + ((blockIdx.z * splits + split) * pairs + pair) * args.rank;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;

  Pack<T, kVec> xs[kPacksPerLane];
  bool valid[kPacksPerLane];
#pragma unroll
  for (int p = 0; p < kPacksPerLane; ++p) {
    const int64_t e = (lane + p * kWarpSize) * kVec;
    valid[p] = e < count;
    if (valid[p]) xs[p] = LoadPack(x + e);
  }
  for (int64_t r0 = warp * kRowBatch; r0 < args.rank; r0 += kWarps * kRowBatch) {
    Pack<T, kVec> rows[kRowBatch][kPacksPerLane];
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
#pragma unroll
      for (int p = 0; p < kPacksPerLane; ++p) {
        if (r0 + b < args.rank && valid[p]) {
          rows[b][p] = LoadPack(a + (r0 + b) * target.a.row_stride + (lane + p * kWarpSize) * kVec);
        }
      }
    }
    float sums[kRowBatch];
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
      sums[b] = 0.0f;
#pragma unroll
      for (int p = 0; p < kPacksPerLane; ++p) {
        if (r0 + b < args.rank && valid[p]) {
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
        if (r0 + b < args.rank) partial[r0 + b] = sums[b];
      }
    }
  }
}

// The expand block's target and its first column, from the tile index over every target's tiles.
__device__ __forceinline__ int TargetOfTile(const SparseLoraArgs& args, int64_t tile_columns,
                                            int64_t& first_column) {
  int64_t tile = blockIdx.x;
  for (int g = 0; g < args.count; ++g) {
    const int64_t tiles = CeilDiv(args.targets[g].columns, tile_columns);
    if (tile < tiles) {
      first_column = tile * tile_columns;
      return g;
    }
    tile -= tiles;
  }
  return -1;
}

// scaled[i], i = j·R + r < k·R: round(round(Σ_splits partials) · round(w_j)) of the block's token
// and target; 0 for a pair of weight 0.
template <typename T>
__device__ __forceinline__ void ScaleShrink(const SparseLoraArgs& args, int target, int64_t splits,
                                            float* scaled) {
  const int64_t k = args.experts_per_token, rank = args.rank;
  const int64_t pairs = args.tokens * k, first_pair = blockIdx.y * k;
  for (int64_t i = threadIdx.x; i < k * rank; i += kThreads) {
    const float w = args.weights[first_pair + i / rank];
    float value = 0.0f;
    if (w != 0.0f) {
      const float* partial = args.workspace + (target * splits * pairs + first_pair) * rank + i;
      float sum = 0.0f;
#pragma unroll 4
      for (int64_t s = 0; s < splits; ++s) sum += partial[s * pairs * rank];
      value = ToFloat(FromFloat<T>(ToFloat(FromFloat<T>(sum)) * ToFloat(FromFloat<T>(w))));
    }
    scaled[i] = value;
  }
}

// Bᵀ with unit column stride: lane l of every warp takes columns first + 8l .. +8; warp w the
// rows i = w, w + 4, ... of the token's k·R (expert i / R, rank row i % R).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SparseExpandRowMajorKernel(const SparseLoraArgs args, const int64_t splits) {
  __shared__ float scaled[kSparseLoraMaxExpertsPerToken * kSparseLoraMaxRank];
  __shared__ float sums[kWarps][kRowMajorTile];
  int64_t first_column = 0;
  const int g = TargetOfTile(args, kRowMajorTile, first_column);
  const SparseLoraTarget& target = args.targets[g];
  const int64_t k = args.experts_per_token, rank = args.rank, rows = k * rank;
  const int64_t first_pair = blockIdx.y * k;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t column = first_column + lane * kVec;
  const bool in_range = column < target.columns;
  const T* bt = static_cast<const T*>(target.bt.data) + column;
  auto load = [&](int64_t i, Pack<T, kVec>& pack) {
    const int64_t pair = first_pair + i / rank;
    if (in_range && args.weights[pair] != 0.0f) {
      pack = LoadPack(bt + args.slots[pair] * target.bt.slot_stride +
                      (i % rank) * target.bt.row_stride);
    }
  };
  Pack<T, kVec> packs[kLoadBatch];
#pragma unroll
  for (int b = 0; b < kLoadBatch; ++b) {
    const int64_t i = warp + b * kWarps;
    if (i < rows) load(i, packs[b]);
  }
  ScaleShrink<T>(args, g, splits, scaled);
  __syncthreads();
  float acc[kVec] = {};
  for (int64_t i0 = 0; i0 < rows; i0 += kLoadBatch * kWarps) {
    if (i0 > 0) {
#pragma unroll
      for (int b = 0; b < kLoadBatch; ++b) {
        const int64_t i = i0 + warp + b * kWarps;
        if (i < rows) load(i, packs[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int64_t i = i0 + warp + b * kWarps;
      if (i < rows && scaled[i] != 0.0f) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += scaled[i] * ToFloat(packs[b].values[e]);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < kVec; ++e) sums[warp][lane * kVec + e] = acc[e];
  __syncthreads();
  for (int c = threadIdx.x; c < kRowMajorTile; c += kThreads) {
    if (first_column + c >= target.columns) break;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += sums[w][c];
    T* out = static_cast<T*>(target.out) + blockIdx.y * target.out_stride + first_column + c;
    *out = FromFloat<T>(ToFloat(*out) + total);
  }
}

// Bᵀ in a column room (unit row stride): thread c takes column first + c, reading each expert's
// R rows of it in R / 8 packs.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SparseExpandColumnRoomKernel(const SparseLoraArgs args, const int64_t splits) {
  __shared__ float scaled[kSparseLoraMaxExpertsPerToken * kSparseLoraMaxRank];
  int64_t first_column = 0;
  const int g = TargetOfTile(args, kColumnRoomTile, first_column);
  const SparseLoraTarget& target = args.targets[g];
  const int64_t k = args.experts_per_token, rank = args.rank;
  const int64_t packs_per_expert = rank / kVec, packs_total = k * packs_per_expert;
  const int64_t first_pair = blockIdx.y * k;
  const int64_t column = first_column + threadIdx.x;
  const bool in_range = column < target.columns;
  const T* bt = static_cast<const T*>(target.bt.data) + column * target.bt.column_stride;
  auto load = [&](int64_t p, Pack<T, kVec>& pack) {
    const int64_t pair = first_pair + p / packs_per_expert;
    if (in_range && args.weights[pair] != 0.0f) {
      pack =
          LoadPack(bt + args.slots[pair] * target.bt.slot_stride + (p % packs_per_expert) * kVec);
    }
  };
  Pack<T, kVec> packs[kLoadBatch];
#pragma unroll
  for (int b = 0; b < kLoadBatch; ++b) {
    if (b < packs_total) load(b, packs[b]);
  }
  ScaleShrink<T>(args, g, splits, scaled);
  __syncthreads();
  if (!in_range) return;
  float acc = 0.0f;
  for (int64_t p0 = 0; p0 < packs_total; p0 += kLoadBatch) {
    if (p0 > 0) {
#pragma unroll
      for (int b = 0; b < kLoadBatch; ++b) {
        if (p0 + b < packs_total) load(p0 + b, packs[b]);
      }
    }
#pragma unroll
    for (int b = 0; b < kLoadBatch; ++b) {
      const int64_t p = p0 + b;
      if (p < packs_total) {
        const float* s = scaled + p * kVec;  // p·8 = j·R + (p % (R/8))·8
        if (args.weights[first_pair + p / packs_per_expert] != 0.0f) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) acc += s[e] * ToFloat(packs[b].values[e]);
        }
      }
    }
  }
  T* out = static_cast<T*>(target.out) + blockIdx.y * target.out_stride + column;
  *out = FromFloat<T>(ToFloat(*out) + acc);
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
  const int64_t splits = CeilDiv(args.in, kSplitElements);
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
      SparseShrinkKernel<T><<<shrink_grid, kThreads, 0, stream>>>(args);
      if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
      const dim3 expand_grid(static_cast<unsigned>(tiles), static_cast<unsigned>(args.tokens));
      if (column_room) {
        SparseExpandColumnRoomKernel<T><<<expand_grid, kThreads, 0, stream>>>(args, splits);
      } else {
        SparseExpandRowMajorKernel<T><<<expand_grid, kThreads, 0, stream>>>(args, splits);
      }
      return cudaGetLastError();
    }
  });
}

}  // namespace moelora::kernels
