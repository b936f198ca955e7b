#include "core/decode_attention.h"

#include <ATen/ATen.h>

#ifdef MOELORA_HAVE_CUDA_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "core/kernel_element_type.h"
#include "core/kernels/decode_attention.h"
#endif

namespace moelora {

at::Tensor DecodeAttentionFromCache(const at::Tensor& queries, const at::Tensor& keys,
                                    const at::Tensor& values, const at::Tensor& slots,
                                    const at::Tensor& positions, int64_t sliding_window,
                                    double scale, int64_t max_keys) {
#ifdef MOELORA_HAVE_CUDA_KERNELS
  const at::ScalarType dtype = queries.scalar_type();
  if (!queries.is_cuda() || queries.dim() != 3 || keys.dim() != 4 ||
      (dtype != at::kBFloat16 && dtype != at::kHalf) || queries.requires_grad() ||
      keys.scalar_type() != dtype || values.scalar_type() != dtype || !keys.is_contiguous() ||
      !values.is_contiguous() || keys.sizes() != values.sizes() ||
      slots.scalar_type() != at::kLong || positions.scalar_type() != at::kLong ||
      slots.numel() != queries.size(0) || positions.numel() != queries.size(0) ||
      keys.size(3) != queries.size(2) || max_keys < 1) {
    return at::Tensor();
  }
  kernels::DecodeAttentionArgs args;
  args.type = *KernelElementType(dtype);  // bf16 or fp16, checked above
  args.seqs = queries.size(0);
  args.heads = queries.size(1);
  args.kv_heads = keys.size(2);
  args.head_dim = queries.size(2);
  if (!kernels::DecodeAttentionSupports(args.type, args.head_dim, args.heads, args.kv_heads)) {
    return at::Tensor();
  }
  const at::Tensor q = queries.contiguous();
  const at::Tensor slot_ids = slots.contiguous();
  const at::Tensor query_positions = positions.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  args.queries = q.data_ptr();
  args.keys = keys.data_ptr();
  args.values = values.data_ptr();
  args.max_seq = keys.size(1);
  args.slots = slot_ids.data_ptr<int64_t>();
  args.positions = query_positions.data_ptr<int64_t>();
  args.sliding_window = sliding_window;
  args.scale = static_cast<float>(scale);
  args.max_keys = max_keys;
  args.out = out.data_ptr();
  args.splits = kernels::DecodeAttentionSplits(
      args.seqs, args.kv_heads, max_keys,
      at::cuda::getDeviceProperties(q.device().index())->multiProcessorCount);
  at::Tensor workspace;
  if (args.splits > 1) {
    workspace = at::empty({static_cast<int64_t>(kernels::DecodeAttentionWorkspaceFloats(
                              args.seqs, args.heads, args.head_dim, args.splits))},
                          q.options().dtype(at::kFloat));
    args.workspace = workspace.data_ptr<float>();
  }
  const cudaError_t error = kernels::LaunchDecodeAttention(
      args, c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(error == cudaSuccess, "decode attention kernel: ", cudaGetErrorString(error));
  return out;
#else
  return at::Tensor();
#endif
}

}  // namespace moelora
