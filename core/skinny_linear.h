// at::linear for every projection of the decoder. A decode step's few rows on CUDA (a CUDA
// build) take our weight-streaming kernel (core/kernels/skinny_linear.h), which starts reading W
// while the kernel before it finishes; everything else (prefill, more rows, the CPU, a CPU-only
// libtorch, autograd) is at::linear itself.

#ifndef MOELORA_CORE_SKINNY_LINEAR_H_
#define MOELORA_CORE_SKINNY_LINEAR_H_

#include <ATen/core/Tensor.h>

namespace moelora {

// x·weightᵀ (+ bias; undefined: none), as at::linear: x [rows, in] or any leading dims, weight
// [out, in] (row-strided views, such as a weight with room, are fine), result [rows, out].
at::Tensor SkinnyLinear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

}  // namespace moelora

#endif  // MOELORA_CORE_SKINNY_LINEAR_H_
