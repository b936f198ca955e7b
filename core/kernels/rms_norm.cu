#include <cstdint>

#include "core/kernels/dependent_launch.cuh"
#include "core/kernels/element.cuh"
#include "core/kernels/rms_norm.h"

namespace moelora::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;

__device__ __forceinline__ float BlockSum(float value) {
  __shared__ float warp_sums[kThreads / kWarpSize];
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kThreads / kWarpSize; ++w) total += warp_sums[w];
  return total;
}

// One block per row; each thread reads kVec consecutive elements per access. The second pass
// re-reads the row (x, or the sum this thread wrote) from L1/L2 (a row is a few KB).
template <typename T, typename W, int kVec>
__global__ void __launch_bounds__(kThreads) RmsNormKernel(RmsNormArgs args) {
  using P = Pack<T, kVec>;
  const int64_t cols = args.cols;
  const T* row = static_cast<const T*>(args.x) + static_cast<int64_t>(blockIdx.x) * args.x_stride;
  const T* residual_row = static_cast<const T*>(args.residual) +
                          static_cast<int64_t>(blockIdx.x) * args.residual_stride;
  T* sum_row = static_cast<T*>(args.sum) + static_cast<int64_t>(blockIdx.x) * args.sum_stride;
  T* out_row = static_cast<T*>(args.out) + static_cast<int64_t>(blockIdx.x) * args.out_stride;
  T* copy_row =
      static_cast<T*>(args.out_copy) + static_cast<int64_t>(blockIdx.x) * args.out_copy_stride;
  const bool has_copy = args.out_copy != nullptr;
  const W* weight = static_cast<const W*>(args.weight);
  const bool has_residual = args.residual != nullptr;
  // The weight is the only input ready before the kernel before this one ends
  // (dependent_launch.cuh).
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < cols; c += kThreads * kVec) {
    PrefetchToL2(weight + c);
  }
  AwaitPrerequisitesThenAllowDependents();
  float squares = 0.0f;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < cols; c += kThreads * kVec) {
    P p = *reinterpret_cast<const P*>(row + c);
    if (has_residual) {
      const P r = *reinterpret_cast<const P*>(residual_row + c);
#pragma unroll
      for (int v = 0; v < kVec; ++v) {
        p.values[v] = FromFloat<T>(ToFloat(p.values[v]) + ToFloat(r.values[v]));
      }
      *reinterpret_cast<P*>(sum_row + c) = p;
    }
#pragma unroll
    for (int v = 0; v < kVec; ++v) squares += ToFloat(p.values[v]) * ToFloat(p.values[v]);
  }
  const float inverse_rms = rsqrtf(BlockSum(squares) / static_cast<float>(cols) + args.eps);
  const T* normed_row = has_residual ? sum_row : row;
  for (int64_t c = static_cast<int64_t>(threadIdx.x) * kVec; c < cols; c += kThreads * kVec) {
    const P p = *reinterpret_cast<const P*>(normed_row + c);
    P result;
#pragma unroll
    for (int v = 0; v < kVec; ++v) {
      float normed = ToFloat(p.values[v]) * inverse_rms;
      if (args.round_before_weight) normed = ToFloat(FromFloat<T>(normed));
      result.values[v] = FromFloat<T>(normed * ToFloat(weight[c + v]));
    }
    *reinterpret_cast<P*>(out_row + c) = result;
    if (has_copy) *reinterpret_cast<P*>(copy_row + c) = result;
  }
}

template <typename T, typename W, int kVec>
cudaError_t LaunchWith(const RmsNormArgs& args, cudaStream_t stream) {
  return LaunchDependent(RmsNormKernel<T, W, kVec>, dim3(static_cast<unsigned>(args.rows)),
                         dim3(kThreads), 0, stream, args);
}

template <typename T, typename W>
cudaError_t LaunchTyped(const RmsNormArgs& args, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vectorised =
      args.cols % kVec == 0 && Aligned(args.x, args.x_stride, kVec, sizeof(T)) &&
      Aligned(args.out, args.out_stride, kVec, sizeof(T)) &&
      (args.out_copy == nullptr || Aligned(args.out_copy, args.out_copy_stride, kVec, sizeof(T))) &&
      (args.residual == nullptr || (Aligned(args.residual, args.residual_stride, kVec, sizeof(T)) &&
                                    Aligned(args.sum, args.sum_stride, kVec, sizeof(T))));
  return vectorised ? LaunchWith<T, W, kVec>(args, stream) : LaunchWith<T, W, 1>(args, stream);
}

}  // namespace

cudaError_t LaunchRmsNorm(const RmsNormArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.cols <= 0) return cudaSuccess;
  return WithElementType(args.type, [&](auto element) {
    return WithElementType(args.weight_type, [&](auto weight) {
      return LaunchTyped<decltype(element), decltype(weight)>(args, stream);
    });
  });
}

}  // namespace moelora::kernels
