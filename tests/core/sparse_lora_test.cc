#include "core/sparse_lora.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <iterator>
#include <string>
#include <vector>

#include "tests/testing/devices.h"
#include "tests/testing/tensor_close.h"

namespace moelora {
namespace {

using testing_support::Devices;
using testing_support::ExpectWithinRounding;

struct Shape {
  int64_t tokens, experts_per_token, rank, in, out;
};

// Decode sizes (q at batch 1, k/v at 32, down's 16384-wide input at 64), the kernels' bounds
// (8 experts a token, rank 64), widths that are not a whole number of the shrink's 512-element
// splits nor of the expand's column tiles, rank 12 (not a whole number of 16-byte packs: the
// gather path), and past the kernels' 64 tokens (the gather path).
const Shape kShapes[] = {{1, 2, 16, 2048, 2048}, {32, 2, 16, 2048, 256}, {64, 2, 16, 16384, 512},
                         {64, 8, 64, 1024, 96},  {5, 3, 8, 520, 296},    {3, 1, 12, 40, 16},
                         {100, 2, 16, 64, 64}};

// How the stacks lie: contiguous (a pool without room), in a projection's room (A in row room,
// Bᵀ a transposed column room), or a q/k/v group member's strided views.
enum class Layout { kContiguous, kRoom, kGroupMember };

struct Stacks {
  at::Tensor a, bt;
};

Stacks MakeStacks(Layout layout, int64_t slots, int64_t rank, int64_t in, int64_t out,
                  const at::TensorOptions& options) {
  // Both products of order 1, so a shrink that rounds the other way in the reference (another
  // fp32 order) moves the output by well under the tolerance.
  const double scale = 1.0 / std::sqrt(static_cast<double>(in));
  const double bt_scale = 1.0 / std::sqrt(static_cast<double>(rank));
  switch (layout) {
    case Layout::kContiguous:
      return {at::randn({slots, rank, in}, options) * scale,
              at::randn({slots, rank, out}, options) * bt_scale};
    case Layout::kRoom: {
      const at::Tensor rows = at::randn({out + slots * rank, in}, options) * scale;
      const int64_t width = in + slots * rank;
      const at::Tensor columns = at::randn({out, width}, options) * bt_scale;
      return {rows.narrow(0, out, slots * rank).view({slots, rank, in}),
              columns.as_strided({slots, rank, out}, {rank, 1, width}, in)};
    }
    case Layout::kGroupMember: {
      const at::Tensor a = at::randn({slots, 3, rank, in}, options) * scale;
      const at::Tensor bt = at::randn({slots, 3, rank, out + 24}, options) * bt_scale;
      return {a.select(1, 1), bt.select(1, 2).narrow(2, 8, out)};
    }
  }
  return {};
}

// out + Σ_j round(round(x·Aᵀ) · round(w))·Bᵀ per token, in fp32 from the same rounded operands,
// rounded once.
at::Tensor Expected(const at::Tensor& out, const at::Tensor& x, const Stacks& stacks,
                    const at::Tensor& slots, const at::Tensor& weights) {
  const at::ScalarType dtype = out.scalar_type();
  const at::Tensor cpu_slots = slots.cpu();
  std::vector<at::Tensor> rows;
  for (int64_t t = 0; t < out.size(0); ++t) {
    at::Tensor sum = at::zeros({out.size(1)}, at::kFloat);
    for (int64_t j = 0; j < slots.size(1); ++j) {
      const int64_t slot = cpu_slots[t][j].item<int64_t>();
      const at::Tensor a = stacks.a[slot].cpu().to(at::kFloat);
      const at::Tensor shrink = at::mv(a, x[t].cpu().to(at::kFloat)).to(dtype).to(at::kFloat);
      const at::Tensor w = weights[t][j].cpu().to(dtype).to(at::kFloat);
      const at::Tensor scaled = (shrink * w).to(dtype).to(at::kFloat);
      sum += at::mv(stacks.bt[slot].cpu().to(at::kFloat).t(), scaled);
    }
    rows.push_back(out[t].cpu().to(at::kFloat) + sum);
  }
  return at::stack(rows).to(dtype);
}

// One to three targets reading one x (as q/k/v or gate/up do), each output a column block of a
// wider buffer and of its own width.
TEST(SparseLoraTest, AddsEachTokensOwnExpertsAndWritesOnlyTheOutputs) {
  at::manual_seed(31);
  const int64_t slots = 9;
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;  // Debian's 1.13 lacks CPU half GEMM
      for (const Layout layout : {Layout::kContiguous, Layout::kRoom, Layout::kGroupMember}) {
        for (size_t s = 0; s < std::size(kShapes); ++s) {
          const Shape& shape = kShapes[s];
          const auto options = at::TensorOptions().device(device).dtype(dtype);
          const at::Tensor x = at::randn({shape.tokens, shape.in}, options);
          // Slots repeat across tokens; every third pair has weight 0 (a token with fewer
          // experts than k).
          const at::Tensor route_slots =
              at::randint(slots, {shape.tokens, shape.experts_per_token},
                          at::TensorOptions().dtype(at::kLong).device(device));
          at::Tensor weights =
              at::rand({shape.tokens, shape.experts_per_token}, at::TensorOptions().device(device));
          weights.view({-1}).slice(0, 2, c10::nullopt, 3).zero_();
          const int64_t count = 1 + static_cast<int64_t>(s % 3);
          std::vector<Stacks> stacks;
          std::vector<at::Tensor> buffers, expected, tails;
          std::vector<SparseLoraTarget> targets;
          for (int64_t g = 0; g < count; ++g) {
            const int64_t out = shape.out + 8 * g;
            stacks.push_back(MakeStacks(layout, slots, shape.rank, shape.in, out, options));
            buffers.push_back(at::randn({shape.tokens, out + 8}, options));
            const at::Tensor target_out = buffers.back().narrow(1, 0, out);
            expected.push_back(Expected(target_out, x, stacks.back(), route_slots, weights));
            tails.push_back(buffers.back().narrow(1, out, 8).cpu());
            targets.push_back({stacks.back().a, stacks.back().bt, target_out});
          }

          SparseLoraAdd(x, route_slots, weights, targets);
          for (int64_t g = 0; g < count; ++g) {
            const std::string what =
                ::testing::PrintToString(device) + " " + std::string(c10::toString(dtype)) +
                " layout " + std::to_string(static_cast<int>(layout)) + " tokens " +
                std::to_string(shape.tokens) + " k " + std::to_string(shape.experts_per_token) +
                " rank " + std::to_string(shape.rank) + " in " + std::to_string(shape.in) +
                " target " + std::to_string(g) + " of " + std::to_string(count);
            ExpectWithinRounding(targets[g].out, expected[g], what);
            EXPECT_TRUE(at::equal(buffers[g].narrow(1, targets[g].out.size(1), 8).cpu(), tails[g]))
                << what;
          }
        }
      }
    }
  }
}

TEST(SparseLoraTest, MismatchedShapesAreRefused) {
  const at::Tensor out = at::zeros({2, 8});
  const at::Tensor x = at::zeros({2, 16});
  const at::Tensor a = at::zeros({3, 4, 16});
  const at::Tensor bt = at::zeros({3, 4, 8});
  const at::Tensor slots = at::zeros({2, 1}, at::kLong);
  const at::Tensor weights = at::zeros({2, 1});
  EXPECT_THROW(SparseLoraAdd(x, slots, at::zeros({2, 2}), {{a, bt, out}}), c10::Error);
  EXPECT_THROW(SparseLoraAdd(x, slots, weights, {{a, at::zeros({3, 4, 9}), out}}), c10::Error);
  EXPECT_THROW(SparseLoraAdd(x, slots.to(at::kInt), weights, {{a, bt, out}}), c10::Error);
  EXPECT_THROW(SparseLoraAdd(x, slots, weights, {{a, bt, out}, {a, bt, at::zeros({3, 8})}}),
               c10::Error);
}

}  // namespace
}  // namespace moelora
