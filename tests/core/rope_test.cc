#include "core/rope.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

#include "tests/testing/devices.h"

namespace moelora {
namespace {

using testing_support::Devices;

TEST(RopeTest, ApplyRopeRotatesPairsHalfADimensionApart) {
  // head_dim 4: pairs (x0, x2) and (x1, x3) rotate by their angles, as transformers' rotate_half.
  const at::Tensor x = at::tensor({1.0, 2.0, 3.0, 4.0}, at::kDouble).view({1, 1, 4});
  const at::Tensor cos = at::tensor({0.5, 0.25, 0.5, 0.25}, at::kDouble).view({1, 4});
  const at::Tensor sin = at::tensor({0.75, 0.125, 0.75, 0.125}, at::kDouble).view({1, 4});
  const at::Tensor expected = at::tensor({1 * 0.5 - 3 * 0.75, 2 * 0.25 - 4 * 0.125,
                                          3 * 0.5 + 1 * 0.75, 4 * 0.25 + 2 * 0.125},
                                         at::kDouble)
                                  .view({1, 1, 4});
  EXPECT_TRUE(at::allclose(ApplyRope(x, cos, sin), expected));
}

// RotateAndCache equals the ATen ops it replaces (the angles' cos and sin, rotate q and k,
// index_put_ k and v) bit for bit, on the CPU (those ops) and on CUDA (our kernel, which computes
// the angles itself), for q/k/v laid out as one GEMM's column blocks and positions up to 4095.
TEST(RopeTest, RotateAndCacheEqualsRotateThenIndexPut) {
  at::manual_seed(31);
  const int64_t tokens = 5, heads = 4, kv_heads = 2, head_dim = 8, slots = 3, max_seq = 4096;
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;  // Debian's 1.13 lacks CPU half ops
      const auto options = at::TensorOptions().device(device).dtype(dtype);
      const int64_t q_width = heads * head_dim, kv_width = kv_heads * head_dim;
      const at::Tensor qkv = at::randn({tokens, q_width + 2 * kv_width + 8}, options);
      const at::Tensor q = qkv.narrow(1, 0, q_width).view({tokens, heads, head_dim});
      const at::Tensor k = qkv.narrow(1, q_width, kv_width).view({tokens, kv_heads, head_dim});
      const at::Tensor v =
          qkv.narrow(1, q_width + kv_width, kv_width).view({tokens, kv_heads, head_dim});
      // theta 10000's frequencies at head_dim 8, the first raised to 1.7 for angles past 4000.
      const at::Tensor inv_freq =
          at::tensor({1.7f, 0.1f, 0.01f, 0.001f}, at::TensorOptions().device(device));
      const auto longs = at::TensorOptions().device(device).dtype(at::kLong);
      const at::Tensor token_slots = at::tensor({0, 2, 2, 1, 0}, longs);
      const at::Tensor positions = at::tensor({3, 0, 4095, 517, 1999}, longs);
      const auto [cos, sin] = RopeCosSin(positions, inv_freq, dtype);

      const at::Tensor expected_keys = at::zeros({slots, max_seq, kv_heads, head_dim}, options);
      const at::Tensor expected_values = at::zeros_like(expected_keys);
      at::Tensor(expected_keys).index_put_({token_slots, positions}, ApplyRope(k, cos, sin));
      at::Tensor(expected_values).index_put_({token_slots, positions}, v);
      const at::Tensor expected_queries = ApplyRope(q, cos, sin);

      const at::Tensor keys = at::zeros_like(expected_keys), values = at::zeros_like(keys);
      const at::Tensor rotated =
          RotateAndCache(q, k, v, inv_freq, keys, values, token_slots, positions);
      const std::string what =
          ::testing::PrintToString(device) + " " + std::string(c10::toString(dtype));
      EXPECT_TRUE(at::equal(rotated.cpu(), expected_queries.cpu())) << what;
      EXPECT_TRUE(at::equal(keys.cpu(), expected_keys.cpu())) << what;
      EXPECT_TRUE(at::equal(values.cpu(), expected_values.cpu())) << what;
    }
  }
}

}  // namespace
}  // namespace moelora
