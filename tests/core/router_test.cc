#include "core/router.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using Json = nlohmann::json;

constexpr char kLabel[] = "routers/r/router_config.json";

// Debian's gtest matchers do not take absl::string_view.
std::string Message(const absl::Status& status) { return std::string(status.message()); }

at::Tensor Floats(std::vector<float> values, std::vector<int64_t> shape) {
  return at::tensor(values, at::TensorOptions().dtype(at::kFloat)).reshape(shape);
}

at::Tensor Mask(std::vector<bool> values) {
  std::vector<int64_t> bytes(values.begin(), values.end());
  return at::tensor(bytes, at::TensorOptions().dtype(at::kLong)).to(at::kBool);
}

std::vector<float> Values(const at::Tensor& tensor) {
  const at::Tensor flat = tensor.detach().to(at::kFloat).contiguous().reshape({-1});
  return std::vector<float>(flat.data_ptr<float>(), flat.data_ptr<float>() + flat.numel());
}

RouterConfig MakeConfig(std::vector<std::string> experts, int64_t top_k = 0,
                        double temperature = 1.0) {
  RouterConfig config;
  config.name = "test-router";
  config.experts = std::move(experts);
  config.top_k = top_k;
  config.temperature = temperature;
  return config;
}

// ---------------------------------------------------------------------------------------------
// RouterConfig

absl::StatusOr<RouterConfig> Parse(const Json& json) {
  return RouterConfig::FromJson(json.dump(), kLabel);
}

Json MinimalJson() { return Json{{"name", "r"}, {"experts", {"math", "code"}}}; }

TEST(RouterConfigTest, Defaults) {
  auto config = Parse(MinimalJson());
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->name, "r");
  EXPECT_THAT(config->experts, ElementsAre("math", "code"));
  EXPECT_EQ(config->input, RouterInput::kEmbeddings);
  EXPECT_EQ(config->granularity, RoutingGranularity::kToken);
  EXPECT_EQ(config->top_k, 0);
  EXPECT_EQ(config->temperature, 1.0);
}

TEST(RouterConfigTest, EveryFieldParsed) {
  Json json = MinimalJson();
  json["experts"] = {"math", "code", "chat"};
  json["input"] = "base_hidden";
  json["granularity"] = "sequence";
  json["top_k"] = 2;
  json["temperature"] = 0.25;
  auto config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->experts, ElementsAre("math", "code", "chat"));
  EXPECT_EQ(config->input, RouterInput::kBaseHidden);
  EXPECT_EQ(config->granularity, RoutingGranularity::kSequence);
  EXPECT_EQ(config->top_k, 2);
  EXPECT_EQ(config->temperature, 0.25);

  // Nulls mean "default"; top_k may equal K.
  json["input"] = nullptr;
  json["granularity"] = nullptr;
  json["top_k"] = 3;
  json["temperature"] = nullptr;
  config = Parse(json);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->input, RouterInput::kEmbeddings);
  EXPECT_EQ(config->granularity, RoutingGranularity::kToken);
  EXPECT_EQ(config->top_k, 3);
  EXPECT_EQ(config->temperature, 1.0);
}

TEST(RouterConfigTest, InvalidFieldsAreNamed) {
  struct Case {
    const char* field;
    Json value;  // null: erase the field
  };
  const std::vector<Case> cases = {
      {"name", nullptr},
      {"name", ""},
      {"name", 7},
      {"experts", nullptr},
      {"experts", Json::array()},
      {"experts", "math"},
      {"experts", {"math", 1}},
      {"experts", {"math", ""}},
      {"experts", {"math", "code", "math"}},
      {"input", "hidden"},
      {"input", 1},
      {"granularity", "token_level"},
      {"granularity", true},
      {"top_k", -1},
      {"top_k", 3},  // K = 2
      {"top_k", 1.5},
      {"top_k", "1"},
      {"top_k", 18446744073709551615ull},
      {"temperature", 0},
      {"temperature", -0.5},
      {"temperature", "hot"},
  };
  for (const Case& c : cases) {
    Json json = MinimalJson();
    if (c.value.is_null()) {
      json.erase(c.field);
    } else {
      json[c.field] = c.value;
    }
    auto config = Parse(json);
    ASSERT_FALSE(config.ok()) << c.field << " = " << c.value.dump();
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(Message(config.status()),
                AllOf(HasSubstr(kLabel), HasSubstr(absl::StrCat("'", c.field, "'"))))
        << c.field << " = " << c.value.dump();
  }
}

TEST(RouterConfigTest, DuplicateExpertIsNamed) {
  Json json = MinimalJson();
  json["experts"] = {"math", "code", "math"};
  auto config = Parse(json);
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(Message(config.status()), HasSubstr("'math' more than once"));
}

TEST(RouterConfigTest, NotJsonOrNotObject) {
  for (const char* text : {"", "{", "[1, 2]", "\"router\"", "{\"name\": \"r\",}"}) {
    auto config = RouterConfig::FromJson(text, kLabel);
    ASSERT_FALSE(config.ok()) << text;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(Message(config.status()), HasSubstr(kLabel));
  }
}

TEST(RouterConfigTest, BaseHiddenRequiresSequenceGranularity) {
  Json json = MinimalJson();
  json["input"] = "base_hidden";
  for (const Json& granularity : {Json("token"), Json(nullptr)}) {
    json["granularity"] = granularity;
    auto config = Parse(json);
    ASSERT_FALSE(config.ok());
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(Message(config.status()),
                AllOf(HasSubstr(kLabel), HasSubstr("'input'"), HasSubstr("base_hidden"),
                      HasSubstr("'granularity'"), HasSubstr("sequence")));
  }
  // Sequence granularity is fine for embeddings too.
  json["input"] = "embeddings";
  json["granularity"] = "sequence";
  EXPECT_TRUE(Parse(json).ok());
}

TEST(RouterConfigTest, ToJsonRoundTrips) {
  RouterConfig config = MakeConfig({"math", "code", "chat"}, /*top_k=*/2, /*temperature=*/0.1);
  config.input = RouterInput::kBaseHidden;
  config.granularity = RoutingGranularity::kSequence;
  auto parsed = RouterConfig::FromJson(config.ToJson(), "round trip");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->name, config.name);
  EXPECT_EQ(parsed->experts, config.experts);
  EXPECT_EQ(parsed->input, config.input);
  EXPECT_EQ(parsed->granularity, config.granularity);
  EXPECT_EQ(parsed->top_k, config.top_k);
  EXPECT_EQ(parsed->temperature, config.temperature);  // exactly

  const Json json = Json::parse(config.ToJson());
  EXPECT_EQ(json["input"], "base_hidden");
  EXPECT_EQ(json["granularity"], "sequence");

  RouterConfig defaults = MakeConfig({"a"});
  parsed = RouterConfig::FromJson(defaults.ToJson(), "round trip");
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(parsed->input, RouterInput::kEmbeddings);
  EXPECT_EQ(parsed->granularity, RoutingGranularity::kToken);
  EXPECT_EQ(parsed->top_k, 0);
  EXPECT_EQ(parsed->temperature, 1.0);
}

// ---------------------------------------------------------------------------------------------
// Router::Create, Load and Save

TEST(RouterCreateTest, SharesFp32TensorsAndConvertsOthers) {
  at::manual_seed(1);
  const at::Tensor weight = at::randn({2, 4});
  const at::Tensor bias = at::randn({2});
  auto router = Router::Create(MakeConfig({"a", "b"}), weight, bias);
  ASSERT_TRUE(router.ok()) << router.status();
  EXPECT_TRUE((*router)->gate_weight().is_same(weight));
  EXPECT_TRUE((*router)->gate_bias().is_same(bias));
  EXPECT_EQ((*router)->num_experts(), 2);

  router = Router::Create(MakeConfig({"a", "b"}), weight.to(at::kDouble), bias.to(at::kHalf));
  ASSERT_TRUE(router.ok()) << router.status();
  EXPECT_EQ((*router)->gate_weight().scalar_type(), at::kFloat);
  EXPECT_EQ((*router)->gate_bias().scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal((*router)->gate_weight(), weight));
  EXPECT_TRUE(at::equal((*router)->gate_bias(), bias.to(at::kHalf).to(at::kFloat)));
}

TEST(RouterCreateTest, ValidatesConfigShapesDtypesAndValues) {
  const at::Tensor weight = at::zeros({3, 4});
  const at::Tensor bias = at::zeros({3});
  const RouterConfig config = MakeConfig({"a", "b", "c"});

  auto expect_error = [](const absl::StatusOr<std::shared_ptr<const Router>>& router,
                         const std::vector<std::string>& needles) {
    ASSERT_FALSE(router.ok());
    EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
    for (const std::string& needle : needles) {
      EXPECT_THAT(Message(router.status()), HasSubstr(needle));
    }
  };
  expect_error(Router::Create(config, at::zeros({2, 4}), bias),
               {"gate.weight", "[2, 4]", "[3, 4]"});
  expect_error(Router::Create(config, at::zeros({3, 4, 1}), bias), {"gate.weight", "[3, 4, 1]"});
  expect_error(Router::Create(config, at::zeros({3, 0}), at::zeros({3})), {"gate.weight"});
  expect_error(Router::Create(config, weight, at::zeros({4})), {"gate.bias", "[4]", "[3]"});
  expect_error(Router::Create(config, at::Tensor(), bias), {"gate.weight", "undefined"});
  expect_error(Router::Create(config, weight, at::Tensor()), {"gate.bias", "undefined"});
  expect_error(Router::Create(config, weight.to(at::kLong), bias), {"gate.weight", "dtype"});

  at::Tensor nan_bias = at::zeros({3});
  nan_bias[1] = std::numeric_limits<float>::quiet_NaN();
  expect_error(Router::Create(config, weight, nan_bias), {"gate.bias", "non-finite"});
  at::Tensor inf_weight = at::zeros({3, 4});
  inf_weight[2][3] = -std::numeric_limits<float>::infinity();
  expect_error(Router::Create(config, inf_weight, bias), {"gate.weight", "non-finite"});

  expect_error(Router::Create(MakeConfig({"a", "b", "c"}, /*top_k=*/4), weight, bias), {"top_k"});
  expect_error(Router::Create(MakeConfig({"a", "b", "c"}, 0, /*temperature=*/0.0), weight, bias),
               {"temperature"});
  expect_error(Router::Create(MakeConfig({"a", "a", "c"}), weight, bias), {"experts"});
  RouterConfig base_hidden_token = config;
  base_hidden_token.input = RouterInput::kBaseHidden;
  expect_error(Router::Create(base_hidden_token, weight, bias), {"input", "granularity"});
}

class RouterDirTest : public ::testing::Test {
 protected:
  void WriteConfig(const RouterConfig& config) { WriteText("router_config.json", config.ToJson()); }
  void WriteText(const std::string& name, const std::string& text) {
    std::ofstream out(dir_.Join(name), std::ios::binary | std::ios::trunc);
    out << text;
    ASSERT_TRUE(out.good());
  }
  void WriteGate(std::vector<std::pair<std::string, at::Tensor>> tensors) {
    ASSERT_TRUE(WriteTensors(dir_.Join("router.safetensors"), tensors).ok());
  }

  testing_support::ScopedTempDir dir_{"router_test"};
};

TEST_F(RouterDirTest, SaveLoadRoundTripsExactly) {
  at::manual_seed(7);
  RouterConfig config = MakeConfig({"math", "code", "chat"}, /*top_k=*/2, /*temperature=*/0.7);
  config.name = "my-router";
  config.input = RouterInput::kBaseHidden;
  config.granularity = RoutingGranularity::kSequence;
  const at::Tensor weight = at::randn({3, 8});
  const at::Tensor bias = at::randn({3});
  auto router = Router::Create(config, weight, bias);
  ASSERT_TRUE(router.ok()) << router.status();

  const std::string dir = dir_.Join("nested/router");  // Save creates missing directories
  ASSERT_TRUE((*router)->Save(dir).ok());
  EXPECT_TRUE(std::filesystem::is_regular_file(dir + "/router_config.json"));
  EXPECT_TRUE(std::filesystem::is_regular_file(dir + "/router.safetensors"));

  auto loaded = Router::Load(dir, /*hidden_size=*/8);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const RouterConfig& got = (*loaded)->config();
  EXPECT_EQ(got.name, "my-router");
  EXPECT_EQ(got.experts, config.experts);
  EXPECT_EQ(got.input, RouterInput::kBaseHidden);
  EXPECT_EQ(got.granularity, RoutingGranularity::kSequence);
  EXPECT_EQ(got.top_k, 2);
  EXPECT_EQ(got.temperature, 0.7);
  EXPECT_EQ((*loaded)->gate_weight().scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal((*loaded)->gate_weight(), weight));
  EXPECT_TRUE(at::equal((*loaded)->gate_bias(), bias));

  // Saving over an existing router replaces it.
  auto other = Router::Create(MakeConfig({"x"}), at::ones({1, 8}), at::zeros({1}));
  ASSERT_TRUE(other.ok());
  ASSERT_TRUE((*other)->Save(dir).ok());
  loaded = Router::Load(dir, 8);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_THAT((*loaded)->config().experts, ElementsAre("x"));
  EXPECT_TRUE(at::equal((*loaded)->gate_weight(), at::ones({1, 8})));
}

TEST_F(RouterDirTest, SaveOfTrainableRouterWritesCurrentValues) {
  at::Tensor weight = at::zeros({2, 3}).requires_grad_(true);
  at::Tensor bias = at::zeros({2}).requires_grad_(true);
  auto router = Router::Create(MakeConfig({"a", "b"}), weight, bias);
  ASSERT_TRUE(router.ok());
  {
    c10::NoGradGuard no_grad;
    weight.add_(1.5);  // a trainer's in-place step, seen through the shared storage
  }
  ASSERT_TRUE((*router)->Save(dir_.path()).ok());
  auto loaded = Router::Load(dir_.path(), 3);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(at::equal((*loaded)->gate_weight(), at::full({2, 3}, 1.5)));
  EXPECT_FALSE((*loaded)->gate_weight().requires_grad());
}

TEST_F(RouterDirTest, MissingFilesAreNotFoundNamingThePath) {
  auto router = Router::Load(dir_.path(), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(router.status()), HasSubstr(dir_.Join("router_config.json")));

  WriteConfig(MakeConfig({"a", "b"}));
  router = Router::Load(dir_.path(), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(router.status()), HasSubstr(dir_.Join("router.safetensors")));

  router = Router::Load(dir_.Join("no-such-dir"), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(RouterDirTest, MissingGateTensorIsNamed) {
  WriteConfig(MakeConfig({"a", "b"}));
  WriteGate({{"gate.weight", at::zeros({2, 4})}});
  auto router = Router::Load(dir_.path(), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(router.status()), HasSubstr("gate.bias"));
}

TEST_F(RouterDirTest, WrongGateShapesNameTensorAndExpectedShape) {
  WriteConfig(MakeConfig({"a", "b", "c"}));
  WriteGate({{"gate.weight", at::zeros({3, 7})}, {"gate.bias", at::zeros({3})}});
  auto router = Router::Load(dir_.path(), 8);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(router.status()),
              AllOf(HasSubstr("gate.weight"), HasSubstr("[3, 7]"), HasSubstr("expected [3, 8]")));

  WriteGate({{"gate.weight", at::zeros({3, 8})}, {"gate.bias", at::zeros({1, 3})}});
  router = Router::Load(dir_.path(), 8);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(router.status()),
              AllOf(HasSubstr("gate.bias"), HasSubstr("[1, 3]"), HasSubstr("expected [3]")));
}

TEST_F(RouterDirTest, ExpertCountMismatchBetweenConfigAndGate) {
  WriteConfig(MakeConfig({"a", "b"}));  // K = 2, gate has 3 rows
  WriteGate({{"gate.weight", at::zeros({3, 8})}, {"gate.bias", at::zeros({3})}});
  auto router = Router::Load(dir_.path(), 8);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(router.status()),
              AllOf(HasSubstr("gate.weight"), HasSubstr("[3, 8]"), HasSubstr("expected [2, 8]")));
}

TEST_F(RouterDirTest, NonFiniteGateIsRejected) {
  WriteConfig(MakeConfig({"a", "b"}));
  at::Tensor weight = at::zeros({2, 4});
  weight[0][1] = std::numeric_limits<float>::quiet_NaN();
  WriteGate({{"gate.weight", weight}, {"gate.bias", at::zeros({2})}});
  auto router = Router::Load(dir_.path(), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(router.status()), AllOf(HasSubstr("router.safetensors"),
                                              HasSubstr("gate.weight"), HasSubstr("non-finite")));

  at::Tensor bias = at::zeros({2});
  bias[1] = std::numeric_limits<float>::infinity();
  WriteGate({{"gate.weight", at::zeros({2, 4})}, {"gate.bias", bias}});
  router = Router::Load(dir_.path(), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_THAT(Message(router.status()), AllOf(HasSubstr("gate.bias"), HasSubstr("non-finite")));
}

TEST_F(RouterDirTest, Bf16GateIsConvertedToFp32) {
  at::manual_seed(3);
  const at::Tensor weight = at::randn({2, 4}).to(at::kBFloat16);
  const at::Tensor bias = at::randn({2}).to(at::kBFloat16);
  WriteConfig(MakeConfig({"a", "b"}));
  WriteGate({{"gate.weight", weight}, {"gate.bias", bias}});
  auto router = Router::Load(dir_.path(), 4);
  ASSERT_TRUE(router.ok()) << router.status();
  EXPECT_EQ((*router)->gate_weight().scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal((*router)->gate_weight(), weight.to(at::kFloat)));
  EXPECT_TRUE(at::equal((*router)->gate_bias(), bias.to(at::kFloat)));
}

TEST_F(RouterDirTest, RefusesIntegerGateAndUnexpectedTensors) {
  WriteConfig(MakeConfig({"a", "b"}));
  WriteGate({{"gate.weight", at::zeros({2, 4}, at::kInt)}, {"gate.bias", at::zeros({2})}});
  auto router = Router::Load(dir_.path(), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(router.status()), AllOf(HasSubstr("gate.weight"), HasSubstr("dtype")));

  WriteGate({{"gate.weight", at::zeros({2, 4})},
             {"gate.bias", at::zeros({2})},
             {"gate.extra", at::zeros({2})}});
  router = Router::Load(dir_.path(), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(router.status()), HasSubstr("unexpected tensor 'gate.extra'"));
}

TEST_F(RouterDirTest, BadConfigAndHiddenSizeAreRefused) {
  WriteText("router_config.json", R"({"name": "r", "experts": ["a", "b"], "top_k": 5})");
  WriteGate({{"gate.weight", at::zeros({2, 4})}, {"gate.bias", at::zeros({2})}});
  auto router = Router::Load(dir_.path(), 4);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(router.status()),
              AllOf(HasSubstr(dir_.Join("router_config.json")), HasSubstr("'top_k'")));

  WriteConfig(MakeConfig({"a", "b"}));
  router = Router::Load(dir_.path(), 0);
  ASSERT_FALSE(router.ok());
  EXPECT_EQ(router.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(router.status()), HasSubstr("hidden_size"));
}

// ---------------------------------------------------------------------------------------------
// Logits

TEST(RouterLogitsTest, EqualsFeaturesTimesWeightTransposedPlusBias) {
  // Small integers: every product and sum is exact in fp32, so the comparison is exact.
  const at::Tensor weight = Floats({1, 0, -1, 2, 0, 1, 1, 0, 3, -2, 0, 1}, {3, 4});
  const at::Tensor bias = Floats({0.5, -1, 2}, {3});
  auto router = Router::Create(MakeConfig({"a", "b", "c"}), weight, bias);
  ASSERT_TRUE(router.ok());
  const at::Tensor x = Floats({1, 2, 3, 4, -1, 0, 2, 1}, {2, 4});
  const at::Tensor logits = (*router)->Logits(x);
  EXPECT_EQ(logits.scalar_type(), at::kFloat);
  ASSERT_EQ(logits.sizes(), at::IntArrayRef({2, 3}));
  // Row 0: [1-3+8, 2+3, 3-4+4] + b; row 1: [-1+2, 2, -3+1] + b.
  EXPECT_THAT(Values(logits), ElementsAre(6.5f, 4.0f, 5.0f, -0.5f, 1.0f, 0.0f));

  at::manual_seed(11);
  const at::Tensor w2 = at::randn({5, 16});
  const at::Tensor b2 = at::randn({5});
  auto random_router = Router::Create(MakeConfig({"a", "b", "c", "d", "e"}), w2, b2);
  ASSERT_TRUE(random_router.ok());
  const at::Tensor x2 = at::randn({7, 16});
  EXPECT_TRUE(at::allclose((*random_router)->Logits(x2), at::matmul(x2, w2.t()) + b2, 1e-5, 1e-5));
}

TEST(RouterLogitsTest, Bf16FeaturesGiveFp32Logits) {
  at::manual_seed(12);
  const at::Tensor weight = at::randn({3, 8});
  const at::Tensor bias = at::randn({3});
  auto router = Router::Create(MakeConfig({"a", "b", "c"}), weight, bias);
  ASSERT_TRUE(router.ok());
  const at::Tensor x = at::randn({4, 8}).to(at::kBFloat16);
  const at::Tensor logits = (*router)->Logits(x);
  EXPECT_EQ(logits.scalar_type(), at::kFloat);
  // The gate runs in fp32 on the bf16 values, not in bf16.
  EXPECT_TRUE(at::allclose(logits, at::matmul(x.to(at::kFloat), weight.t()) + bias, 1e-5, 1e-5));
}

TEST(RouterLogitsTest, WrongFeatureShapeThrows) {
  auto router = Router::Create(MakeConfig({"a", "b"}), at::zeros({2, 4}), at::zeros({2}));
  ASSERT_TRUE(router.ok());
  EXPECT_THROW((*router)->Logits(at::zeros({3, 5})), c10::Error);
  EXPECT_THROW((*router)->Logits(at::zeros({4})), c10::Error);
}

// ---------------------------------------------------------------------------------------------
// Normalization

RoutingNormalization Norm(int64_t top_k, double temperature = 1.0, at::Tensor allowed = {}) {
  RoutingNormalization norm;
  norm.top_k = top_k;
  norm.temperature = temperature;
  norm.allowed = std::move(allowed);
  return norm;
}

using ::testing::Pointwise;

MATCHER_P(Near, tolerance, "") {
  return std::abs(std::get<0>(arg) - std::get<1>(arg)) <= tolerance;
}

TEST(NormalizeRoutingTest, DenseSoftmaxWithTemperature) {
  const at::Tensor logits = Floats({1, 2, 3}, {1, 3});
  // exp(1), exp(2), exp(3) over their sum.
  const at::Tensor t1 = NormalizeRouting(logits, Norm(0, 1.0));
  EXPECT_EQ(t1.scalar_type(), at::kFloat);
  EXPECT_THAT(Values(t1),
              Pointwise(Near(1e-6f), std::vector<float>{0.09003057f, 0.24472847f, 0.66524096f}));
  // T = 0.5: logits become [2, 4, 6]; sharper.
  const at::Tensor t05 = NormalizeRouting(logits, Norm(0, 0.5));
  EXPECT_THAT(Values(t05),
              Pointwise(Near(1e-6f), std::vector<float>{0.01587624f, 0.11731043f, 0.86681333f}));
  // bf16 logits work and still give fp32.
  EXPECT_EQ(NormalizeRouting(logits.to(at::kBFloat16), Norm(0)).scalar_type(), at::kFloat);

  at::manual_seed(5);
  const at::Tensor many = at::randn({6, 5}) * 4;
  for (double temperature : {0.3, 1.0, 2.5}) {
    const at::Tensor weights = NormalizeRouting(many, Norm(0, temperature));
    EXPECT_TRUE(at::allclose(weights.sum(1), at::ones({6}), 1e-6, 1e-6));
    EXPECT_TRUE(weights.gt(0).all().item<bool>());
  }
}

TEST(NormalizeRoutingTest, TopOneIsOneHotAtArgmax) {
  const at::Tensor logits = Floats({0.5, 2.0, -1.0, 1.0, 3.0, -2.0, 0.0, 2.9}, {2, 4});
  const at::Tensor weights = NormalizeRouting(logits, Norm(1));
  EXPECT_THAT(Values(weights), ElementsAre(0, 1, 0, 0, 1, 0, 0, 0));
}

TEST(NormalizeRoutingTest, TopTwoOfFourIsSoftmaxOverTheTopTwo) {
  const at::Tensor logits = Floats({0.5, 2.0, -1.0, 1.0, -3.0, 0.0, 0.5, -1.0}, {2, 4});
  const at::Tensor weights = NormalizeRouting(logits, Norm(2));
  const std::vector<float> got = Values(weights);
  // Row 0 keeps experts 1 and 3: softmax([2, 1]); row 1 keeps 2 and 1: softmax([0.5, 0]).
  const std::vector<float> want = {0, 0.73105858f, 0, 0.26894142f, 0, 0.37754067f, 0.62245933f, 0};
  EXPECT_THAT(got, Pointwise(Near(1e-6f), want));
  for (size_t i : {0, 2, 4, 7}) EXPECT_EQ(got[i], 0.0f) << i;  // exact zeros
  // Temperature applies to the kept logits: T = 0.5 -> softmax([4, 2]).
  const std::vector<float> sharp = Values(NormalizeRouting(logits.slice(0, 0, 1), Norm(2, 0.5)));
  EXPECT_THAT(sharp, Pointwise(Near(1e-6f), std::vector<float>{0, 0.88079708f, 0, 0.11920292f}));
  // top_k = K is dense.
  EXPECT_TRUE(at::allclose(NormalizeRouting(logits, Norm(4)), NormalizeRouting(logits, Norm(0))));
}

TEST(NormalizeRoutingTest, MaskedExpertGetsZeroEvenWithTheLargestLogit) {
  const at::Tensor logits = Floats({3, 1, 2}, {1, 3});
  const at::Tensor allowed = Mask({false, true, true});
  // Dense: softmax over [1, 2] for experts 1 and 2.
  EXPECT_THAT(Values(NormalizeRouting(logits, Norm(0, 1.0, allowed))),
              Pointwise(Near(1e-6f), std::vector<float>{0, 0.26894142f, 0.73105858f}));
  // Top-1 skips the masked argmax.
  EXPECT_THAT(Values(NormalizeRouting(logits, Norm(1, 1.0, allowed))), ElementsAre(0, 0, 1));
  // uint8 masks work as bool ones.
  EXPECT_THAT(Values(NormalizeRouting(logits, Norm(1, 1.0, allowed.to(at::kByte)))),
              ElementsAre(0, 0, 1));
}

TEST(NormalizeRoutingTest, TopKSkipsMaskedExperts) {
  const at::Tensor logits = Floats({0.5, 2.0, -1.0, 1.0}, {1, 4});
  const at::Tensor allowed = Mask({true, false, true, true});
  // Expert 1 is masked: the top two allowed are 3 (1.0) and 0 (0.5).
  EXPECT_THAT(Values(NormalizeRouting(logits, Norm(2, 1.0, allowed))),
              Pointwise(Near(1e-6f), std::vector<float>{0.37754067f, 0, 0, 0.62245933f}));
}

TEST(NormalizeRoutingTest, TopKLargerThanAllowedKeepsOnlyAllowed) {
  const at::Tensor logits = Floats({5, 1, 4, -1, 2, 3}, {2, 3});
  const at::Tensor allowed = Mask({false, true, false});
  for (int64_t k : {0, 1, 2, 3}) {
    EXPECT_THAT(Values(NormalizeRouting(logits, Norm(k, 1.0, allowed))),
                ElementsAre(0, 1, 0, 0, 1, 0))
        << "top_k " << k;
  }
  const at::Tensor two = Mask({true, false, true});
  // top_k 3 > 2 allowed: softmax over experts 0 and 2.
  EXPECT_THAT(Values(NormalizeRouting(logits.slice(0, 0, 1), Norm(3, 1.0, two))),
              Pointwise(Near(1e-6f), std::vector<float>{0.73105858f, 0, 0.26894142f}));
}

TEST(ValidateNormalizationTest, AcceptsValidSettings) {
  EXPECT_TRUE(ValidateNormalization(Norm(0), 3).ok());
  EXPECT_TRUE(ValidateNormalization(Norm(3, 0.01), 3).ok());
  EXPECT_TRUE(ValidateNormalization(Norm(2, 1.0, Mask({false, false, true})), 3).ok());
  EXPECT_TRUE(ValidateNormalization(Norm(1, 1.0, Mask({true, false}).to(at::kByte)), 2).ok());
}

TEST(ValidateNormalizationTest, RefusesBadSettingsWithClearMessages) {
  auto expect_error = [](const RoutingNormalization& norm, int64_t num_experts,
                         const std::string& message) {
    const absl::Status status = ValidateNormalization(norm, num_experts);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << message;
    EXPECT_THAT(Message(status), HasSubstr(message));
  };
  expect_error(Norm(0, std::nan("")), 3, "temperature must be finite and > 0, got nan");
  expect_error(Norm(0, -1.0), 3, "temperature must be finite and > 0, got -1");
  expect_error(Norm(0, 0.0), 3, "temperature must be finite and > 0, got 0");
  expect_error(Norm(0, std::numeric_limits<double>::infinity()), 3,
               "temperature must be finite and > 0, got inf");
  expect_error(Norm(5), 3, "top_k 5 exceeds the 3 experts");
  expect_error(Norm(-1), 3, "top_k must be >= 0");
  expect_error(Norm(0, 1.0, Mask({true, true})), 3, "expert mask has shape [2], expected [3]");
  expect_error(Norm(0, 1.0, Mask({true, true, true}).reshape({1, 3})), 3,
               "expert mask has shape [1, 3]");
  expect_error(Norm(0, 1.0, Mask({false, false, false})), 3, "expert mask allows no expert");
  expect_error(Norm(0, 1.0, at::ones({3})), 3, "expert mask must be bool or uint8");
  expect_error(Norm(0), 0, "at least one expert");
}

// ---------------------------------------------------------------------------------------------
// Gradients, checked against central finite differences of an independent double-precision
// implementation (plain loops, no ATen ops).

struct DoubleRouter {
  std::vector<std::vector<double>> weight;  // [K][hidden]
  std::vector<double> bias;                 // [K]
};

std::vector<std::vector<double>> ToRows(const at::Tensor& tensor) {
  const at::Tensor t = tensor.detach().to(at::kDouble).contiguous();
  std::vector<std::vector<double>> rows(t.size(0));
  for (int64_t i = 0; i < t.size(0); ++i) {
    rows[i].assign(t.data_ptr<double>() + i * t.size(1),
                   t.data_ptr<double>() + (i + 1) * t.size(1));
  }
  return rows;
}

std::vector<double> RoutingWeights(const std::vector<double>& logits, int64_t top_k,
                                   double temperature, const std::vector<bool>& allowed) {
  std::vector<size_t> candidates;
  for (size_t e = 0; e < logits.size(); ++e) {
    if (allowed.empty() || allowed[e]) candidates.push_back(e);
  }
  std::sort(candidates.begin(), candidates.end(),
            [&](size_t a, size_t b) { return logits[a] > logits[b]; });
  if (top_k > 0 && static_cast<size_t>(top_k) < candidates.size()) candidates.resize(top_k);
  double max_logit = -std::numeric_limits<double>::infinity();
  for (size_t e : candidates) max_logit = std::max(max_logit, logits[e] / temperature);
  std::vector<double> weights(logits.size(), 0.0);
  double total = 0;
  for (size_t e : candidates) total += weights[e] = std::exp(logits[e] / temperature - max_logit);
  for (double& w : weights) w /= total;
  return weights;
}

// sum over rows and experts of weight * target.
double ReferenceLoss(const DoubleRouter& router, const std::vector<std::vector<double>>& x,
                     const std::vector<std::vector<double>>& target, int64_t top_k,
                     double temperature, const std::vector<bool>& allowed) {
  double loss = 0;
  for (size_t row = 0; row < x.size(); ++row) {
    std::vector<double> logits(router.bias);
    for (size_t e = 0; e < logits.size(); ++e) {
      for (size_t h = 0; h < x[row].size(); ++h) logits[e] += router.weight[e][h] * x[row][h];
    }
    const std::vector<double> weights = RoutingWeights(logits, top_k, temperature, allowed);
    for (size_t e = 0; e < weights.size(); ++e) loss += weights[e] * target[row][e];
  }
  return loss;
}

struct GradCase {
  int64_t top_k;
  double temperature;
  std::vector<bool> allowed;  // empty = all allowed
};

class RouterGradientTest : public ::testing::TestWithParam<GradCase> {};

TEST_P(RouterGradientTest, GateAndFeatureGradientsMatchFiniteDifferences) {
  const GradCase& param = GetParam();
  constexpr int64_t kExperts = 4, kHidden = 5, kRows = 3;
  at::manual_seed(21);
  at::Tensor weight = (at::randn({kExperts, kHidden}) * 0.5).requires_grad_(true);
  at::Tensor bias = (at::randn({kExperts}) * 0.5).requires_grad_(true);
  at::Tensor x = at::randn({kRows, kHidden}).requires_grad_(true);
  const at::Tensor target = at::randn({kRows, kExperts});
  auto router = Router::Create(MakeConfig({"a", "b", "c", "d"}), weight, bias);
  ASSERT_TRUE(router.ok()) << router.status();

  at::Tensor allowed;
  if (!param.allowed.empty()) allowed = Mask(param.allowed);
  const RoutingNormalization norm = Norm(param.top_k, param.temperature, allowed);
  ASSERT_TRUE(ValidateNormalization(norm, kExperts).ok());
  at::Tensor logits = (*router)->Logits(x);
  logits.retain_grad();
  const at::Tensor routing = NormalizeRouting(logits, norm);
  (routing * target).sum().backward();

  for (const at::Tensor& grad : {weight.grad(), bias.grad(), x.grad(), logits.grad()}) {
    ASSERT_TRUE(grad.defined());
    EXPECT_TRUE(at::isfinite(grad).all().item<bool>());
    // Top-1 weights are one-hot, locally constant: their gradient is exactly zero.
    EXPECT_EQ(grad.ne(0).any().item<bool>(), param.top_k != 1);
  }
  // Logits of experts that got weight 0 (masked or not kept) receive exactly zero gradient.
  const at::Tensor dropped = routing.detach().eq(0);
  EXPECT_TRUE(logits.grad().masked_select(dropped).eq(0).all().item<bool>());
  if (param.top_k == 0 && param.allowed.empty()) {
    EXPECT_FALSE(dropped.any().item<bool>());
  }
  if (!param.allowed.empty()) {
    for (int64_t e = 0; e < kExperts; ++e) {
      if (param.allowed[e]) continue;
      // A masked expert's gate row and bias get exactly zero gradient.
      EXPECT_EQ(bias.grad()[e].item<float>(), 0.0f);
      EXPECT_TRUE(weight.grad()[e].eq(0).all().item<bool>());
    }
  }

  DoubleRouter ref;
  ref.weight = ToRows(weight);
  const at::Tensor bias_double = bias.detach().to(at::kDouble).contiguous();
  ref.bias.assign(bias_double.data_ptr<double>(), bias_double.data_ptr<double>() + kExperts);
  std::vector<std::vector<double>> xs = ToRows(x);
  const std::vector<std::vector<double>> targets = ToRows(target);
  auto loss = [&] {
    return ReferenceLoss(ref, xs, targets, param.top_k, param.temperature, param.allowed);
  };
  // The reference forward agrees with the fp32 one.
  EXPECT_NEAR(loss(), (routing * target).sum().item<double>(), 1e-5);

  constexpr double kEps = 1e-6;
  auto central = [&](double& value) {
    const double saved = value;
    value = saved + kEps;
    const double plus = loss();
    value = saved - kEps;
    const double minus = loss();
    value = saved;
    return (plus - minus) / (2 * kEps);
  };
  auto expect_close = [](double autograd, double numeric, const std::string& what) {
    EXPECT_NEAR(autograd, numeric, 1e-4 + 1e-3 * std::abs(numeric)) << what;
  };
  const std::vector<std::vector<double>> weight_grad = ToRows(weight.grad());
  const std::vector<float> bias_grad = Values(bias.grad());
  const std::vector<std::vector<double>> x_grad = ToRows(x.grad());
  for (int64_t e = 0; e < kExperts; ++e) {
    for (int64_t h = 0; h < kHidden; ++h) {
      expect_close(weight_grad[e][h], central(ref.weight[e][h]),
                   absl::StrCat("gate.weight[", e, "][", h, "]"));
    }
    expect_close(bias_grad[e], central(ref.bias[e]), absl::StrCat("gate.bias[", e, "]"));
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t h = 0; h < kHidden; ++h) {
      expect_close(x_grad[r][h], central(xs[r][h]), absl::StrCat("x[", r, "][", h, "]"));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Modes, RouterGradientTest,
    ::testing::Values(GradCase{0, 1.0, {}}, GradCase{0, 0.5, {}}, GradCase{2, 1.0, {}},
                      GradCase{1, 0.7, {}}, GradCase{0, 1.0, {true, false, true, true}},
                      GradCase{2, 2.0, {false, true, true, true}}),
    [](const ::testing::TestParamInfo<GradCase>& info) {
      return absl::StrCat(info.param.top_k == 0 ? "Dense" : absl::StrCat("Top", info.param.top_k),
                          "T", static_cast<int>(info.param.temperature * 10),
                          info.param.allowed.empty() ? "" : "Masked");
    });

}  // namespace
}  // namespace moelora
