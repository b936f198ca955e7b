#include "core/skinny_linear.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "tests/testing/devices.h"
#include "tests/testing/tensor_close.h"

namespace moelora {
namespace {

using testing_support::Devices;
using testing_support::ExpectWithinRounding;

struct Shape {
  int64_t tokens, in, out;
};

// Decode shapes (gemma-2b's q/k/v with room; gate with 128 shrink columns beside its input: 9
// passes, 9 warps; down's long input: 8 rounds of 8 warps; 65 passes: 9 of 8, the last partial;
// Llama-3-8B's 4096 inputs: 2 rounds of 8 warps; Qwen2-7B's 3584: 14 warps at one token, 2
// rounds of 7 at two; 10 passes, the most warps at two tokens), the kernel's most tokens and
// one past it (at::linear), inputs that are not a whole number of passes and outputs that are
// not a whole number of its 8-row blocks.
const Shape kShapes[] = {{1, 2048, 2688}, {2, 2176, 40}, {2, 16384, 64}, {1, 16640, 24},
                         {3, 256, 40},    {3, 24, 13},   {2, 520, 1001}, {1, 8, 1},
                         {2, 1032, 17},   {1, 4096, 9},  {2, 4000, 16},  {1, 3584, 24},
                         {2, 3584, 24},   {2, 2560, 8}};

std::string Describe(const c10::Device& device, at::ScalarType dtype, const Shape& shape,
                     bool bias) {
  return ::testing::PrintToString(device) + " " + std::string(c10::toString(dtype)) + " tokens " +
         std::to_string(shape.tokens) + " in " + std::to_string(shape.in) + " out " +
         std::to_string(shape.out) + (bias ? " with bias" : "");
}

// x and W as row-strided views (x beside a shrink's columns, W with room rows past it), with
// and without a bias: x·Wᵀ (+ b) in fp32 from the same operands, rounded once.
TEST(SkinnyLinearTest, MatchesTheProductRoundedOnce) {
  at::manual_seed(31);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;  // Debian's 1.13 lacks CPU half GEMM
      for (const Shape& shape : kShapes) {
        for (const bool with_bias : {false, true}) {
          const auto options = at::TensorOptions().device(device).dtype(dtype);
          const at::Tensor x =
              at::randn({shape.tokens, shape.in + 16}, options).narrow(1, 0, shape.in);
          const at::Tensor weight =
              (at::randn({shape.out + 3, shape.in + 8}, options) / std::sqrt(shape.in))
                  .narrow(0, 0, shape.out)
                  .narrow(1, 0, shape.in);
          const at::Tensor bias = with_bias ? at::randn({shape.out}, options) : at::Tensor();
          at::Tensor expected = at::mm(x.to(at::kFloat), weight.to(at::kFloat).t());
          if (with_bias) expected = expected + bias.to(at::kFloat);

          const at::Tensor got = SkinnyLinear(x, weight, bias);
          const std::string what = Describe(device, dtype, shape, with_bias);
          ASSERT_EQ(got.sizes(), (at::IntArrayRef{shape.tokens, shape.out})) << what;
          ASSERT_EQ(got.scalar_type(), dtype) << what;
          ExpectWithinRounding(got, expected.to(dtype), what);
        }
      }
    }
  }
}

// Leading dimensions and inputs the kernel does not take (misaligned rows, autograd) are
// at::linear's own.
TEST(SkinnyLinearTest, OtherInputsAreAtLinear) {
  at::manual_seed(32);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      const auto options = at::TensorOptions().device(device).dtype(dtype);
      const at::Tensor weight = at::randn({12, 32}, options);
      const at::Tensor batched = at::randn({2, 3, 32}, options);
      EXPECT_TRUE(
          at::equal(SkinnyLinear(batched, weight, at::Tensor()), at::linear(batched, weight)));
      const at::Tensor odd = at::randn({2, 33}, options).narrow(1, 1, 32);  // rows off 16 bytes
      EXPECT_TRUE(at::equal(SkinnyLinear(odd, weight, at::Tensor()), at::linear(odd, weight)));
    }
    const auto options = at::TensorOptions().device(device).dtype(at::kFloat);
    const at::Tensor weight = at::randn({12, 32}, options);
    const at::Tensor leaf = at::randn({1, 32}, options).requires_grad_();
    const at::Tensor y = SkinnyLinear(leaf, weight, at::Tensor());
    ASSERT_TRUE(y.requires_grad());
    y.sum().backward();
    EXPECT_TRUE(at::allclose(leaf.grad(), weight.sum(0, /*keepdim=*/true), 1e-5, 1e-5));
  }
}

}  // namespace
}  // namespace moelora
