// Elementwise kernels over 2-D row-strided matrices: torch-free CUDA, built by nvcc.
//
// A GEMM with room writes its base output and the LoRA shrink side by side in one buffer, so
// both are views whose rows are further apart than their width. ATen's CUDA elementwise kernels
// vectorise only contiguous tensors; on these views they fall back to one element per thread and
// an index calculation per element. These kernels read and write 16 bytes per access instead.

#ifndef MOELORA_CORE_KERNELS_ROW_STRIDED_H_
#define MOELORA_CORE_KERNELS_ROW_STRIDED_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/kernels/element_type.h"

namespace moelora::kernels {

// a + b, a * b, or an activation of a times b (the gated MLP's act(gate) * up), the activation
// rounded to the element type first, as ATen's two ops round.
enum class BinaryOp { kAdd, kMultiply, kSiluTimes, kGeluTanhTimes, kGeluTimes };

// One operand: `rows` rows of `cols` contiguous elements, each row `row_stride` elements after
// the one before.
struct RowStridedOperand {
  void* data;
  int64_t row_stride;
};

// out[r][c] = a[r][c] op b[r][c] for r < rows, c < cols, computed in fp32 and rounded once (after
// the activation too, for the gated ops), as ATen does. `out` may be `a` (in place) but must not
// otherwise overlap a or b. Uses 16-byte accesses when every pointer, row stride and `cols` allow
// them, else one element per access. Launches on `stream` (CUDA-graph capturable) and returns the
// launch error, if any.
cudaError_t LaunchRowStridedBinary(BinaryOp op, ElementType type, int64_t rows, int64_t cols,
                                   RowStridedOperand out, RowStridedOperand a, RowStridedOperand b,
                                   cudaStream_t stream);

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_ROW_STRIDED_H_
