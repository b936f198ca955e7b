#include "core/adapter.h"

#include <ATen/ATen.h>
#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/linear.h"
#include "core/random_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::ordered_json;
using Tensors = std::vector<std::pair<std::string, at::Tensor>>;

// Debian's gtest matchers do not take absl::string_view.
std::string Message(const absl::Status& status) { return std::string(status.message()); }

constexpr ProjectionKind kAllKinds[] = {
    ProjectionKind::kQ,    ProjectionKind::kK,  ProjectionKind::kV,   ProjectionKind::kO,
    ProjectionKind::kGate, ProjectionKind::kUp, ProjectionKind::kDown};

std::string Path(int64_t layer, ProjectionKind kind) {
  return ProjectionId{layer, kind}.ModulePath();
}

std::string KeyA(int64_t layer, ProjectionKind kind) {
  return absl::StrCat("base_model.model.", Path(layer, kind), ".lora_A.weight");
}
std::string KeyB(int64_t layer, ProjectionKind kind) {
  return absl::StrCat("base_model.model.", Path(layer, kind), ".lora_B.weight");
}

// adapter_config.json as PEFT 0.21 writes it for a plain LoRA (every field it saves).
Json PeftConfig(Json target_modules, int64_t r = 4, double alpha = 8) {
  Json json;
  json["alora_invocation_tokens"] = nullptr;
  json["alpha_pattern"] = Json::object();
  json["arrow_config"] = nullptr;
  json["auto_mapping"] = nullptr;
  json["base_model_name_or_path"] = "tests/data/golden/llama_gqa_llama3";
  json["bias"] = "none";
  json["corda_config"] = nullptr;
  json["ensure_weight_tying"] = false;
  json["eva_config"] = nullptr;
  json["exclude_modules"] = nullptr;
  json["fan_in_fan_out"] = false;
  json["inference_mode"] = true;
  json["init_lora_weights"] = true;
  json["layer_replication"] = nullptr;
  json["layers_pattern"] = nullptr;
  json["layers_to_transform"] = nullptr;
  json["loftq_config"] = Json::object();
  json["lora_alpha"] = alpha;
  json["lora_bias"] = false;
  json["lora_dropout"] = 0.0;
  json["megatron_config"] = nullptr;
  json["megatron_core"] = "megatron.core";
  json["modules_to_save"] = nullptr;
  json["peft_type"] = "LORA";
  json["peft_version"] = "0.21.0";
  json["qalora_group_size"] = 16;
  json["r"] = r;
  json["rank_pattern"] = Json::object();
  json["revision"] = nullptr;
  json["target_modules"] = std::move(target_modules);
  json["target_parameters"] = nullptr;
  json["task_type"] = "CAUSAL_LM";
  json["trainable_token_indices"] = nullptr;
  json["use_dora"] = false;
  json["use_qalora"] = false;
  json["use_rslora"] = false;
  return json;
}

absl::StatusOr<AdapterConfig> ParseConfig(const Json& json) {
  return AdapterConfig::FromJson(json.dump(), "adapter_config.json");
}

class AdapterTest : public ::testing::Test {
 protected:
  void SetUp() override { at::manual_seed(1234); }

  // A fresh adapter directory under the test's temp dir.
  std::string NewDir() {
    const std::string dir = temp_.Join(absl::StrCat("adapter", next_dir_++));
    EXPECT_EQ(::mkdir(dir.c_str(), 0755), 0) << dir;
    return dir;
  }

  static void WriteText(const std::string& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    ASSERT_TRUE(out.good()) << path;
  }

  // A and B for one projection of the tiny model: A [rank, in], B [out, rank].
  Tensors Factors(int64_t layer, ProjectionKind kind, int64_t rank) const {
    int64_t in = base_.hidden_size;
    int64_t out = base_.hidden_size;
    switch (kind) {
      case ProjectionKind::kQ:
        out = base_.q_size();
        break;
      case ProjectionKind::kK:
      case ProjectionKind::kV:
        out = base_.kv_size();
        break;
      case ProjectionKind::kO:
        in = base_.q_size();
        break;
      case ProjectionKind::kGate:
      case ProjectionKind::kUp:
        out = base_.intermediate_size;
        break;
      case ProjectionKind::kDown:
        in = base_.intermediate_size;
        break;
    }
    return {{KeyA(layer, kind), at::randn({rank, in})},
            {KeyB(layer, kind), at::randn({out, rank})}};
  }

  // Factors of `kinds` in every layer at one rank.
  Tensors AllLayers(std::initializer_list<ProjectionKind> kinds, int64_t rank) const {
    Tensors tensors;
    for (int64_t layer = 0; layer < base_.num_hidden_layers; ++layer) {
      for (ProjectionKind kind : kinds) {
        for (auto& entry : Factors(layer, kind, rank)) tensors.push_back(std::move(entry));
      }
    }
    return tensors;
  }

  std::string Write(const std::string& config_text, const Tensors& tensors) {
    const std::string dir = NewDir();
    WriteText(dir + "/adapter_config.json", config_text);
    EXPECT_TRUE(WriteTensors(dir + "/adapter_model.safetensors", tensors).ok());
    return dir;
  }

  absl::StatusOr<Adapter> Load(const Json& config, const Tensors& tensors) {
    return Adapter::Load("math", Write(config.dump(2), tensors), base_);
  }

  ModelConfig base_ = TinyModelConfig(ModelType::kLlama);
  testing_support::ScopedTempDir temp_{"adapter_test"};
  int next_dir_ = 0;
};

TEST_F(AdapterTest, TinyModelShapes) {
  EXPECT_EQ(base_.hidden_size, 64);
  EXPECT_EQ(base_.q_size(), 64);
  EXPECT_EQ(base_.kv_size(), 32);
  EXPECT_EQ(base_.intermediate_size, 128);
  EXPECT_EQ(base_.num_hidden_layers, 2);
}

TEST_F(AdapterTest, ListTargetsLoadSortedWithDefaultScaling) {
  Tensors tensors = AllLayers({ProjectionKind::kV, ProjectionKind::kQ}, 4);
  auto adapter = Load(PeftConfig({"q_proj", "v_proj"}, 4, 8), tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->name(), "math");
  ASSERT_EQ(adapter->modules().size(), 4u);
  const std::pair<int64_t, ProjectionKind> order[] = {{0, ProjectionKind::kQ},
                                                      {0, ProjectionKind::kV},
                                                      {1, ProjectionKind::kQ},
                                                      {1, ProjectionKind::kV}};
  for (size_t i = 0; i < 4; ++i) {
    const AdapterModule& module = adapter->modules()[i];
    SCOPED_TRACE(module.id.ModulePath());
    EXPECT_EQ(module.id.layer, order[i].first);
    EXPECT_EQ(module.id.kind, order[i].second);
    EXPECT_EQ(module.rank, 4);
    EXPECT_DOUBLE_EQ(module.scaling, 2.0);  // alpha / r
    EXPECT_EQ(module.a.scalar_type(), at::kFloat);
    EXPECT_TRUE(module.a.is_contiguous());
    EXPECT_EQ(module.a.sizes(), (std::vector<int64_t>{4, 64}));
    const int64_t out = module.id.kind == ProjectionKind::kQ ? 64 : 32;
    EXPECT_EQ(module.b.sizes(), (std::vector<int64_t>{out, 4}));
  }
  // Values survive: layer 1 v_proj's A was written third from last.
  for (const auto& [key, tensor] : tensors) {
    if (key == KeyA(1, ProjectionKind::kV)) {
      EXPECT_TRUE(at::equal(adapter->modules()[3].a, tensor));
    }
  }
  EXPECT_EQ(adapter->max_rank(), 4);
  // q: 4*64 + 64*4; v: 4*64 + 32*4; two layers; fp32.
  EXPECT_EQ(adapter->bytes(), 2 * (512 + 384) * 4);
  EXPECT_EQ(adapter->bytes(2), 2 * (512 + 384) * 2);
}

TEST_F(AdapterTest, ListMatchesNamesAndDottedSuffixesOnly) {
  auto config = ParseConfig(PeftConfig({"q_proj", "mlp.down_proj", "proj"}));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(config->Targets("model.layers.0.self_attn.q_proj", 0));
  EXPECT_TRUE(config->Targets("model.layers.1.mlp.down_proj", 1));
  EXPECT_FALSE(config->Targets("model.layers.0.self_attn.k_proj", 0));  // "proj" is not ".proj"
  EXPECT_FALSE(config->Targets("model.layers.0.self_attn.xq_proj", 0));
  EXPECT_TRUE(config->Targets("q_proj", 0));  // equal to an entry

  // A full path is matched exactly.
  auto adapter =
      Load(PeftConfig({"model.layers.1.self_attn.q_proj"}), Factors(1, ProjectionKind::kQ, 4));
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ASSERT_EQ(adapter->modules().size(), 1u);
  EXPECT_EQ(adapter->modules()[0].id.layer, 1);
}

TEST_F(AdapterTest, RegexTargetIsAFullMatch) {
  Json json = PeftConfig(R"(.*\.layers\.1\.mlp\.(gate|up)_proj)");
  Tensors tensors = Factors(1, ProjectionKind::kGate, 4);
  for (auto& entry : Factors(1, ProjectionKind::kUp, 4)) tensors.push_back(std::move(entry));
  auto adapter = Load(json, tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ASSERT_EQ(adapter->modules().size(), 2u);
  EXPECT_EQ(adapter->modules()[0].id.kind, ProjectionKind::kGate);
  EXPECT_EQ(adapter->modules()[1].id.kind, ProjectionKind::kUp);

  auto config = ParseConfig(PeftConfig("q_proj"));  // a regex string, not a list entry
  ASSERT_TRUE(config.ok());
  EXPECT_FALSE(config->Targets("model.layers.0.self_attn.q_proj", 0));
  config = ParseConfig(PeftConfig(R"(model\.layers\.\d+\.self_attn\.(q|v)_proj)"));
  ASSERT_TRUE(config.ok());
  EXPECT_TRUE(config->Targets("model.layers.1.self_attn.v_proj", 1));
  EXPECT_FALSE(config->Targets("model.layers.1.self_attn.k_proj", 1));
  EXPECT_FALSE(config->Targets("base.model.layers.1.self_attn.v_proj", 1));

  auto bad = ParseConfig(PeftConfig("(q_proj"));
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(Message(bad.status()), HasSubstr("target_modules"));
}

TEST_F(AdapterTest, AllLinearTargetsEveryProjection) {
  Tensors tensors;
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (ProjectionKind kind : kAllKinds) {
      for (auto& entry : Factors(layer, kind, 8)) tensors.push_back(std::move(entry));
    }
  }
  auto adapter = Load(PeftConfig("all-linear", 8, 16), tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->modules().size(), 14u);
  EXPECT_EQ(adapter->modules()[6].id.kind, ProjectionKind::kDown);
  EXPECT_EQ(adapter->modules()[7].id.layer, 1);
  EXPECT_TRUE(adapter->config().all_linear);
  EXPECT_FALSE(adapter->config().Targets("lm_head", 0));

  // What PEFT saves after expanding "all-linear": the full module names.
  Json names = Json::array();
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (ProjectionKind kind : kAllKinds) names.push_back(Path(layer, kind));
  }
  adapter = Load(PeftConfig(names, 8, 16), tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->modules().size(), 14u);

  // Missing one projection is an error, not a skip.
  Tensors fewer(tensors.begin(), tensors.end() - 2);
  auto missing = Load(PeftConfig("all-linear", 8, 16), fewer);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(Message(missing.status()), HasSubstr("model.layers.1.mlp.down_proj"));
}

TEST_F(AdapterTest, ExcludeModulesListAndRegex) {
  Json json = PeftConfig("all-linear");
  json["exclude_modules"] = {"o_proj", "model.layers.0.mlp.down_proj"};
  Tensors tensors;
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (ProjectionKind kind : kAllKinds) {
      if (kind == ProjectionKind::kO) continue;
      if (layer == 0 && kind == ProjectionKind::kDown) continue;
      for (auto& entry : Factors(layer, kind, 4)) tensors.push_back(std::move(entry));
    }
  }
  auto adapter = Load(json, tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->modules().size(), 11u);

  // A key for an excluded module is refused, naming exclude_modules.
  Tensors extra = tensors;
  for (auto& entry : Factors(1, ProjectionKind::kO, 4)) extra.push_back(std::move(entry));
  auto refused = Load(json, extra);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(Message(refused.status()), HasSubstr("model.layers.1.self_attn.o_proj"));
  EXPECT_THAT(Message(refused.status()), HasSubstr("exclude_modules"));

  json = PeftConfig({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"});
  json["exclude_modules"] = R"(.*\.layers\.0\..*)";
  tensors.clear();
  for (ProjectionKind kind : kAllKinds) {
    for (auto& entry : Factors(1, kind, 4)) tensors.push_back(std::move(entry));
  }
  adapter = Load(json, tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->modules().size(), 7u);
  EXPECT_EQ(adapter->modules().front().id.layer, 1);
}

TEST_F(AdapterTest, LayersToTransformIntAndList) {
  Json json = PeftConfig({"q_proj", "down_proj"});
  json["layers_to_transform"] = 1;
  Tensors layer1 = Factors(1, ProjectionKind::kQ, 4);
  for (auto& entry : Factors(1, ProjectionKind::kDown, 4)) layer1.push_back(std::move(entry));
  auto adapter = Load(json, layer1);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ASSERT_EQ(adapter->modules().size(), 2u);
  EXPECT_EQ(adapter->modules()[0].id.layer, 1);
  EXPECT_EQ(adapter->config().layers_to_transform, std::vector<int64_t>{1});

  // Layer 0's q_proj in the file is not selected.
  Tensors both = layer1;
  for (auto& entry : Factors(0, ProjectionKind::kQ, 4)) both.push_back(std::move(entry));
  auto refused = Load(json, both);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(Message(refused.status()), HasSubstr("model.layers.0.self_attn.q_proj"));
  EXPECT_THAT(Message(refused.status()), HasSubstr("layers_to_transform"));

  json["layers_to_transform"] = {0};
  json["layers_pattern"] = "layers";
  Tensors layer0 = Factors(0, ProjectionKind::kQ, 4);
  for (auto& entry : Factors(0, ProjectionKind::kDown, 4)) layer0.push_back(std::move(entry));
  adapter = Load(json, layer0);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->modules().size(), 2u);
  EXPECT_EQ(adapter->modules()[1].id.layer, 0);

  auto config = ParseConfig(json);
  ASSERT_TRUE(config.ok());
  EXPECT_TRUE(config->Targets("model.layers.0.mlp.down_proj", 0));
  EXPECT_FALSE(config->Targets("model.layers.1.mlp.down_proj", 1));
  json["layers_pattern"] = {"h", "blocks"};  // matches no layer of ours: nothing targeted
  config = ParseConfig(json);
  ASSERT_TRUE(config.ok());
  EXPECT_FALSE(config->Targets("model.layers.0.mlp.down_proj", 0));

  // A full module name in the list is targeted whatever layers_to_transform says (PEFT's rule).
  json = PeftConfig({"model.layers.1.self_attn.k_proj", "q_proj"});
  json["layers_to_transform"] = {0};
  config = ParseConfig(json);
  ASSERT_TRUE(config.ok());
  EXPECT_TRUE(config->Targets("model.layers.1.self_attn.k_proj", 1));
  EXPECT_TRUE(config->Targets("model.layers.0.self_attn.q_proj", 0));
  EXPECT_FALSE(config->Targets("model.layers.1.self_attn.q_proj", 1));
}

TEST_F(AdapterTest, LayerOptionsPeftRefusesAreRefused) {
  Json json = PeftConfig(R"(.*\.q_proj)");
  json["layers_to_transform"] = {1};
  auto config = ParseConfig(json);
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(Message(config.status()), HasSubstr("layers_to_transform"));

  json = PeftConfig({"q_proj"});
  json["layers_pattern"] = "layers";
  config = ParseConfig(json);
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(Message(config.status()), HasSubstr("layers_pattern"));

  json = PeftConfig({"q_proj"});
  json["layers_to_transform"] = "1";
  config = ParseConfig(json);
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(Message(config.status()), HasSubstr("layers_to_transform"));
}

TEST_F(AdapterTest, RankAndAlphaPatterns) {
  Json json = PeftConfig(
      {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, 6, 12);
  json["rank_pattern"] = {{"o_proj", 2}, {"model.layers.1.mlp.down_proj", 3}};
  json["alpha_pattern"] = {{"down_proj", 3.0}};
  Tensors tensors;
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (ProjectionKind kind : kAllKinds) {
      int64_t rank = 6;
      if (kind == ProjectionKind::kO) rank = 2;
      if (layer == 1 && kind == ProjectionKind::kDown) rank = 3;
      for (auto& entry : Factors(layer, kind, rank)) tensors.push_back(std::move(entry));
    }
  }
  auto adapter = Load(json, tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ASSERT_EQ(adapter->modules().size(), 14u);
  int64_t expected_bytes = 0;
  for (const AdapterModule& module : adapter->modules()) {
    SCOPED_TRACE(module.id.ModulePath());
    expected_bytes += (module.a.numel() + module.b.numel()) * 4;
    if (module.id.kind == ProjectionKind::kO) {
      EXPECT_EQ(module.rank, 2);
      EXPECT_DOUBLE_EQ(module.scaling, 6.0);  // 12 / 2
    } else if (module.id.kind == ProjectionKind::kDown && module.id.layer == 1) {
      EXPECT_EQ(module.rank, 3);
      EXPECT_DOUBLE_EQ(module.scaling, 1.0);  // 3 / 3
    } else if (module.id.kind == ProjectionKind::kDown) {
      EXPECT_EQ(module.rank, 6);
      EXPECT_DOUBLE_EQ(module.scaling, 0.5);  // 3 / 6
    } else {
      EXPECT_EQ(module.rank, 6);
      EXPECT_DOUBLE_EQ(module.scaling, 2.0);  // 12 / 6
    }
  }
  EXPECT_EQ(adapter->max_rank(), 6);
  EXPECT_EQ(adapter->bytes(), expected_bytes);
}

// PEFT 0.21's get_pattern_key: re.match(rf"(.*\.)?({key})$", name), first key in file order.
TEST_F(AdapterTest, PatternKeysMatchAsPeftDoesFirstKeyWins) {
  const std::string q0 = "model.layers.0.self_attn.q_proj";
  auto config = AdapterConfig::FromJson(
      R"({"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"],
          "rank_pattern": {"model.layers.0.self_attn.q_proj": 2, "q_proj": 5}})",
      "a");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->RankFor(q0), 2);
  EXPECT_EQ(config->RankFor("model.layers.1.self_attn.q_proj"), 5);
  EXPECT_EQ(config->rank_pattern_order,
            (std::vector<std::string>{"model.layers.0.self_attn.q_proj", "q_proj"}));

  config = AdapterConfig::FromJson(
      R"({"r": 8, "target_modules": ["q_proj"],
          "rank_pattern": {"q_proj": 5, "model.layers.0.self_attn.q_proj": 2}})",
      "a");
  ASSERT_TRUE(config.ok());
  EXPECT_EQ(config->RankFor(q0), 5);  // sorted order would have picked 2

  config = AdapterConfig::FromJson(
      R"({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
          "rank_pattern": {"_proj": 1, "layers.0.self_attn.q_proj": 4, "layers\\.1\\..*": 2},
          "alpha_pattern": {"^model.layers.1.self_attn.q_proj": 4}})",
      "a");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->RankFor(q0), 4);  // "_proj" needs a dot before it
  EXPECT_EQ(config->RankFor("model.layers.1.self_attn.q_proj"), 2);
  EXPECT_EQ(config->RankFor("model.layers.0.self_attn.q_proj_extra"), 8);
  EXPECT_DOUBLE_EQ(config->ScalingFor(q0), 16.0 / 4);
  EXPECT_DOUBLE_EQ(config->ScalingFor("model.layers.1.self_attn.q_proj"), 4.0 / 2);

  auto bad =
      AdapterConfig::FromJson(R"({"target_modules": ["q_proj"], "rank_pattern": {"[": 2}})", "a");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(Message(bad.status()), HasSubstr("rank_pattern"));
  bad = AdapterConfig::FromJson(R"({"target_modules": ["q_proj"], "rank_pattern": {"q_proj": 0}})",
                                "a");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(Message(bad.status()), HasSubstr("rank_pattern"));
  bad = AdapterConfig::FromJson(
      R"({"target_modules": ["q_proj"], "alpha_pattern": {"q_proj": "big"}})", "a");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(Message(bad.status()), HasSubstr("alpha_pattern"));
}

TEST_F(AdapterTest, RsLoraScalesByAlphaOverSqrtRank) {
  Json json = PeftConfig({"q_proj"}, 16, 8);
  json["use_rslora"] = true;
  json["rank_pattern"] = {{"model.layers.1.self_attn.q_proj", 9}};
  Tensors tensors = Factors(0, ProjectionKind::kQ, 16);
  for (auto& entry : Factors(1, ProjectionKind::kQ, 9)) tensors.push_back(std::move(entry));
  auto adapter = Load(json, tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ASSERT_EQ(adapter->modules().size(), 2u);
  EXPECT_DOUBLE_EQ(adapter->modules()[0].scaling, 8.0 / 4.0);
  EXPECT_DOUBLE_EQ(adapter->modules()[1].scaling, 8.0 / 3.0);
  EXPECT_EQ(adapter->max_rank(), 16);

  json["use_rslora"] = false;
  json["lora_alpha"] = 12.5;
  auto config = ParseConfig(json);
  ASSERT_TRUE(config.ok());
  EXPECT_DOUBLE_EQ(config->ScalingFor("model.layers.0.self_attn.q_proj"), 12.5 / 16);
}

TEST_F(AdapterTest, AcceptedOptionsAndHalfPrecisionWeights) {
  Json json = PeftConfig({"q_proj"});
  json["fan_in_fan_out"] = true;  // PEFT forces it to false for nn.Linear
  json["init_lora_weights"] = "gaussian";
  json["runtime_config"] = {{"ephemeral_gpu_offload", true}};
  json["some_future_field"] = {1, 2, 3};
  json["modules_to_save"] = Json::array();
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  for (auto& [key, tensor] : tensors) tensor = tensor.to(at::kBFloat16);
  auto adapter = Load(json, tensors);
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ(adapter->modules()[0].a.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(adapter->modules()[0].a, tensors[0].second.to(at::kFloat)));
  for (Json init : {Json(false), Json("orthogonal"), Json("mica")}) {
    json["init_lora_weights"] = init;
    EXPECT_TRUE(ParseConfig(json).ok()) << init.dump();
  }
}

// adapter_config.json exactly as PEFT 0.21 saved it (keys sorted, rank_pattern included) for
// LoraConfig(r=6, lora_alpha=12, target_modules=[all 7], rank_pattern={"o_proj": 2,
// "model.layers.1.mlp.down_proj": 3}, alpha_pattern={"down_proj": 3.0}); PEFT gave these ranks
// and scalings (checked by tools/golden/make_peft_golden.py).
TEST_F(AdapterTest, ConfigSavedByPeft021) {
  const std::string text = R"json({
  "alora_invocation_tokens": null,
  "alpha_pattern": {
    "down_proj": 3.0
  },
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": "tests/data/golden/llama_gqa_llama3",
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 12,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.0",
  "qalora_group_size": 16,
  "r": 6,
  "rank_pattern": {
    "model.layers.1.mlp.down_proj": 3,
    "o_proj": 2
  },
  "revision": null,
  "target_modules": [
    "o_proj",
    "down_proj",
    "up_proj",
    "q_proj",
    "k_proj",
    "gate_proj",
    "v_proj"
  ],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
})json";
  auto config = AdapterConfig::FromJson(text, "r6_patterns/adapter_config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  for (int64_t layer = 0; layer < 2; ++layer) {
    for (ProjectionKind kind : kAllKinds) {
      const std::string path = Path(layer, kind);
      SCOPED_TRACE(path);
      EXPECT_TRUE(config->Targets(path, layer));
      int64_t rank = 6;
      double scaling = 2.0;
      if (kind == ProjectionKind::kO) {
        rank = 2;
        scaling = 6.0;
      } else if (kind == ProjectionKind::kDown) {
        rank = layer == 1 ? 3 : 6;
        scaling = layer == 1 ? 1.0 : 0.5;
      }
      EXPECT_EQ(config->RankFor(path), rank);
      EXPECT_DOUBLE_EQ(config->ScalingFor(path), scaling);
    }
  }
  EXPECT_FALSE(config->Targets("lm_head", 0));
}

// ---- malformed adapters ---------------------------------------------------------------------

TEST_F(AdapterTest, MissingFilesAreNotFound) {
  const std::string empty = NewDir();
  auto adapter = Adapter::Load("math", empty, base_);
  ASSERT_FALSE(adapter.ok());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(adapter.status()), HasSubstr("adapter 'math'"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr(empty + "/adapter_config.json"));

  const std::string no_weights = NewDir();
  WriteText(no_weights + "/adapter_config.json", PeftConfig({"q_proj"}).dump());
  adapter = Adapter::Load("math", no_weights, base_);
  ASSERT_FALSE(adapter.ok());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(adapter.status()), HasSubstr(no_weights + "/adapter_model.safetensors"));

  WriteText(no_weights + "/adapter_model.bin", "pickle");
  adapter = Adapter::Load("math", no_weights, base_);
  EXPECT_THAT(Message(adapter.status()), HasSubstr("adapter_model.bin"));
}

TEST_F(AdapterTest, InvalidJson) {
  auto adapter =
      Adapter::Load("math", Write("{\"r\": ", AllLayers({ProjectionKind::kQ}, 4)), base_);
  ASSERT_FALSE(adapter.ok());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(adapter.status()), HasSubstr("adapter 'math'"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("adapter_config.json: not valid JSON"));
  auto config = AdapterConfig::FromJson("[1, 2]", "x");
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(Message(config.status()), HasSubstr("JSON object"));
}

TEST_F(AdapterTest, PeftTypeMustBeLora) {
  Json json = PeftConfig({"q_proj"});
  json["peft_type"] = "LOHA";
  auto config = ParseConfig(json);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(config.status()), HasSubstr("'peft_type'"));
  EXPECT_THAT(Message(config.status()), HasSubstr("LOHA"));
  json.erase("peft_type");
  EXPECT_TRUE(ParseConfig(json).ok());
}

TEST_F(AdapterTest, UnsupportedFeaturesAreRefusedByName) {
  struct Case {
    const char* field;
    Json value;
  };
  const std::vector<Case> cases = {
      {"use_dora", true},
      {"modules_to_save", {"lm_head"}},
      {"lora_bias", true},
      {"bias", "all"},
      {"bias", "lora_only"},
      {"init_lora_weights", "pissa"},
      {"init_lora_weights", "pissa_niter_16"},
      {"init_lora_weights", "olora"},
      {"init_lora_weights", "corda"},
      {"init_lora_weights", "loftq"},
      {"init_lora_weights", "eva"},
      {"init_lora_weights", "lora_ga"},
      {"init_lora_weights", "something_new"},
      {"layer_replication", Json::array({Json::array({0, 1}), Json::array({1, 2})})},
      {"target_parameters", {"mlp.experts.down_proj"}},
      {"trainable_token_indices", {1, 2}},
      {"use_qalora", true},
      {"alora_invocation_tokens", {7, 8}},
      {"megatron_config", {{"tensor_model_parallel_size", 2}}},
      {"use_bdlora", {{"nblocks", 2}}},
      {"arrow_config", {{"top_k", 2}}},
      {"monteclora_config", {{"num_samples", 4}}},
      {"kasa_config", {{"beta", 0.1}}},
      {"use_dora", "yes"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat(c.field, " = ", c.value.dump()));
    Json json = PeftConfig({"q_proj"});
    json[c.field] = c.value;
    auto adapter = Load(json, AllLayers({ProjectionKind::kQ}, 4));
    ASSERT_FALSE(adapter.ok());
    EXPECT_EQ(adapter.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(Message(adapter.status()), HasSubstr(absl::StrCat("'", c.field, "'")));
    EXPECT_THAT(Message(adapter.status()), HasSubstr("adapter 'math'"));
  }
}

TEST_F(AdapterTest, TargetModulesNullIsRefused) {
  Json json = PeftConfig(nullptr);
  auto config = ParseConfig(json);
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(Message(config.status()), HasSubstr("'target_modules'"));
  json.erase("target_modules");
  EXPECT_THAT(Message(ParseConfig(json).status()), HasSubstr("'target_modules'"));
  json["target_modules"] = {"q_proj", 3};
  EXPECT_THAT(Message(ParseConfig(json).status()), HasSubstr("'target_modules'"));
  json["target_modules"] = 3;
  EXPECT_THAT(Message(ParseConfig(json).status()), HasSubstr("'target_modules'"));
}

TEST_F(AdapterTest, BadRankAndAlpha) {
  for (Json r : {Json(0), Json(-4), Json("8"), Json(4.5), Json(true)}) {
    SCOPED_TRACE(r.dump());
    Json json = PeftConfig({"q_proj"});
    json["r"] = r;
    auto config = ParseConfig(json);
    ASSERT_FALSE(config.ok());
    EXPECT_THAT(Message(config.status()), HasSubstr("field 'r'"));
  }
  for (Json alpha : {Json("16"), Json(true), Json::array({16})}) {
    SCOPED_TRACE(alpha.dump());
    Json json = PeftConfig({"q_proj"});
    json["lora_alpha"] = alpha;
    auto config = ParseConfig(json);
    ASSERT_FALSE(config.ok());
    EXPECT_THAT(Message(config.status()), HasSubstr("field 'lora_alpha'"));
  }
}

TEST_F(AdapterTest, EmbeddingLoraKeyIsRefused) {
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.push_back({"base_model.model.model.embed_tokens.lora_embedding_A", at::randn({4, 128})});
  tensors.push_back({"base_model.model.model.embed_tokens.lora_embedding_B", at::randn({64, 4})});
  auto adapter = Load(PeftConfig({"q_proj", "embed_tokens"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("lora_embedding_A"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("embedding"));
}

TEST_F(AdapterTest, DoraMagnitudeKeyIsRefused) {
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.push_back(
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", at::randn({64})});
  auto adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("lora_magnitude_vector"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("DoRA"));
}

TEST_F(AdapterTest, BiasKeysAreRefused) {
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.push_back(
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", at::randn({64})});
  auto adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("lora_bias"));

  tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.push_back({"base_model.model.model.layers.0.self_attn.q_proj.bias", at::randn({64})});
  adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("q_proj.bias"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("bias"));
}

TEST_F(AdapterTest, AdapterNameInKeyIsExplained) {
  Tensors tensors = {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                      at::randn({4, 64})},
                     {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight",
                      at::randn({64, 4})}};
  auto adapter = Load(PeftConfig({"model.layers.0.self_attn.q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("lora_A.default.weight"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("adapter name"));
}

TEST_F(AdapterTest, KeyOutsideTheProjectionsIsRefused) {
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.push_back({"base_model.model.lm_head.lora_A.weight", at::randn({4, 64})});
  tensors.push_back({"base_model.model.lm_head.lora_B.weight", at::randn({128, 4})});
  auto adapter = Load(PeftConfig({"q_proj", "lm_head"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("base_model.model.lm_head.lora_"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("not a decoder projection"));

  tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.push_back({"model.layers.0.self_attn.k_proj.lora_A.weight", at::randn({4, 64})});
  adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("base_model.model."));

  tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.push_back(
      {"base_model.model.model.layers.0.mlp.q_proj.lora_A.weight", at::randn({4, 64})});
  adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("model.layers.0.mlp.q_proj"));
}

TEST_F(AdapterTest, LayerOutOfRangeIsRefused) {
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  for (auto& entry : Factors(2, ProjectionKind::kQ, 4)) tensors.push_back(std::move(entry));
  auto adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("layer 2"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("2 layers"));
}

TEST_F(AdapterTest, WrongShapesAreNamedWithTheExpectedShape) {
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors[0].second = at::randn({4, 32});  // layer 0 q_proj A
  auto adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(adapter.status()),
              HasSubstr("adapter 'math': lora_A for model.layers.0.self_attn.q_proj has shape "
                        "[4, 32], expected [4, 64]"));

  // rank_pattern says 2 for o_proj; the file's B has rank 4.
  Json json = PeftConfig({"o_proj"});
  json["rank_pattern"] = {{"o_proj", 2}};
  tensors = {{KeyA(0, ProjectionKind::kO), at::randn({2, 64})},
             {KeyB(0, ProjectionKind::kO), at::randn({64, 4})},
             {KeyA(1, ProjectionKind::kO), at::randn({2, 64})},
             {KeyB(1, ProjectionKind::kO), at::randn({64, 2})}};
  adapter = Load(json, tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()),
              HasSubstr("lora_B for model.layers.0.self_attn.o_proj has shape [64, 4], expected "
                        "[64, 2]"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("rank_pattern key 'o_proj'"));

  // Down projection: in = intermediate.
  tensors = AllLayers({ProjectionKind::kDown}, 4);
  tensors[2].second = at::randn({4, 64});  // layer 1 down_proj A
  adapter = Load(PeftConfig({"down_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()),
              HasSubstr("lora_A for model.layers.1.mlp.down_proj has shape [4, 64], expected "
                        "[4, 128]"));

  tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors[1].second = at::ones({64, 4}, at::kLong);
  adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("dtype"));
}

TEST_F(AdapterTest, HalfAModuleIsRefused) {
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.pop_back();  // layer 1 q_proj B
  auto adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()),
              HasSubstr("model.layers.1.self_attn.q_proj has lora_A but no lora_B"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr(KeyB(1, ProjectionKind::kQ)));

  tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors.erase(tensors.begin());  // layer 0 q_proj A
  adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()),
              HasSubstr("model.layers.0.self_attn.q_proj has lora_B but no lora_A"));
}

TEST_F(AdapterTest, TargetedModuleMissingFromTheFileIsNamed) {
  Tensors tensors = AllLayers({ProjectionKind::kQ, ProjectionKind::kV}, 4);
  tensors.resize(6);  // drops layer 1 v_proj
  auto adapter = Load(PeftConfig({"q_proj", "v_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("targets model.layers.1.self_attn.v_proj"));
  EXPECT_THAT(Message(adapter.status()), HasSubstr(KeyA(1, ProjectionKind::kV)));
}

TEST_F(AdapterTest, KeyForAModuleNotTargetedIsRefused) {
  Tensors tensors = AllLayers({ProjectionKind::kQ, ProjectionKind::kK}, 4);
  auto adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()),
              HasSubstr(absl::StrCat("key '", KeyA(0, ProjectionKind::kK),
                                     "' is for module model.layers.0.self_attn.k_proj, which "
                                     "target_modules does not select")));
}

TEST_F(AdapterTest, NonFiniteWeightsNameTheKey) {
  Tensors tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors[3].second[5][1] = std::nan("");  // layer 1 q_proj B
  auto adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr(KeyB(1, ProjectionKind::kQ)));
  EXPECT_THAT(Message(adapter.status()), HasSubstr("non-finite"));

  tensors = AllLayers({ProjectionKind::kQ}, 4);
  tensors[0].second[0][0] = INFINITY;
  adapter = Load(PeftConfig({"q_proj"}), tensors);
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr(KeyA(0, ProjectionKind::kQ)));
}

TEST_F(AdapterTest, EmptyWeightsFileIsRefused) {
  auto adapter = Load(PeftConfig({"q_proj"}), {});
  ASSERT_FALSE(adapter.ok());
  EXPECT_THAT(Message(adapter.status()), HasSubstr("holds no LoRA weights"));
}

}  // namespace
}  // namespace moelora
