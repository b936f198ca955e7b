#include "core/strided_ops.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "tests/testing/devices.h"

namespace moelora {
namespace {

using testing_support::Devices;

// A [rows, cols] view at column `offset` of a [rows, width] buffer: how a GEMM with room lays out
// its base output (offset 0) and its shrink (offset = out).
at::Tensor ColumnsOf(const at::Tensor& buffer, int64_t offset, int64_t cols) {
  return buffer.narrow(1, offset, cols);
}

struct Shape {
  int64_t rows, cols, width, offset;
};

// Vectorisable (16-byte aligned rows and offsets) and not (odd widths and offsets).
const Shape kShapes[] = {{64, 128, 2176, 2048}, {5, 24, 40, 8}, {7, 13, 29, 3},
                         {3, 16, 16, 0},        {1, 8, 9, 1},   {33, 256, 2944, 2560}};

// Our kernels round once from fp32 as ATen does, so results equal ATen's bit for bit.
TEST(StridedOpsTest, MultiplyInPlaceEqualsAtenOnStridedViews) {
  at::manual_seed(3);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;  // Debian's 1.13 lacks some CPU half ops
      for (const Shape& shape : kShapes) {
        const auto options = at::TensorOptions().device(device).dtype(dtype);
        const at::Tensor buffer = at::randn({shape.rows, shape.width}, options);
        const at::Tensor weights = at::randn({shape.rows, shape.cols}, options);
        const at::Tensor expected = buffer.clone();
        ColumnsOf(expected, shape.offset, shape.cols).mul_(weights);

        MultiplyInPlace(ColumnsOf(buffer, shape.offset, shape.cols), weights);
        EXPECT_TRUE(at::equal(buffer.cpu(), expected.cpu()))
            << device << " " << dtype << " rows " << shape.rows << " cols " << shape.cols
            << " offset " << shape.offset;  // columns outside the view untouched as well
      }
    }
  }
}

TEST(StridedOpsTest, AddEqualsAtenOnStridedViews) {
  at::manual_seed(4);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;
      for (const Shape& shape : kShapes) {
        const auto options = at::TensorOptions().device(device).dtype(dtype);
        const at::Tensor residual = at::randn({shape.rows, shape.cols}, options);
        const at::Tensor buffer = at::randn({shape.rows, shape.width}, options);
        const at::Tensor output = ColumnsOf(buffer, shape.offset, shape.cols);

        const at::Tensor sum = Add(residual, output);
        EXPECT_TRUE(sum.is_contiguous());
        EXPECT_TRUE(at::equal(sum.cpu(), (residual + output).cpu()))
            << device << " " << dtype << " rows " << shape.rows << " cols " << shape.cols;
      }
    }
  }
}

// The residual stream of training records autograd: Add must stay differentiable there.
TEST(StridedOpsTest, AddKeepsGradients) {
  for (const c10::Device device : Devices()) {
    const at::Tensor a = at::randn({4, 8}, at::TensorOptions().device(device)).requires_grad_();
    const at::Tensor b = at::randn({4, 12}, at::TensorOptions().device(device)).requires_grad_();
    Add(a, b.narrow(1, 2, 8)).sum().backward();
    EXPECT_TRUE(at::equal(a.grad().cpu(), at::ones({4, 8})));
    const at::Tensor expected_b = at::zeros({4, 12});
    expected_b.narrow(1, 2, 8).fill_(1);
    EXPECT_TRUE(at::equal(b.grad().cpu(), expected_b));
  }
}

// act(gate) * up against ATen's two ops on the same device. ATen and the kernel round the same
// way; their fp32 activations may still differ in the last bit where nvcc contracts a multiply
// and an add differently, so an element may differ by one rounding of the dtype.
TEST(StridedOpsTest, GatedActivationMatchesAtenOnStridedViews) {
  at::manual_seed(5);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;
      for (const Activation activation :
           {Activation::kSilu, Activation::kGeluTanh, Activation::kGeluExact}) {
        for (const Shape& shape : kShapes) {
          const auto options = at::TensorOptions().device(device).dtype(dtype);
          const at::Tensor gate = ColumnsOf(at::randn({shape.rows, shape.width}, options) * 3,
                                            shape.offset, shape.cols);
          const at::Tensor up = at::randn({shape.rows, shape.cols}, options);
          const at::Tensor activated = activation == Activation::kSilu ? at::silu(gate)
                                       : activation == Activation::kGeluTanh
                                           ? at::gelu(gate, "tanh")
                                           : at::gelu(gate);
          const at::Tensor expected = (activated * up).cpu().to(at::kDouble);

          const at::Tensor gated = GatedActivation(gate, up, activation);
          ASSERT_TRUE(gated.is_contiguous());
          ASSERT_EQ(gated.scalar_type(), dtype);
          const at::Tensor got = gated.cpu().to(at::kDouble);
          const double rounding = dtype == at::kFloat ? 1e-6 : dtype == at::kHalf ? 1e-3 : 8e-3;
          const at::Tensor difference = (got - expected).abs();
          EXPECT_TRUE(difference.le(expected.abs() * 2 * rounding + 1e-6).all().item<bool>())
              << device << " " << dtype << " " << ActivationName(activation) << " rows "
              << shape.rows << " cols " << shape.cols << ": max difference "
              << difference.max().item<double>();
          EXPECT_GT(at::eq(got, expected).to(at::kFloat).mean().item<float>(), 0.9)
              << device << " " << dtype << " " << ActivationName(activation);
        }
      }
    }
  }
}

}  // namespace
}  // namespace moelora
