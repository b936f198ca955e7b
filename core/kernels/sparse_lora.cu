// Sparse-routing LoRA, laid out for a decode step's latency: every (token, expert) pair reads
// only its own rows, so the work is many small independent dot products and column sums; what
// counts is keeping enough loads in flight and launching few blocks that idle.
//
// Shrink, grid (pairs, splits of `in`): a block of 4 warps takes kSplitElements of `in` for one
// pair; each warp takes a batch of 4 rank rows at a time, its lanes loading every pack of the
// batch (8 × 16 bytes) before any product, then one shuffle reduction per row. Partial sums go
// to the workspace [split][pair][rank] in fp32 (no atomics: a fixed order, deterministic).
// Expand, grid (column tiles of 128, tokens): the block first adds the splits of its token's
// pairs and rounds them (round(round(s)·round(w)), as the dense path's GEMM and multiply round)
// into shared memory, then each thread sums one output column over the token's experts' rank rows
// in fp32 and rounds once into the output. Bᵀ with unit column stride is read row by row
// (coalesced across the warp); Bᵀ in a column room (unit row stride) is read as each column's
// rank rows in 16-byte packs. A pair of weight 0 reads nothing in either kernel.

#include <cstdint>
#include <type_traits>

#include "core/kernels/element.cuh"
#include "core/kernels/sparse_lora.h"

namespace moelora::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kShrinkWarps = 4;
constexpr int kShrinkThreads = kShrinkWarps * kWarpSize;
constexpr int kVec = 8;  // elements per 16-byte pack (bf16, fp16)
constexpr int kElementBytes = 2;
constexpr int64_t kSplitElements = 512;  // of `in` per shrink block
constexpr int kPacksPerLane = kSplitElements / kVec / kWarpSize;
constexpr int kRowBatch = 4;  // rank rows a warp loads before reducing
constexpr int kExpandThreads = 128;

constexpr int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
__device__ __forceinline__ Pack<T, kVec> LoadPack(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T, kVec> pack;
  static_assert(sizeof(pack) == sizeof(raw));
  memcpy(&pack, &raw, sizeof(raw));
  return pack;
}

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads) SparseShrinkKernel(const SparseLoraArgs args) {
  const int64_t pair = blockIdx.x;
  if (args.weights[pair] == 0.0f) return;  // the expand reads nothing of this pair
  const int64_t pairs = args.tokens * args.experts_per_token;
  const int64_t split = blockIdx.y;
  const int64_t token = pair / args.experts_per_token;
  const int64_t begin = split * kSplitElements;
  const int64_t count = min(kSplitElements, args.in - begin);
  const T* x = static_cast<const T*>(args.x.data) + token * args.x.row_stride + begin;
  const T* a = static_cast<const T*>(args.a.data) + args.slots[pair] * args.a.slot_stride + begin;
  float* partial = args.workspace + (split * pairs + pair) * args.rank;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;

  Pack<T, kVec> xs[kPacksPerLane];
  bool valid[kPacksPerLane];
#pragma unroll
  for (int p = 0; p < kPacksPerLane; ++p) {
    const int64_t e = (lane + p * kWarpSize) * kVec;
    valid[p] = e < count;
    if (valid[p]) xs[p] = LoadPack(x + e);
  }
  for (int64_t r0 = warp * kRowBatch; r0 < args.rank; r0 += kShrinkWarps * kRowBatch) {
    Pack<T, kVec> rows[kRowBatch][kPacksPerLane];
#pragma unroll
    for (int b = 0; b < kRowBatch; ++b) {
#pragma unroll
      for (int p = 0; p < kPacksPerLane; ++p) {
        if (r0 + b < args.rank && valid[p]) {
          rows[b][p] = LoadPack(a + (r0 + b) * args.a.row_stride + (lane + p * kWarpSize) * kVec);
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

template <typename T, bool kRowsContiguous>
__global__ void __launch_bounds__(kExpandThreads)
    SparseExpandKernel(const SparseLoraArgs args, const int64_t splits) {
  __shared__ float scaled[kSparseLoraMaxExpertsPerToken * kSparseLoraMaxRank];
  __shared__ int64_t slots[kSparseLoraMaxExpertsPerToken];
  __shared__ bool live[kSparseLoraMaxExpertsPerToken];
  const int64_t k = args.experts_per_token, rank = args.rank;
  const int64_t pairs = args.tokens * k;
  const int64_t first_pair = blockIdx.y * k;
  for (int64_t i = threadIdx.x; i < k * rank; i += kExpandThreads) {
    const float w = args.weights[first_pair + i / rank];
    float value = 0.0f;
    if (w != 0.0f) {
      float sum = 0.0f;
      for (int64_t s = 0; s < splits; ++s) {
        sum += args.workspace[(s * pairs + first_pair) * rank + i];
      }
      value = ToFloat(FromFloat<T>(ToFloat(FromFloat<T>(sum)) * ToFloat(FromFloat<T>(w))));
    }
    scaled[i] = value;
  }
  if (threadIdx.x < k) {
    slots[threadIdx.x] = args.slots[first_pair + threadIdx.x];
    live[threadIdx.x] = args.weights[first_pair + threadIdx.x] != 0.0f;
  }
  __syncthreads();
  const int64_t column = blockIdx.x * kExpandThreads + threadIdx.x;
  if (column >= args.out) return;
  float acc = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    if (!live[j]) continue;
    const T* bt = static_cast<const T*>(args.bt.data) + slots[j] * args.bt.slot_stride +
                  column * args.bt.column_stride;
    const float* s = scaled + j * rank;
    if constexpr (kRowsContiguous) {
      for (int64_t r = 0; r < rank; r += kVec) {
        const Pack<T, kVec> values = LoadPack(bt + r);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc += s[r + e] * ToFloat(values.values[e]);
      }
    } else {
#pragma unroll 8
      for (int64_t r = 0; r < rank; ++r) acc += s[r] * ToFloat(__ldg(bt + r * args.bt.row_stride));
    }
  }
  T* out = static_cast<T*>(args.out_data) + blockIdx.y * args.out_stride + column;
  *out = FromFloat<T>(ToFloat(*out) + acc);
}

bool PackedRowsOfBt(const SlotStack& bt) { return bt.column_stride != 1 && bt.row_stride == 1; }

}  // namespace

int64_t SparseLoraWorkspaceFloats(const SparseLoraArgs& args) {
  return CeilDiv(args.in, kSplitElements) * args.tokens * args.experts_per_token * args.rank;
}

bool SparseLoraTakes(const SparseLoraArgs& args) {
  if (args.type != ElementType::kBFloat16 && args.type != ElementType::kHalf) return false;
  if (args.tokens < 1 || args.tokens > kSparseLoraMaxTokens) return false;
  if (args.experts_per_token < 1 || args.experts_per_token > kSparseLoraMaxExpertsPerToken) {
    return false;
  }
  if (args.rank < 1 || args.rank > kSparseLoraMaxRank || args.in < 1 || args.in % kVec != 0 ||
      args.out < 1) {
    return false;
  }
  if (args.slots == nullptr || args.weights == nullptr || args.out_data == nullptr) return false;
  if (!Aligned(args.x.data, args.x.row_stride, kVec, kElementBytes)) return false;
  if (args.a.column_stride != 1 || args.a.slot_stride % kVec != 0 ||
      !Aligned(args.a.data, args.a.row_stride, kVec, kElementBytes)) {
    return false;
  }
  if (PackedRowsOfBt(args.bt)) {
    return args.rank % kVec == 0 && args.bt.slot_stride % kVec == 0 &&
           Aligned(args.bt.data, args.bt.column_stride, kVec, kElementBytes);
  }
  return args.bt.column_stride == 1;
}

cudaError_t LaunchSparseLora(const SparseLoraArgs& args, cudaStream_t stream) {
  if (!SparseLoraTakes(args) || args.workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t splits = CeilDiv(args.in, kSplitElements);
  return WithElementType(args.type, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      const dim3 shrink_grid(static_cast<unsigned>(args.tokens * args.experts_per_token),
                             static_cast<unsigned>(splits));
      SparseShrinkKernel<T><<<shrink_grid, kShrinkThreads, 0, stream>>>(args);
      if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
      const dim3 expand_grid(static_cast<unsigned>(CeilDiv(args.out, kExpandThreads)),
                             static_cast<unsigned>(args.tokens));
      if (PackedRowsOfBt(args.bt)) {
        SparseExpandKernel<T, true><<<expand_grid, kExpandThreads, 0, stream>>>(args, splits);
      } else {
        SparseExpandKernel<T, false><<<expand_grid, kExpandThreads, 0, stream>>>(args, splits);
      }
      return cudaGetLastError();
    }
  });
}

}  // namespace moelora::kernels
