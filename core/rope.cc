#include "core/rope.h"

#include <ATen/ATen.h>

#ifdef MOELORA_HAVE_CUDA_KERNELS
#include <ATen/core/grad_mode.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <initializer_list>

#include "core/kernel_element_type.h"
#include "core/kernels/rope.h"
#endif

namespace moelora {
namespace {

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

#ifdef MOELORA_HAVE_CUDA_KERNELS
// The kernel's rotation and cache writes, or undefined (nothing done) where it does not apply.
at::Tensor KernelRotateAndCache(const at::Tensor& queries, const at::Tensor& keys,
                                const at::Tensor& values, const at::Tensor& inv_freq,
                                const at::Tensor& key_cache, const at::Tensor& value_cache,
                                const at::Tensor& slots, const at::Tensor& positions) {
  const at::ScalarType dtype = queries.scalar_type();
  if (!queries.is_cuda() || (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) ||
      queries.dim() != 3 || keys.dim() != 3 || values.dim() != 3 || key_cache.dim() != 4 ||
      keys.sizes() != values.sizes() || key_cache.sizes() != value_cache.sizes()) {
    return at::Tensor();
  }
  const int64_t tokens = queries.size(0), head_dim = queries.size(2);
  if (head_dim % 2 != 0 || keys.size(0) != tokens || keys.size(2) != head_dim ||
      key_cache.size(2) != keys.size(1) || key_cache.size(3) != head_dim || inv_freq.dim() != 1 ||
      inv_freq.size(0) != head_dim / 2 || inv_freq.scalar_type() != at::kFloat ||
      slots.numel() != tokens || positions.numel() != tokens || slots.scalar_type() != at::kLong ||
      positions.scalar_type() != at::kLong) {
    return at::Tensor();
  }
  for (const at::Tensor* t : {&queries, &keys, &values}) {
    // Each token's heads contiguous; tokens any distance apart.
    if (t->stride(2) != 1 || t->stride(1) != head_dim) return at::Tensor();
  }
  for (const at::Tensor* t :
       {&queries, &keys, &values, &inv_freq, &key_cache, &value_cache, &slots, &positions}) {
    if (!t->is_cuda() || t->device() != queries.device()) return at::Tensor();
    if (t != &slots && t != &positions && t != &inv_freq && t->scalar_type() != dtype) {
      return at::Tensor();
    }
    if (at::GradMode::is_enabled() && t->requires_grad()) return at::Tensor();
  }
  if (!inv_freq.is_contiguous() || !key_cache.is_contiguous() || !value_cache.is_contiguous()) {
    return at::Tensor();
  }
  const at::Tensor slot_ids = slots.contiguous(), token_positions = positions.contiguous();
  at::Tensor rotated = at::empty(queries.sizes(), queries.options());
  kernels::RopeArgs args;
  args.type = *KernelElementType(dtype);  // checked above
  args.tokens = tokens;
  args.heads = queries.size(1);
  args.kv_heads = keys.size(1);
  args.head_dim = head_dim;
  args.queries = queries.data_ptr();
  args.queries_stride = queries.stride(0);
  args.keys = keys.data_ptr();
  args.keys_stride = keys.stride(0);
  args.values = values.data_ptr();
  args.values_stride = values.stride(0);
  args.inv_freq = inv_freq.data_ptr<float>();
  args.rotated_queries = rotated.data_ptr();
  args.key_cache = key_cache.data_ptr();
  args.value_cache = value_cache.data_ptr();
  args.max_seq = key_cache.size(1);
  args.slots = slot_ids.data_ptr<int64_t>();
  args.positions = token_positions.data_ptr<int64_t>();
  const cudaError_t error = kernels::LaunchRopeAndCacheWrite(
      args, c10::cuda::getCurrentCUDAStream(queries.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "RoPE kernel: ", cudaGetErrorString(error));
  return rotated;
}
#endif

}  // namespace

at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x * cos.unsqueeze(1) + RotateHalf(x) * sin.unsqueeze(1);
}

std::pair<at::Tensor, at::Tensor> RopeCosSin(const at::Tensor& positions,
                                             const at::Tensor& inv_freq, at::ScalarType dtype) {
  const at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);
  const at::Tensor angles = at::cat({freqs, freqs}, -1);
  return {angles.cos().to(dtype), angles.sin().to(dtype)};
}

at::Tensor RotateAndCache(const at::Tensor& queries, const at::Tensor& keys,
                          const at::Tensor& values, const at::Tensor& inv_freq,
                          const at::Tensor& key_cache, const at::Tensor& value_cache,
                          const at::Tensor& slots, const at::Tensor& positions) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  if (at::Tensor rotated = KernelRotateAndCache(queries, keys, values, inv_freq, key_cache,
                                                value_cache, slots, positions);
      rotated.defined()) {
    return rotated;
  }
#endif
  const auto [cos, sin] = RopeCosSin(positions, inv_freq, queries.scalar_type());
  at::Tensor cache_keys = key_cache, cache_values = value_cache;
  cache_keys.index_put_({slots, positions}, ApplyRope(keys, cos, sin));
  cache_values.index_put_({slots, positions}, values);
  return ApplyRope(queries, cos, sin);
}

}  // namespace moelora
