#include <algorithm>
#include <cmath>

#include "core/kernels/dependent_launch.cuh"
#include "core/kernels/element.cuh"
#include "core/kernels/row_strided.h"

namespace moelora::kernels {
namespace {

constexpr int kThreadsPerBlock = 256;
// Enough blocks to fill any current GPU several times over; larger matrices loop (grid-stride).
constexpr int64_t kMaxBlocks = 4096;
constexpr int kAccessBytes = 16;

// The activations as ATen's CUDA kernels write them, in fp32.
__device__ __forceinline__ float Silu(float x) { return x / (1.0f + expf(-x)); }
__device__ __forceinline__ float GeluTanh(float x) {
  constexpr float kBeta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5);
  constexpr float kKappa = 0.044715f;
  const float inner = kBeta * (x + kKappa * (x * x * x));
  return 0.5f * x * (1.0f + tanhf(inner));
}
__device__ __forceinline__ float Gelu(float x) {
  constexpr float kAlpha = static_cast<float>(M_SQRT1_2);
  return x * 0.5f * (1.0f + erff(x * kAlpha));
}

template <typename T, BinaryOp kOp>
__device__ __forceinline__ float Combine(float a, float b) {
  if constexpr (kOp == BinaryOp::kAdd) {
    return a + b;
  } else if constexpr (kOp == BinaryOp::kMultiply) {
    return a * b;
  } else if constexpr (kOp == BinaryOp::kSiluTimes) {
    return ToFloat(FromFloat<T>(Silu(a))) * b;
  } else if constexpr (kOp == BinaryOp::kGeluTanhTimes) {
    return ToFloat(FromFloat<T>(GeluTanh(a))) * b;
  } else {
    return ToFloat(FromFloat<T>(Gelu(a))) * b;
  }
}

// Each thread handles kVec consecutive elements of one row per step; the grid strides over the
// rows * cols / kVec packs.
template <typename T, int kVec, BinaryOp kOp>
__global__ void __launch_bounds__(kThreadsPerBlock)
    RowStridedBinaryKernel(int64_t rows, int64_t packs_per_row, T* out, int64_t out_stride,
                           const T* a, int64_t a_stride, const T* b, int64_t b_stride) {
  AwaitPrerequisitesThenAllowDependents();
  using P = Pack<T, kVec>;
  const int64_t packs = rows * packs_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < packs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / packs_per_row;
    const int64_t col = (i - row * packs_per_row) * kVec;
    const P pa = *reinterpret_cast<const P*>(a + row * a_stride + col);
    const P pb = *reinterpret_cast<const P*>(b + row * b_stride + col);
    P result;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      result.values[k] =
          FromFloat<T>(Combine<T, kOp>(ToFloat(pa.values[k]), ToFloat(pb.values[k])));
    }
    *reinterpret_cast<P*>(out + row * out_stride + col) = result;
  }
}

template <typename T, int kVec, BinaryOp kOp>
cudaError_t Launch(int64_t rows, int64_t cols, RowStridedOperand out, RowStridedOperand a,
                   RowStridedOperand b, cudaStream_t stream) {
  const int64_t packs_per_row = cols / kVec;
  const int64_t packs = rows * packs_per_row;
  const int64_t blocks =
      std::min<int64_t>((packs + kThreadsPerBlock - 1) / kThreadsPerBlock, kMaxBlocks);
  return LaunchDependent(RowStridedBinaryKernel<T, kVec, kOp>, dim3(static_cast<unsigned>(blocks)),
                         dim3(kThreadsPerBlock), 0, stream, rows, packs_per_row,
                         static_cast<T*>(out.data), out.row_stride, static_cast<const T*>(a.data),
                         a.row_stride, static_cast<const T*>(b.data), b.row_stride);
}

template <typename T, BinaryOp kOp>
cudaError_t LaunchWidest(int64_t rows, int64_t cols, RowStridedOperand out, RowStridedOperand a,
                         RowStridedOperand b, cudaStream_t stream) {
  constexpr int kVec = kAccessBytes / sizeof(T);
  const bool vectorised = cols % kVec == 0 && Aligned(out.data, out.row_stride, kVec, sizeof(T)) &&
                          Aligned(a.data, a.row_stride, kVec, sizeof(T)) &&
                          Aligned(b.data, b.row_stride, kVec, sizeof(T));
  return vectorised ? Launch<T, kVec, kOp>(rows, cols, out, a, b, stream)
                    : Launch<T, 1, kOp>(rows, cols, out, a, b, stream);
}

template <typename T>
cudaError_t LaunchForType(BinaryOp op, int64_t rows, int64_t cols, RowStridedOperand out,
                          RowStridedOperand a, RowStridedOperand b, cudaStream_t stream) {
  switch (op) {
    case BinaryOp::kAdd:
      return LaunchWidest<T, BinaryOp::kAdd>(rows, cols, out, a, b, stream);
    case BinaryOp::kMultiply:
      return LaunchWidest<T, BinaryOp::kMultiply>(rows, cols, out, a, b, stream);
    case BinaryOp::kSiluTimes:
      return LaunchWidest<T, BinaryOp::kSiluTimes>(rows, cols, out, a, b, stream);
    case BinaryOp::kGeluTanhTimes:
      return LaunchWidest<T, BinaryOp::kGeluTanhTimes>(rows, cols, out, a, b, stream);
    case BinaryOp::kGeluTimes:
      return LaunchWidest<T, BinaryOp::kGeluTimes>(rows, cols, out, a, b, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t LaunchRowStridedBinary(BinaryOp op, ElementType type, int64_t rows, int64_t cols,
                                   RowStridedOperand out, RowStridedOperand a, RowStridedOperand b,
                                   cudaStream_t stream) {
  if (rows <= 0 || cols <= 0) return cudaSuccess;
  return WithElementType(type, [&](auto element) {
    return LaunchForType<decltype(element)>(op, rows, cols, out, a, b, stream);
  });
}

}  // namespace moelora::kernels
