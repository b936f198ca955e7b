#include "core/model.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/random_model.h"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::HasSubstr;

// Each test writes its models into its own temporary directory.
class ModelTestBase : public testing::Test {
 protected:
  std::string FreshDir(const std::string& name) const { return temp_.Join(name); }

  std::string WriteTiny(const std::string& name, ModelType type = ModelType::kLlama,
                        RandomModelOptions options = {}) const {
    const std::string dir = FreshDir(name);
    const absl::Status status = WriteRandomModel(dir, TinyModelConfig(type), options);
    EXPECT_TRUE(status.ok()) << status;
    return dir;
  }

  testing_support::ScopedTempDir temp_{"model_test"};
};

class ModelLoadTest : public ModelTestBase {};

// Rewrites dir/model.safetensors after `edit` has changed the list of tensors.
void RewriteWeights(
    const std::string& dir,
    const std::function<void(std::vector<std::pair<std::string, at::Tensor>>&)>& edit) {
  auto checkpoint = Checkpoint::OpenFile(dir + "/model.safetensors");
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const std::string& name : checkpoint->Names())
    tensors.emplace_back(name, *checkpoint->Get(name));
  edit(tensors);
  ASSERT_TRUE(WriteTensors(dir + "/model.safetensors", tensors).ok());
}

TEST_F(ModelLoadTest, EveryFamilyLoadsAndCountsItsBytes) {
  for (ModelType type :
       {ModelType::kLlama, ModelType::kMistral, ModelType::kQwen2, ModelType::kGemma}) {
    const std::string dir = WriteTiny(absl::StrCat("family_", ModelTypeName(type)), type);
    auto model = Model::Load(dir);
    ASSERT_TRUE(model.ok()) << ModelTypeName(type) << ": " << model.status();
    EXPECT_EQ((*model)->config().model_type, type);
    EXPECT_GT((*model)->parameter_bytes(), 100'000);
    const Linear& q = (*model)->projection(1, ProjectionKind::kQ);
    EXPECT_EQ(q.out_features(), (*model)->config().q_size());
    EXPECT_EQ(q.bias().defined(), type == ModelType::kQwen2);
  }
}

// Last-token logits of one four-token prompt in a fresh cache.
at::Tensor FourTokenLogits(const Model& model) {
  auto cache = model.CreateKvCache(1, 16);
  EXPECT_TRUE(cache.ok()) << cache.status();
  if (!cache.ok()) return at::Tensor();
  auto out = model.Forward({{0, {1, 2, 3, 4}}}, *cache);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? out->logits : at::Tensor();
}

TEST_F(ModelLoadTest, ShardedCheckpointGivesTheSameLogits) {
  const std::string single = WriteTiny("single", ModelType::kLlama, {.seed = 3});
  const std::string sharded = WriteTiny("sharded", ModelType::kLlama, {.seed = 3, .num_shards = 3});
  ASSERT_TRUE(std::filesystem::exists(sharded + "/model.safetensors.index.json"));
  auto a = Model::Load(single);
  auto b = Model::Load(sharded);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(at::equal(FourTokenLogits(**a), FourTokenLogits(**b)));
}

// Room for adapter rows after each weight (qwen2: and its bias) changes neither the weights'
// bytes nor the base model's logits; the room starts as zeros and one pool at a time owns it.
TEST_F(ModelLoadTest, AdapterRoomLeavesTheBaseModelAlone) {
  const std::string dir = WriteTiny("room", ModelType::kQwen2, {.seed = 4});
  auto plain = Model::Load(dir);
  auto roomy = Model::Load(dir, {.adapter_room = {3, 8}});
  ASSERT_TRUE(plain.ok() && roomy.ok());
  EXPECT_EQ((*roomy)->parameter_bytes(), (*plain)->parameter_bytes());
  const Linear& k = (*roomy)->projection(1, ProjectionKind::kK);
  EXPECT_EQ(k.room().sizes(), (std::vector<int64_t>{3, 8, k.in_features()}));
  EXPECT_TRUE(at::equal(k.room(), at::zeros_like(k.room())));
  EXPECT_TRUE(at::equal(k.weight(), (*plain)->projection(1, ProjectionKind::kK).weight()));
  EXPECT_FALSE((*plain)->projection(1, ProjectionKind::kK).room().defined());
  // gate's output is wider than its input: the room is columns beside the weight.
  const Linear& gate = (*roomy)->projection(0, ProjectionKind::kGate);
  EXPECT_EQ(gate.room_layout(), RoomLayout::kColumns);
  EXPECT_EQ(gate.room().sizes(), (std::vector<int64_t>{3, 8, gate.out_features()}));
  EXPECT_TRUE(at::equal(gate.weight(), (*plain)->projection(0, ProjectionKind::kGate).weight()));
  EXPECT_TRUE(at::equal(FourTokenLogits(**plain), FourTokenLogits(**roomy)));
  // A pool big enough for sparse routing keeps gate's A in row room instead (its Bᵀ row-major
  // in the pool's buffers), unless told otherwise.
  auto big = Model::Load(dir, {.adapter_room = {kSparsePoolSlots, 8}});
  auto big_columns =
      Model::Load(dir, {.adapter_room = {kSparsePoolSlots, 8, RoomLayout::kColumns}});
  ASSERT_TRUE(big.ok() && big_columns.ok());
  const Linear& big_gate = (*big)->projection(0, ProjectionKind::kGate);
  EXPECT_EQ(big_gate.room_layout(), RoomLayout::kRows);
  EXPECT_EQ(big_gate.room().sizes(),
            (std::vector<int64_t>{kSparsePoolSlots, 8, big_gate.in_features()}));
  EXPECT_TRUE(at::equal(FourTokenLogits(**plain), FourTokenLogits(**big)));
  EXPECT_EQ((*big_columns)->projection(0, ProjectionKind::kGate).room_layout(),
            RoomLayout::kColumns);
  EXPECT_EQ((*big)->projection(0, ProjectionKind::kDown).room_layout(), RoomLayout::kRows);

  EXPECT_FALSE((*plain)->ClaimAdapterRoom());
  EXPECT_TRUE((*roomy)->ClaimAdapterRoom());
  EXPECT_FALSE((*roomy)->ClaimAdapterRoom());
  (*roomy)->ReleaseAdapterRoom();
  EXPECT_TRUE((*roomy)->ClaimAdapterRoom());
  EXPECT_EQ(Model::Load(dir, {.adapter_room = {-1, 8}}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ModelLoadTest, MissingTensorIsNamed) {
  const std::string dir = WriteTiny("missing_tensor");
  RewriteWeights(dir, [](auto& tensors) {
    std::erase_if(tensors,
                  [](const auto& t) { return t.first == "model.layers.1.mlp.up_proj.weight"; });
  });
  auto model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(model.status().message(), HasSubstr("model.layers.1.mlp.up_proj.weight"));
  EXPECT_THAT(model.status().message(), HasSubstr(dir));
}

TEST_F(ModelLoadTest, ShapeThatDisagreesWithConfigIsNamed) {
  const std::string dir = WriteTiny("bad_shape");
  RewriteWeights(dir, [](auto& tensors) {
    for (auto& [name, tensor] : tensors) {
      if (name == "model.layers.0.self_attn.k_proj.weight") tensor = at::zeros({48, 64});
    }
  });
  auto model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(model.status().message(), HasSubstr("model.layers.0.self_attn.k_proj.weight"));
  EXPECT_THAT(model.status().message(), HasSubstr("[48, 64]"));
  EXPECT_THAT(model.status().message(), HasSubstr("[32, 64]"));
}

TEST_F(ModelLoadTest, IntegerWeightsAreRefused) {
  const std::string dir = WriteTiny("int_weights");
  RewriteWeights(dir, [](auto& tensors) {
    for (auto& [name, tensor] : tensors) {
      if (name == "model.norm.weight") tensor = at::ones({64}, at::kLong);
    }
  });
  auto model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("model.norm.weight"));
  EXPECT_THAT(model.status().message(), HasSubstr("floating"));
}

TEST_F(ModelLoadTest, TruncatedWeightsFileIsAnError) {
  const std::string dir = WriteTiny("truncated");
  const std::string file = dir + "/model.safetensors";
  std::filesystem::resize_file(file, std::filesystem::file_size(file) / 2);
  auto model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("model.safetensors"));
}

TEST_F(ModelLoadTest, UnknownModelTypeAndMissingConfig) {
  const std::string dir = WriteTiny("unknown_type");
  std::ofstream(dir + "/config.json") << R"({"model_type": "falcon", "vocab_size": 128})";
  auto model = Model::Load(dir);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(model.status().message(), HasSubstr("falcon"));
  EXPECT_THAT(model.status().message(), HasSubstr("config.json"));

  EXPECT_EQ(Model::Load(FreshDir("nothing_here")).status().code(), absl::StatusCode::kNotFound);
}

class ModelForwardTest : public ModelTestBase {
 protected:
  void SetUp() override {
    dir_ = WriteTiny("forward", ModelType::kGemma, {.seed = 11});
    auto model = Model::Load(dir_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }
  std::string dir_;
  std::unique_ptr<Model> model_;
};

TEST_F(ModelForwardTest, BatchEqualsSequencesAlone) {
  const std::vector<std::vector<int64_t>> prompts = {{5, 9, 1, 44, 3}, {7}, {100, 2, 8}};
  auto batch_cache = model_->CreateKvCache(3, 16);
  std::vector<SequenceInput> batch;
  for (int i = 0; i < 3; ++i) batch.push_back({2 - i, prompts[i]});  // slots in any order
  auto batched = model_->Forward(batch, *batch_cache);
  ASSERT_TRUE(batched.ok()) << batched.status();
  ASSERT_EQ(batched->logits.size(0), 3);
  for (int i = 0; i < 3; ++i) {
    auto cache = model_->CreateKvCache(1, 16);
    auto alone = model_->Forward({{0, prompts[i]}}, *cache);
    ASSERT_TRUE(alone.ok());
    EXPECT_LE((batched->logits[i] - alone->logits[0]).abs().max().item<double>(), 1e-5) << i;
    EXPECT_EQ(batch_cache->length(2 - i), static_cast<int64_t>(prompts[i].size()));
  }
}

TEST_F(ModelForwardTest, ReturnsHiddenAndAllLogits) {
  auto cache = model_->CreateKvCache(2, 16);
  auto out = model_->Forward({{0, {1, 2, 3}}, {1, {4, 5}}}, *cache,
                             {.all_logits = true, .return_hidden = true});
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(out->logits.sizes(), (std::vector<int64_t>{5, 128}));
  EXPECT_EQ(out->hidden.sizes(), (std::vector<int64_t>{5, 64}));
  EXPECT_EQ(out->token_offsets, (std::vector<int64_t>{0, 3, 5}));
}

TEST_F(ModelForwardTest, GemmaEmbeddingsAreScaled) {
  auto embedded = model_->Embed({3, 4});
  ASSERT_TRUE(embedded.ok());
  auto checkpoint = Checkpoint::OpenFile(dir_ + "/model.safetensors");
  ASSERT_TRUE(checkpoint.ok());
  const at::Tensor table = *checkpoint->Get("model.embed_tokens.weight");
  EXPECT_TRUE(at::allclose((*embedded)[1], table[4] * 8.0));  // sqrt(hidden_size = 64)
  EXPECT_FALSE(model_->Embed({128}).ok());
}

TEST_F(ModelForwardTest, Bf16OnCpuTracksFp32) {
  auto bf16 = Model::Load(WriteTiny("forward_bf16", ModelType::kGemma, {.seed = 11}),
                          {.dtype = at::kBFloat16});
  ASSERT_TRUE(bf16.ok());
  auto cache32 = model_->CreateKvCache(1, 16);
  auto cache16 = (*bf16)->CreateKvCache(1, 16);
  auto a = model_->Forward({{0, {1, 2, 3, 4, 5, 6}}}, *cache32, {.all_logits = true});
  auto b = (*bf16)->Forward({{0, {1, 2, 3, 4, 5, 6}}}, *cache16, {.all_logits = true});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(b->logits.scalar_type(), at::kBFloat16);
  const double relative = (b->logits.to(at::kFloat) - a->logits).norm().item<double>() /
                          a->logits.norm().item<double>();
  EXPECT_LE(relative, 2e-2);
}

TEST_F(ModelForwardTest, BadInputIsRejectedAndLeavesTheCacheAlone) {
  auto cache = model_->CreateKvCache(2, 8);
  ASSERT_TRUE(model_->Forward({{0, {1, 2}}}, *cache).ok());
  const struct {
    std::vector<SequenceInput> batch;
    const char* message;
  } cases[] = {
      {{}, "empty batch"},          {{{0, {1, 128}}}, "token id 128"},
      {{{0, {-1}}}, "token id -1"}, {{{2, {1}}}, "slot 2"},
      {{{-1, {1}}}, "slot -1"},     {{{1, {1}}, {1, {2}}}, "appears twice"},
      {{{1, {}}}, "no tokens"},     {{{0, {1, 2, 3, 4, 5, 6, 7}}}, "max_seq_len 8"},
  };
  for (const auto& c : cases) {
    auto out = model_->Forward(c.batch, *cache);
    ASSERT_FALSE(out.ok()) << c.message;
    EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(out.status().message(), HasSubstr(c.message));
  }
  EXPECT_EQ(cache->length(0), 2);
  EXPECT_EQ(cache->length(1), 0);
  KvCache foreign;
  EXPECT_FALSE(model_->Forward({{0, {1}}}, foreign).ok());
  EXPECT_FALSE(model_->CreateKvCache(0, 8).ok());
}

TEST_F(ModelForwardTest, ResetSlotStartsOver) {
  auto cache = model_->CreateKvCache(1, 8);
  auto first = model_->Forward({{0, {9, 8, 7}}}, *cache);
  ASSERT_TRUE(first.ok());
  cache->Reset(0);
  auto again = model_->Forward({{0, {9, 8, 7}}}, *cache);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(at::equal(first->logits, again->logits));
  EXPECT_EQ(cache->bytes(), 2 * 2 * 8 * 1 * 32 * 4);  // layers x (k, v) x tokens x kv x dim x fp32
}

}  // namespace
}  // namespace moelora

namespace moelora {
namespace {

TEST(ParseLoadOptionsTest, AutoAndExplicitValues) {
  auto automatic = ParseLoadOptions("auto", "auto");
  ASSERT_TRUE(automatic.ok()) << automatic.status();
  EXPECT_EQ(automatic->device.is_cuda(), at::hasCUDA());
  EXPECT_EQ(automatic->dtype, at::hasCUDA() ? at::kBFloat16 : at::kFloat);
  auto cpu = ParseLoadOptions("cpu", "fp16");
  ASSERT_TRUE(cpu.ok());
  EXPECT_TRUE(cpu->device.is_cpu());
  EXPECT_EQ(cpu->dtype, at::kHalf);
  EXPECT_EQ(ParseLoadOptions("gpu", "auto").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseLoadOptions("cpu", "bf17").status().code(), absl::StatusCode::kInvalidArgument);
  if (!at::hasCUDA()) {
    EXPECT_EQ(ParseLoadOptions("cuda", "auto").status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(ParseWideRoomLayoutTest, AutoRowsColumns) {
  EXPECT_EQ(ParseWideRoomLayout("auto").value(), std::nullopt);
  EXPECT_EQ(ParseWideRoomLayout("rows").value(), RoomLayout::kRows);
  EXPECT_EQ(ParseWideRoomLayout("columns").value(), RoomLayout::kColumns);
  EXPECT_EQ(ParseWideRoomLayout("cols").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace moelora
