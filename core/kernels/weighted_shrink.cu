#include <cstdint>

#include "core/kernels/element.cuh"
#include "core/kernels/weighted_shrink.h"

namespace moelora::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
// A block stages kTokens tokens' x in shared memory (kChunkBytes of it at a time); each warp
// takes one row of A, its lanes splitting the columns, and sums across lanes at the end. The
// kernel is latency-bound at decode sizes (a few hundred KB), so each thread issues a phase's
// global loads before using any of them, and a warp's row of A is requested before x is staged.
constexpr int kTokens = 8;
constexpr int kChunkBytes = 32 * 1024;

template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> LoadOrZeros(const T* p, bool valid) {
  if (valid) return *reinterpret_cast<const Pack<T, kVec>*>(p);
  Pack<T, kVec> zeros;
#pragma unroll
  for (int v = 0; v < kVec; ++v) zeros.values[v] = FromFloat<T>(0.0f);
  return zeros;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) WeightedShrinkKernel(WeightedShrinkArgs args) {
  constexpr int kChunkCols = kChunkBytes / kTokens / sizeof(T);
  constexpr int kPacksPerRow = kChunkCols / kVec;
  constexpr int kStagePacks = kTokens * kPacksPerRow / kThreads;  // per thread
  constexpr int kLanePacks = kPacksPerRow / kWarpSize;            // of a row of A, per lane
  constexpr int kStageBatch = kStagePacks < 8 ? kStagePacks : 8;
  constexpr int kLaneBatch = kLanePacks < 8 ? kLanePacks : 8;
  using P = Pack<T, kVec>;
  __shared__ P staged[kTokens][kPacksPerRow];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  // This warp's row among all targets' rows, then its target and its row there.
  int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  int target = 0;
  while (target + 1 < args.count && row >= args.targets[target].rows) {
    row -= args.targets[target].rows;
    ++target;
  }
  const ShrinkTarget& part = args.targets[target];
  const bool has_row = row < part.rows;
  const int64_t first_token = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int count = static_cast<int>(min(static_cast<int64_t>(kTokens), args.tokens - first_token));
  const T* x = static_cast<const T*>(args.x.data);
  const T* a_row = static_cast<const T*>(part.a.data) + (has_row ? row * part.a.row_stride : 0);

  // Lane t's routing weight for token t, read now so that its latency hides behind the rest.
  float weight = 0.0f;
  if (has_row && lane < count) {
    weight = ToFloat(static_cast<const T*>(
        args.weights.data)[(first_token + lane) * args.weights.row_stride + row]);
  }
  float sums[kTokens] = {};
  for (int64_t chunk_start = 0; chunk_start < args.in; chunk_start += kChunkCols) {
    P first[kLaneBatch];
#pragma unroll
    for (int u = 0; u < kLaneBatch; ++u) {
      const int64_t col = chunk_start + static_cast<int64_t>(u * kWarpSize + lane) * kVec;
      first[u] = LoadOrZeros<T, kVec>(a_row + col, has_row && col < args.in);
    }
    __syncthreads();  // the previous chunk has been read
    for (int base = 0; base < kStagePacks; base += kStageBatch) {
      P loaded[kStageBatch];
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int i = (base + u) * kThreads + threadIdx.x;
        const int t = i / kPacksPerRow;
        const int64_t col = chunk_start + static_cast<int64_t>(i % kPacksPerRow) * kVec;
        loaded[u] = LoadOrZeros<T, kVec>(x + (first_token + t) * args.x.row_stride + col,
                                         t < count && col < args.in);
      }
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int i = (base + u) * kThreads + threadIdx.x;
        staged[i / kPacksPerRow][i % kPacksPerRow] = loaded[u];
      }
    }
    __syncthreads();
    if (!has_row) continue;
    for (int base = 0; base < kLanePacks; base += kLaneBatch) {
      P pa[kLaneBatch];
#pragma unroll
      for (int u = 0; u < kLaneBatch; ++u) {
        const int64_t col =
            chunk_start + static_cast<int64_t>((base + u) * kWarpSize + lane) * kVec;
        pa[u] = base == 0 ? first[u] : LoadOrZeros<T, kVec>(a_row + col, col < args.in);
      }
#pragma unroll
      for (int u = 0; u < kLaneBatch; ++u) {
        const int pack = (base + u) * kWarpSize + lane;
#pragma unroll
        for (int t = 0; t < kTokens; ++t) {
          const P px = staged[t][pack];
#pragma unroll
          for (int v = 0; v < kVec; ++v) {
            sums[t] += ToFloat(pa[u].values[v]) * ToFloat(px.values[v]);
          }
        }
      }
    }
  }
  if (!has_row) return;
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      sums[t] += __shfl_xor_sync(kFullMask, sums[t], offset);
    }
  }
  // Every lane holds every sum; lane t writes token t's, rounded as the GEMM's output and the
  // multiply's would be.
  T* out = static_cast<T*>(part.out);
#pragma unroll
  for (int t = 0; t < kTokens; ++t) {
    if (t < count && lane == t) {
      const float shrunk = ToFloat(FromFloat<T>(sums[t]));
      out[(first_token + t) * part.out_stride + row] = FromFloat<T>(shrunk * weight);
    }
  }
}

template <typename T, int kVec>
cudaError_t LaunchWith(const WeightedShrinkArgs& args, int64_t rows, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((rows + kWarps - 1) / kWarps),
                  static_cast<unsigned>((args.tokens + kTokens - 1) / kTokens));
  WeightedShrinkKernel<T, kVec><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchWeightedShrink(const WeightedShrinkArgs& args, cudaStream_t stream) {
  if (args.count < 1 || args.count > kMaxShrinkTargets || args.tokens > kWeightedShrinkMaxTokens) {
    return cudaErrorInvalidValue;
  }
  int64_t rows = 0;
  for (int i = 0; i < args.count; ++i) rows += args.targets[i].rows;
  if (rows > kWeightedShrinkMaxRows) return cudaErrorInvalidValue;
  if (args.tokens <= 0 || rows <= 0 || args.in <= 0) return cudaSuccess;
  return WithElementType(args.type, [&](auto element) {
    using T = decltype(element);
    constexpr int kVec = 16 / sizeof(T);
    bool vectorised =
        args.in % kVec == 0 && Aligned(args.x.data, args.x.row_stride, kVec, sizeof(T));
    for (int i = 0; i < args.count; ++i) {
      vectorised = vectorised &&
                   Aligned(args.targets[i].a.data, args.targets[i].a.row_stride, kVec, sizeof(T));
    }
    return vectorised ? LaunchWith<T, kVec>(args, rows, stream)
                      : LaunchWith<T, 1>(args, rows, stream);
  });
}

}  // namespace moelora::kernels
