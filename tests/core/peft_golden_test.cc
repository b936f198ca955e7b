// The fused single pass against PEFT: adapters and logits in tests/data/peft were made by
// tools/golden/make_peft_golden.py with peft 0.21 on the tiny llama fixture.

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/mixture.h"

namespace moelora {
namespace {

constexpr int kNumPrompts = 3;
const char* const kAdapters[] = {"r4_qv", "r8_rslora_all", "r6_patterns", "r4_layer1_mlp"};

std::string DataDir() { return MOELORA_TEST_DATA_DIR; }

class PeftGoldenTest : public testing::Test {
 protected:
  void SetUp() override {
    // The server's layout: the pool's A in the projections' room.
    auto model = Model::Load(DataDir() + "/golden/llama_gqa_llama3", {.adapter_room = {4, 8}});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto pool = ExpertPool::Create(*model_, {.capacity = 4, .max_rank = 8});
    ASSERT_TRUE(pool.ok());
    pool_ = std::move(*pool);
    mixture_ = std::make_unique<Mixture>(*model_, *pool_);
    for (const char* name : kAdapters) {
      auto info = mixture_->AttachExpert(name, DataDir() + "/peft/" + name);
      ASSERT_TRUE(info.ok()) << info.status();
    }
    auto reference = Checkpoint::OpenFile(DataDir() + "/peft/reference.safetensors");
    ASSERT_TRUE(reference.ok()) << reference.status();
    reference_ = std::make_unique<Checkpoint>(std::move(*reference));
    for (int i = 0; i < kNumPrompts; ++i) {
      const at::Tensor ids = *reference_->Get(absl::StrCat("input_ids.", i));
      prompts_.emplace_back(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
    }
  }

  // Runs all prompts in one batch with `controls` and compares each with `<key>.logits.<i>`.
  void ExpectMatches(const RoutingControls& controls, const std::string& key) {
    std::vector<MixtureSequence> batch;
    for (int i = 0; i < kNumPrompts; ++i) batch.push_back({{i, prompts_[i]}, controls, nullptr});
    auto cache = model_->CreateKvCache(kNumPrompts, 32);
    auto out = mixture_->Forward(batch, *cache, {.all_logits = true});
    ASSERT_TRUE(out.ok()) << out.status();
    for (int i = 0; i < kNumPrompts; ++i) {
      const at::Tensor expected = *reference_->Get(absl::StrCat(key, ".logits.", i));
      const at::Tensor actual = out->forward.logits.slice(0, out->forward.token_offsets[i],
                                                          out->forward.token_offsets[i + 1]);
      EXPECT_LE((actual - expected).abs().max().item<double>(), 1e-4) << key << " prompt " << i;
    }
  }

  std::unique_ptr<Model> model_;
  std::unique_ptr<ExpertPool> pool_;
  std::unique_ptr<Mixture> mixture_;
  std::unique_ptr<Checkpoint> reference_;
  std::vector<std::vector<int64_t>> prompts_;
};

// Mixed ranks, rslora, rank/alpha patterns and a layer-restricted adapter share one pool; one-hot
// routing on each equals PEFT with that adapter alone.
TEST_F(PeftGoldenTest, OneHotRoutingEqualsPeftWithThatAdapterAlone) {
  for (const char* name : kAdapters) ExpectMatches({.pinned_expert = name}, name);
}

// Sequence-level weights 0.3 / 0.7 == PEFT with both adapters active and each scaling multiplied
// by its weight.
TEST_F(PeftGoldenTest, WeightedMixEqualsPeftWithBothAdaptersScaled) {
  ExpectMatches({.explicit_weights = {{"r4_qv", 0.3}, {"r8_rslora_all", 0.7}}},
                "mix_r4_qv_0.3_r8_rslora_all_0.7");
}

TEST_F(PeftGoldenTest, LoadedScalingsAreTheAdaptersOwn) {
  const auto infos = pool_->List();
  ASSERT_EQ(infos.size(), 4u);
  EXPECT_EQ(infos[0].name, "r4_qv");
  EXPECT_EQ(infos[1].max_rank, 8);
  EXPECT_EQ(infos[3].num_modules, 2);  // gate and up of layer 1
}

}  // namespace
}  // namespace moelora
