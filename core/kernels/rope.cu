#include <cstdint>

#include "core/kernels/dependent_launch.cuh"
#include "core/kernels/element.cuh"
#include "core/kernels/rope.h"

namespace moelora::kernels {
namespace {

constexpr int kThreads = 128;

template <typename T>
__device__ __forceinline__ T Round(float v) {
  return FromFloat<T>(v);
}

// out[i] = x[i]·cos + rotate_half(x)[i]·sin for the pair (i, i + half), rotate_half(x) =
// [-x2, x1], each product and the sum rounded to T, as ATen's three ops round.
template <typename T>
__device__ __forceinline__ void Rotate(const T* x, float cos, float sin, int half, int i, T* out) {
  // __fmul_rn / __fadd_rn: never contracted into an FMA, which would round once where ATen
  // rounds twice (fp32 models).
  const float x1 = ToFloat(x[i]), x2 = ToFloat(x[i + half]);
  const float low =
      __fadd_rn(ToFloat(Round<T>(__fmul_rn(x1, cos))), ToFloat(Round<T>(__fmul_rn(-x2, sin))));
  const float high =
      __fadd_rn(ToFloat(Round<T>(__fmul_rn(x2, cos))), ToFloat(Round<T>(__fmul_rn(x1, sin))));
  out[i] = Round<T>(low);
  out[i + half] = Round<T>(high);
}

// Blocks of (token, chunk of pairs); each thread takes one (head, i < head_dim / 2) pair of the
// queries, then the keys (rotated into the cache), then the values (copied into the cache). One
// block per token looped over every pair and left a decode step's few tokens on a few SMs.
template <typename T>
__global__ void __launch_bounds__(kThreads) RopeKernel(RopeArgs args) {
  AwaitPrerequisitesThenAllowDependents();
  const int64_t t = blockIdx.x;
  const int half = static_cast<int>(args.head_dim / 2);
  const int query_pairs = static_cast<int>(args.heads) * half;
  const int key_pairs = static_cast<int>(args.kv_heads) * half;
  const int p = static_cast<int>(blockIdx.y) * kThreads + static_cast<int>(threadIdx.x);
  if (p >= query_pairs + 2 * key_pairs) return;
  // The pair's angle as RopeCosSin computes it: the position in fp32 times the frequency, its
  // cos and sin (accurate cosf and sinf, as ATen's) rounded to T.
  const int i = p < query_pairs ? p % half : (p - query_pairs) % half;
  const float angle = __fmul_rn(static_cast<float>(args.positions[t]), args.inv_freq[i]);
  const float cos = ToFloat(Round<T>(cosf(angle))), sin = ToFloat(Round<T>(sinf(angle)));
  const int64_t cache_row =
      (args.slots[t] * args.max_seq + args.positions[t]) * args.kv_heads * args.head_dim;
  if (p < query_pairs) {
    const int offset = (p / half) * static_cast<int>(args.head_dim);
    Rotate(static_cast<const T*>(args.queries) + t * args.queries_stride + offset, cos, sin, half,
           i, static_cast<T*>(args.rotated_queries) + t * args.heads * args.head_dim + offset);
  } else if (p < query_pairs + key_pairs) {
    const int q = p - query_pairs;
    const int offset = (q / half) * static_cast<int>(args.head_dim);
    Rotate(static_cast<const T*>(args.keys) + t * args.keys_stride + offset, cos, sin, half, i,
           static_cast<T*>(args.key_cache) + cache_row + offset);
  } else {
    const int q = p - query_pairs - key_pairs;
    const int offset = (q / half) * static_cast<int>(args.head_dim) + q % half;
    const T* values = static_cast<const T*>(args.values) + t * args.values_stride + offset;
    T* value_cache = static_cast<T*>(args.value_cache) + cache_row + offset;
    value_cache[0] = values[0];
    value_cache[half] = values[half];
  }
}

template <typename T>
cudaError_t Launch(const RopeArgs& args, cudaStream_t stream) {
  const int64_t pairs = (args.heads + 2 * args.kv_heads) * (args.head_dim / 2);
  const dim3 grid(static_cast<unsigned>(args.tokens),
                  static_cast<unsigned>((pairs + kThreads - 1) / kThreads));
  return LaunchDependent(RopeKernel<T>, grid, dim3(kThreads), 0, stream, args);
}

}  // namespace

cudaError_t LaunchRopeAndCacheWrite(const RopeArgs& args, cudaStream_t stream) {
  if (args.tokens <= 0) return cudaSuccess;
  if (args.head_dim % 2 != 0) return cudaErrorInvalidValue;
  return WithElementType(args.type,
                         [&](auto element) { return Launch<decltype(element)>(args, stream); });
}

}  // namespace moelora::kernels
