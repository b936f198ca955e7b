// Device helpers shared by our kernels: element conversions through fp32 and aligned packs.

#ifndef MOELORA_CORE_KERNELS_ELEMENT_CUH_
#define MOELORA_CORE_KERNELS_ELEMENT_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

__device__ __forceinline__ float ToFloat(float v) { return v; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

// Rounds to nearest even, as ATen does.
template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ float FromFloat<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

// Calls f with a value of the CUDA type `type` names (f(float{}), f(__nv_bfloat16{}), ...), so a
// launcher dispatches with one generic lambda; cudaErrorInvalidValue for a type not listed.
template <typename F>
cudaError_t WithElementType(ElementType type, F&& f) {
  switch (type) {
    case ElementType::kFloat:
      return f(float{});
    case ElementType::kBFloat16:
      return f(__nv_bfloat16{});
    case ElementType::kHalf:
      return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// Whether a matrix at `data` with rows `row_stride` elements apart can be read in packs of `vec`
// elements of `element_bytes` each (the 16-byte accesses of the vectorised kernels).
inline bool Aligned(const void* data, int64_t row_stride, int64_t vec, int64_t element_bytes) {
  return reinterpret_cast<uintptr_t>(data) % (vec * element_bytes) == 0 && row_stride % vec == 0;
}

// Two elements in 32 bits (the first in the low half) to fp32 and back, rounding to nearest even:
// whole registers throughout, where a Pack's 16-bit members took one each (weighted_expand.cu's
// staging took 157).
__device__ __forceinline__ float2 Unpair(uint32_t bits, __nv_bfloat16) {
  return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}
__device__ __forceinline__ float2 Unpair(uint32_t bits, __half) {
  __half2 pair;
  memcpy(&pair, &bits, sizeof(bits));
  return __half22float2(pair);
}
__device__ __forceinline__ uint32_t Pair(float lo, float hi, __nv_bfloat16) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}
__device__ __forceinline__ uint32_t Pair(float lo, float hi, __half) {
  const __half2 pair = __floats2half2_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// kVec consecutive elements, loaded and stored in one access.
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T values[kVec];
};

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_ELEMENT_CUH_
