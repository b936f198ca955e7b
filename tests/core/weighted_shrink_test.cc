#include "core/weighted_shrink.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "tests/testing/devices.h"
#include "tests/testing/tensor_close.h"

namespace moelora {
namespace {

using testing_support::Devices;
using testing_support::ExpectWithinRounding;

struct Shape {
  int64_t tokens, rows, in;
};

// Decode sizes (one token, a part-filled token tile, batch 32 and 64, the kernel's most rows),
// past the kernel's 64 tokens or 512 rows (the GEMM path), rows that part-fill a 16-row tile,
// widths that split unevenly over a cluster or leave half a 16-wide step, widths past one staged
// chunk (8192), and a width the 16-byte loads cannot take (the GEMM path).
const Shape kShapes[] = {{1, 128, 2048},  {7, 16, 40},     {32, 128, 2048},
                         {64, 256, 2048}, {64, 300, 2048}, {33, 21, 2056},
                         {100, 64, 512},  {3, 40, 8200},   {5, 24, 63}};

// Two projections reading one x (gate and up), each writing beside its own copy of x in one
// buffer, as the model lays them out; everything outside the outputs stays as it was.
TEST(WeightedShrinkTest, PairMatchesGemmThenMultiplyAndWritesOnlyItsColumns) {
  at::manual_seed(11);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;  // Debian's 1.13 lacks CPU half GEMM
      for (const Shape& shape : kShapes) {
        const auto options = at::TensorOptions().device(device).dtype(dtype);
        const int64_t in = shape.in, rows = shape.rows, width = in + rows + 5;
        const at::Tensor buffer = at::randn({shape.tokens, 2 * width}, options);
        const at::Tensor x = buffer.narrow(1, 0, in);
        const std::vector<ShrinkPart> parts = {
            {at::randn({rows, in}, options) / std::sqrt(in), buffer.narrow(1, in, rows)},
            {at::randn({rows, in}, options) / std::sqrt(in), buffer.narrow(1, width + in, rows)}};
        // Routing weights over more rank rows than the parts use, as a pool's are.
        const at::Tensor weights = at::rand({shape.tokens, rows + 3}, options);
        std::vector<at::Tensor> expected;
        for (const ShrinkPart& part : parts) {
          expected.push_back(
              (at::mm(x.to(at::kFloat), part.a.to(at::kFloat).t()).to(dtype).to(at::kFloat) *
               weights.narrow(1, 0, rows).to(at::kFloat))
                  .to(dtype));
        }
        // The buffer with the outputs' columns zeroed: what must not change.
        auto outside_outputs = [&] {
          at::Tensor rest = buffer.clone();
          for (const ShrinkPart& part : parts) {
            rest.narrow(1, part.out.storage_offset() - buffer.storage_offset(), rows).zero_();
          }
          return rest.cpu();
        };
        const at::Tensor before = outside_outputs();

        WeightedShrinkInto(x, weights, parts);
        const std::string what = ::testing::PrintToString(device) + " " +
                                 std::string(c10::toString(dtype)) + " tokens " +
                                 std::to_string(shape.tokens) + " rows " + std::to_string(rows) +
                                 " in " + std::to_string(in);
        for (size_t i = 0; i < parts.size(); ++i) {
          ExpectWithinRounding(parts[i].out, expected[i], what + " part " + std::to_string(i));
        }
        EXPECT_TRUE(at::equal(outside_outputs(), before)) << what;
      }
    }
  }
}

TEST(WeightedShrinkTest, OnePartMatchesGemmThenMultiply) {
  at::manual_seed(12);
  for (const c10::Device device : Devices()) {
    const auto options = at::TensorOptions().device(device).dtype(at::kBFloat16);
    const at::Tensor x = at::randn({5, 256}, options);
    const ShrinkPart part{at::randn({48, 256}, options) / 16, at::empty({5, 48}, options)};
    const at::Tensor weights = at::rand({5, 48}, options);
    const at::Tensor expected =
        (at::mm(x.to(at::kFloat), part.a.to(at::kFloat).t()).to(at::kBFloat16).to(at::kFloat) *
         weights.to(at::kFloat))
            .to(at::kBFloat16);

    WeightedShrinkInto(x, weights, {part});
    ExpectWithinRounding(part.out, expected, ::testing::PrintToString(device));
  }
}

}  // namespace
}  // namespace moelora
