#include "core/decode_attention.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/model.h"
#include "core/random_model.h"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

// softmax(q·kᵀ·scale)·v over each sequence's keys [first, position], in fp32 from the same
// rounded inputs: what the kernel must give up to its own output rounding.
at::Tensor Reference(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                     const std::vector<int64_t>& slots, const std::vector<int64_t>& positions,
                     int64_t window, double scale) {
  const int64_t heads = q.size(1), kv_heads = keys.size(2);
  std::vector<at::Tensor> outputs;
  for (size_t s = 0; s < slots.size(); ++s) {
    const int64_t first = window > 0 ? std::max<int64_t>(0, positions[s] - window + 1) : 0;
    const int64_t count = positions[s] - first + 1;
    // [kv_heads, count, d], repeated to [heads, count, d] (head = kv * groups + g)
    auto attended = [&](const at::Tensor& cache) {
      return cache[slots[s]]
          .narrow(0, first, count)
          .permute({1, 0, 2})
          .to(at::kFloat)
          .repeat_interleave(heads / kv_heads, 0);
    };
    const at::Tensor query = q[static_cast<int64_t>(s)].to(at::kFloat).unsqueeze(1);  // [h, 1, d]
    const at::Tensor probs =
        at::softmax(at::matmul(query, attended(keys).transpose(1, 2)) * scale, -1);
    outputs.push_back(at::matmul(probs, attended(values)).squeeze(1));
  }
  return at::stack(outputs);
}

struct Case {
  int64_t heads, kv_heads, head_dim, seqs, window;
};

// Shapes of the model families (gemma-2b: 8 heads on one KV head of 256; llama: 4 per KV head;
// qwen2: 7; gemma-7b: 1), one to many sequences (several key splits per sequence, then one), and
// Mistral's sliding window.
TEST(DecodeAttentionTest, MatchesReferenceOnCuda) {
  if (!at::hasCUDA()) GTEST_SKIP() << "the kernel runs on CUDA only";
  const Case cases[] = {{8, 1, 256, 1, 0},   {8, 1, 256, 32, 0}, {32, 8, 64, 5, 0},
                        {32, 8, 128, 37, 0}, {14, 2, 64, 3, 0},  {16, 16, 256, 2, 0},
                        {8, 2, 128, 6, 5},   {4, 1, 64, 40, 100}};
  at::manual_seed(7);
  const int64_t max_seq = 300, max_keys = 257;
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (const Case& c : cases) {
      const auto options = at::TensorOptions().device(at::kCUDA).dtype(dtype);
      const int64_t num_slots = c.seqs + 3;
      const at::Tensor keys = at::randn({num_slots, max_seq, c.kv_heads, c.head_dim}, options);
      const at::Tensor values = at::randn({num_slots, max_seq, c.kv_heads, c.head_dim}, options);
      const at::Tensor q = at::randn({c.seqs, c.heads, c.head_dim}, options);
      std::vector<int64_t> slots, positions;
      for (int64_t s = 0; s < c.seqs; ++s) {
        slots.push_back((s * 7 + 2) % num_slots);                    // distinct, out of order
        positions.push_back(s == 0 ? 0 : (s * 53 + 11) % max_keys);  // position 0 included
      }
      positions.back() = max_keys - 1;
      const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
      auto device_longs = [](const std::vector<int64_t>& v) {
        return at::tensor(v, at::TensorOptions().dtype(at::kLong)).to(at::kCUDA);
      };
      const at::Tensor out = DecodeAttentionFromCache(
          q, keys, values, device_longs(slots), device_longs(positions), c.window, scale, max_keys);
      const std::string label = std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) +
                                " heads, d " + std::to_string(c.head_dim) + ", " +
                                std::to_string(c.seqs) + " seqs, window " +
                                std::to_string(c.window);
      ASSERT_TRUE(out.defined()) << label;
      ASSERT_EQ(out.scalar_type(), dtype);
      const at::Tensor expected =
          Reference(q.cpu(), keys.cpu(), values.cpu(), slots, positions, c.window, scale);
      const double error = (out.cpu().to(at::kFloat) - expected).abs().max().item<double>();
      EXPECT_LE(error, 1e-2) << label << " " << dtype;
    }
  }
}

// Where the kernel does not apply it says so, and the model runs ATen's path.
TEST(DecodeAttentionTest, UndefinedWhereTheKernelDoesNotApply) {
  const at::Tensor slots = at::zeros({1}, at::kLong), positions = at::zeros({1}, at::kLong);
  const at::Tensor cpu_cache = at::zeros({1, 4, 1, 64}, at::kBFloat16);
  EXPECT_FALSE(DecodeAttentionFromCache(at::zeros({1, 2, 64}, at::kBFloat16), cpu_cache, cpu_cache,
                                        slots, positions, 0, 0.125, 4)
                   .defined());
  if (!at::hasCUDA()) return;
  const auto cuda = at::TensorOptions().device(at::kCUDA);
  const at::Tensor fp32_cache = at::zeros({1, 4, 1, 64}, cuda);
  EXPECT_FALSE(DecodeAttentionFromCache(at::zeros({1, 2, 64}, cuda), fp32_cache, fp32_cache,
                                        slots.cuda(), positions.cuda(), 0, 0.125, 4)
                   .defined());
  const at::Tensor odd_cache = at::zeros({1, 4, 1, 48}, cuda.dtype(at::kBFloat16));
  EXPECT_FALSE(DecodeAttentionFromCache(at::zeros({1, 2, 48}, cuda.dtype(at::kBFloat16)), odd_cache,
                                        odd_cache, slots.cuda(), positions.cuda(), 0, 0.125, 4)
                   .defined());
}

// A bf16 model on CUDA decoding token by token (two sequences of different lengths in one step,
// the kernel's path) gives the logits of one forward over the whole prompts (the prefill path).
class DecodeStepsTest : public testing::TestWithParam<ModelType> {};

TEST_P(DecodeStepsTest, TokenByTokenEqualsWholePrompt) {
  if (!at::hasCUDA()) GTEST_SKIP() << "the kernel runs on CUDA only";
  testing_support::ScopedTempDir temp("decode_attention_test");
  ModelConfig config = TinyModelConfig(GetParam());
  config.head_dim = 64;  // a head_dim the kernel takes
  ASSERT_TRUE(WriteRandomModel(temp.Join("base"), config, {.seed = 5}).ok());
  auto model = Model::Load(temp.Join("base"),
                           {.device = c10::Device(c10::kCUDA, 0), .dtype = at::kBFloat16});
  ASSERT_TRUE(model.ok()) << model.status();
  const std::vector<std::vector<int64_t>> prompts = {{5, 9, 1, 44, 3, 17, 2, 8, 60, 4, 7},
                                                     {7, 100, 2, 8}};
  auto whole_cache = (*model)->CreateKvCache(2, 32);
  auto steps_cache = (*model)->CreateKvCache(2, 32);
  ASSERT_TRUE(whole_cache.ok() && steps_cache.ok());
  auto whole =
      (*model)->Forward({{0, prompts[0]}, {1, prompts[1]}}, *whole_cache, {.all_logits = true});
  ASSERT_TRUE(whole.ok()) << whole.status();
  for (size_t t = 0; t < prompts[0].size(); ++t) {
    std::vector<SequenceInput> step;
    std::vector<int64_t> offsets;  // each stepped sequence's row in `whole`
    for (int s = 0; s < 2; ++s) {
      if (t >= prompts[s].size()) continue;
      step.push_back({s, {prompts[s][t]}});
      offsets.push_back(whole->token_offsets[s] + static_cast<int64_t>(t));
    }
    auto stepped = (*model)->Forward(step, *steps_cache);
    ASSERT_TRUE(stepped.ok()) << stepped.status();
    for (size_t i = 0; i < offsets.size(); ++i) {
      const at::Tensor expected = whole->logits[offsets[i]].to(at::kFloat).cpu();
      const at::Tensor got = stepped->logits[static_cast<int64_t>(i)].to(at::kFloat).cpu();
      EXPECT_LE((got - expected).norm().item<double>() / expected.norm().item<double>(), 3e-2)
          << "token " << t << " of sequence " << step[i].slot;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Families, DecodeStepsTest,
                         testing::Values(ModelType::kLlama, ModelType::kMistral, ModelType::kQwen2,
                                         ModelType::kGemma));

}  // namespace
}  // namespace moelora
