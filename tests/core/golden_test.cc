// The decoder against transformers: fixtures in tests/data/golden were made by
// tools/golden/make_golden.py (tiny random llama / gemma / qwen2 / mistral, fp32, eager attention).

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/generation.h"
#include "core/model.h"

namespace moelora {
namespace {

constexpr int kNumPrompts = 3;

struct Target {
  std::string name;
  c10::DeviceType device;
  at::ScalarType dtype;
};

void PrintTo(const Target& target, std::ostream* os) { *os << target.name; }

struct Fixture {
  std::vector<std::vector<int64_t>> prompts;
  std::vector<at::Tensor> logits;  // fp32 CPU, [T_i, vocab]
  std::vector<std::vector<int64_t>> greedy;
};

std::vector<int64_t> ToVector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

Fixture LoadFixture(const std::string& dir) {
  auto reference = Checkpoint::OpenFile(dir + "/reference.safetensors");
  EXPECT_TRUE(reference.ok()) << reference.status();
  Fixture fixture;
  for (int i = 0; i < kNumPrompts; ++i) {
    fixture.prompts.push_back(ToVector(*reference->Get(absl::StrCat("input_ids.", i))));
    fixture.logits.push_back(*reference->Get(absl::StrCat("logits.", i)));
    fixture.greedy.push_back(ToVector(*reference->Get(absl::StrCat("greedy.", i))));
  }
  return fixture;
}

double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kCPU, at::kFloat) - b.to(at::kCPU, at::kFloat)).abs().max().item<double>();
}

double RelativeError(const at::Tensor& actual, const at::Tensor& expected) {
  const at::Tensor e = expected.to(at::kCPU, at::kFloat);
  return (actual.to(at::kCPU, at::kFloat) - e).norm().item<double>() / e.norm().item<double>();
}

class GoldenTest : public testing::TestWithParam<std::tuple<std::string, Target>> {
 protected:
  void SetUp() override {
    const auto& [fixture_name, target] = GetParam();
    if (target.device == c10::kCUDA && !at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
    dir_ = std::string(MOELORA_TEST_DATA_DIR) + "/golden/" + fixture_name;
    fixture_ = LoadFixture(dir_);
    auto model = Model::Load(dir_, {.device = c10::Device(target.device), .dtype = target.dtype});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    fp32_ = target.dtype == at::kFloat;
  }

  // Checks one sequence's logits: fp32 within 1e-4 absolute, half types within 2e-2 relative.
  void ExpectLogitsMatch(const at::Tensor& actual, const at::Tensor& expected,
                         const std::string& what) {
    ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
    if (fp32_) {
      EXPECT_LE(MaxAbsDiff(actual, expected), 1e-4) << what;
    } else {
      const double error = RelativeError(actual, expected);
      EXPECT_LE(error, 2e-2) << what;
      std::cout << "[ metric   ] " << what << ": relative error " << error << "\n";
    }
  }

  std::string dir_;
  Fixture fixture_;
  std::unique_ptr<Model> model_;
  bool fp32_ = true;
};

// All prompts, of different lengths, in one batched prefill.
TEST_P(GoldenTest, BatchedPrefillLogitsMatchTransformers) {
  auto cache = model_->CreateKvCache(kNumPrompts, 32);
  ASSERT_TRUE(cache.ok()) << cache.status();
  std::vector<SequenceInput> batch;
  for (int i = 0; i < kNumPrompts; ++i) batch.push_back({i, fixture_.prompts[i]});
  auto out = model_->Forward(batch, *cache, {.all_logits = true});
  ASSERT_TRUE(out.ok()) << out.status();
  for (int i = 0; i < kNumPrompts; ++i) {
    const int64_t begin = out->token_offsets[i], end = out->token_offsets[i + 1];
    ExpectLogitsMatch(out->logits.slice(0, begin, end), fixture_.logits[i],
                      absl::StrCat("prompt ", i));
  }
}

TEST_P(GoldenTest, GreedyContinuationMatchesTransformers) {
  if (!fp32_) GTEST_SKIP() << "greedy tokens are compared in fp32 only";
  auto generated = GreedyGenerate(*model_, fixture_.prompts, 8);
  ASSERT_TRUE(generated.ok()) << generated.status();
  for (int i = 0; i < kNumPrompts; ++i) {
    EXPECT_EQ((*generated)[i], fixture_.greedy[i]) << "prompt " << i;
  }
}

// Prefill, then one token at a time through the cache, equals a full recompute of the whole
// sequence (and the prompt part equals transformers).
TEST_P(GoldenTest, CachedDecodeEqualsFullRecompute) {
  const std::vector<int64_t>& prompt = fixture_.prompts[1];
  const std::vector<int64_t>& continuation = fixture_.greedy[1];
  auto cache = model_->CreateKvCache(1, 32);
  ASSERT_TRUE(cache.ok());
  auto prefill = model_->Forward({{0, prompt}}, *cache);
  ASSERT_TRUE(prefill.ok()) << prefill.status();
  std::vector<at::Tensor> step_logits = {prefill->logits};
  for (size_t t = 0; t + 1 < continuation.size(); ++t) {
    auto step = model_->Forward({{0, {continuation[t]}}}, *cache);
    ASSERT_TRUE(step.ok()) << step.status();
    step_logits.push_back(step->logits);
  }
  EXPECT_EQ(cache->length(0), static_cast<int64_t>(prompt.size() + continuation.size() - 1));

  std::vector<int64_t> full = prompt;
  full.insert(full.end(), continuation.begin(), continuation.end() - 1);
  auto fresh = model_->CreateKvCache(1, 32);
  ASSERT_TRUE(fresh.ok());
  auto recompute = model_->Forward({{0, full}}, *fresh, {.all_logits = true});
  ASSERT_TRUE(recompute.ok()) << recompute.status();
  const at::Tensor expected = recompute->logits.slice(0, prompt.size() - 1);
  const at::Tensor cached = at::cat(step_logits, 0);
  if (fp32_) {
    EXPECT_LE(MaxAbsDiff(cached, expected), 1e-4);
  } else {
    EXPECT_LE(RelativeError(cached, expected), 2e-2);
  }
  ExpectLogitsMatch(recompute->logits.slice(0, 0, prompt.size()), fixture_.logits[1], "prompt");
}

// Continuous batching: one sequence decodes its second half while another prefills whole.
TEST_P(GoldenTest, MixedPrefillAndContinuationInOneBatch) {
  const std::vector<int64_t>& first = fixture_.prompts[1];
  const size_t split = 5;
  auto cache = model_->CreateKvCache(2, 32);
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE(model_->Forward({{1, {first.begin(), first.begin() + split}}}, *cache).ok());
  auto out = model_->Forward({{1, {first.begin() + split, first.end()}}, {0, fixture_.prompts[0]}},
                             *cache, {.all_logits = true});
  ASSERT_TRUE(out.ok()) << out.status();
  ExpectLogitsMatch(out->logits.slice(0, 0, out->token_offsets[1]),
                    fixture_.logits[1].slice(0, split), "continued sequence");
  ExpectLogitsMatch(out->logits.slice(0, out->token_offsets[1], out->token_offsets[2]),
                    fixture_.logits[0], "new sequence");
}

const Target kTargets[] = {
    {"cpu_fp32", c10::kCPU, at::kFloat},
    {"cuda_fp32", c10::kCUDA, at::kFloat},
    {"cuda_bf16", c10::kCUDA, at::kBFloat16},
    {"cuda_fp16", c10::kCUDA, at::kHalf},
};

INSTANTIATE_TEST_SUITE_P(Fixtures, GoldenTest,
                         testing::Combine(testing::Values("llama_gqa_llama3", "gemma",
                                                          "qwen2_qkv_bias",
                                                          "mistral_sliding_window"),
                                          testing::ValuesIn(kTargets)),
                         [](const testing::TestParamInfo<GoldenTest::ParamType>& info) {
                           return std::get<0>(info.param) + "_" + std::get<1>(info.param).name;
                         });

}  // namespace
}  // namespace moelora
