#include "core/weighted_expand.h"

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
  int64_t tokens, rows, columns;
};

// Decode sizes (one token, batch 32 and 64 at 8 experts of rank 16 for o and down, the kernel's
// most rows; gate's and up's wide outputs, which take 64-column tiles), past the kernel's 64
// tokens or 512 rows (the GEMM path), rows that are not a whole number of the tensor cores' 16,
// and narrow or odd widths.
const Shape kShapes[] = {{1, 128, 2048},   {32, 128, 2048}, {64, 512, 1024}, {8, 128, 16384},
                         {64, 128, 16384}, {64, 520, 256},  {100, 64, 512},  {17, 24, 40},
                         {3, 8, 2056},     {33, 40, 8},     {5, 16, 36}};

// (out + round(s ⊙ w)·bt) rounded once, in fp32 from the same rounded operands.
at::Tensor Expected(const at::Tensor& out, const at::Tensor& shrink, const at::Tensor& weights,
                    const at::Tensor& bt) {
  const at::ScalarType dtype = out.scalar_type();
  const at::Tensor scaled =
      (shrink.to(at::kFloat) * weights.narrow(1, 0, shrink.size(1)).to(at::kFloat)).to(dtype);
  return (out.to(at::kFloat) + at::mm(scaled.to(at::kFloat), bt.to(at::kFloat))).to(dtype);
}

std::string Describe(const c10::Device& device, at::ScalarType dtype, const Shape& shape) {
  return ::testing::PrintToString(device) + " " + std::string(c10::toString(dtype)) + " tokens " +
         std::to_string(shape.tokens) + " rows " + std::to_string(shape.rows) + " columns " +
         std::to_string(shape.columns);
}

// The output and the shrink side by side in one buffer, as a GEMM with row room writes them;
// the columns past the shrink stay as they were.
TEST(WeightedExpandTest, MatchesMultiplyThenGemmAndWritesOnlyTheOutput) {
  at::manual_seed(21);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;  // Debian's 1.13 lacks CPU half GEMM
      for (const Shape& shape : kShapes) {
        const auto options = at::TensorOptions().device(device).dtype(dtype);
        const int64_t columns = shape.columns, rows = shape.rows;
        const at::Tensor buffer = at::randn({shape.tokens, columns + rows + 8}, options);
        const at::Tensor out = buffer.narrow(1, 0, columns);
        const at::Tensor shrink = buffer.narrow(1, columns, rows);
        // Routing weights over more rank rows than are used, as a pool's are; Bᵀ the first rows
        // of a pool's stack.
        const at::Tensor weights = at::rand({shape.tokens, rows + 8}, options);
        const at::Tensor bt =
            (at::randn({rows + 16, columns}, options) / std::sqrt(rows)).narrow(0, 0, rows);
        const at::Tensor expected = Expected(out, shrink, weights, bt);
        const at::Tensor tail_before = buffer.narrow(1, columns + rows, 8).cpu();

        WeightedExpandAdd(out, shrink, weights, bt);
        const std::string what = Describe(device, dtype, shape);
        ExpectWithinRounding(out, expected, what);
        EXPECT_TRUE(at::equal(buffer.narrow(1, columns + rows, 8).cpu(), tail_before)) << what;
      }
    }
  }
}

// Gate and up in row room: each GEMM wrote its output and shrink side by side, and one call (one
// kernel on CUDA) adds each expand to its own output with the routing weights they share.
TEST(WeightedExpandTest, EachTargetGetsItsOwnExpand) {
  at::manual_seed(23);
  const Shape shapes[] = {{1, 32, 16384}, {8, 128, 16384}, {32, 128, 4096}, {5, 24, 40}};
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;
      for (const Shape& shape : shapes) {
        const auto options = at::TensorOptions().device(device).dtype(dtype);
        const int64_t columns = shape.columns, rows = shape.rows;
        const at::Tensor weights = at::rand({shape.tokens, rows}, options);
        std::vector<at::Tensor> buffers, expected;
        std::vector<WeightedExpandTarget> targets;
        for (int i = 0; i < 2; ++i) {
          buffers.push_back(at::randn({shape.tokens, columns + rows}, options));
          const WeightedExpandTarget target{buffers.back().narrow(1, 0, columns),
                                            buffers.back().narrow(1, columns, rows),
                                            at::randn({rows, columns}, options) / std::sqrt(rows)};
          expected.push_back(Expected(target.out, target.shrink, weights, target.bt));
          targets.push_back(target);
        }
        WeightedExpandAddEach(targets, weights);
        for (int i = 0; i < 2; ++i) {
          ExpectWithinRounding(targets[i].out, expected[i],
                               Describe(device, dtype, shape) + " target " + std::to_string(i));
        }
      }
    }
  }
}

// q/k/v's block-diagonal Bᵀ: the kernel reads only each member's blocks and gives what the
// dense product over the zeros gives.
TEST(WeightedExpandTest, BlockDiagonalMatchesTheDenseProduct) {
  at::manual_seed(22);
  struct Group {
    std::vector<int64_t> member_columns;
    int64_t rank, experts, tokens;
  };
  const Group groups[] = {{{256, 64, 64}, 16, 8, 32},
                          {{2048, 256, 256}, 16, 8, 1},
                          {{40, 8, 16}, 8, 3, 17},
                          {{64, 64, 64}, 16, 1, 64}};
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;
      for (const Group& group : groups) {
        const auto options = at::TensorOptions().device(device).dtype(dtype);
        const int64_t members = static_cast<int64_t>(group.member_columns.size());
        int64_t columns = 0;
        for (int64_t width : group.member_columns) columns += width;
        const int64_t rows = group.experts * members * group.rank;
        at::Tensor bt = at::zeros({rows, columns}, options);
        for (int64_t expert = 0; expert < group.experts; ++expert) {
          int64_t first_column = 0;
          for (int64_t m = 0; m < members; ++m) {
            const int64_t width = group.member_columns[m];
            bt.narrow(0, (expert * members + m) * group.rank, group.rank)
                .narrow(1, first_column, width)
                .copy_(at::randn({group.rank, width}, options) / std::sqrt(group.rank));
            first_column += width;
          }
        }
        const at::Tensor buffer = at::randn({group.tokens, columns + rows}, options);
        const at::Tensor out = buffer.narrow(1, 0, columns);
        const at::Tensor shrink = buffer.narrow(1, columns, rows);
        const at::Tensor weights = at::rand({group.tokens, rows}, options);
        const at::Tensor expected = Expected(out, shrink, weights, bt);

        const BlockDiagonalRows blocks{group.member_columns, group.rank};
        WeightedExpandAdd(out, shrink, weights, bt, &blocks);
        ExpectWithinRounding(
            out, expected,
            Describe(device, dtype, {group.tokens, rows, columns}) + " block-diagonal");
      }
    }
  }
}

}  // namespace
}  // namespace moelora
