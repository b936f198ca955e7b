#include "core/mixture.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/generation.h"
#include "core/random_model.h"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::HasSubstr;

std::string Message(const absl::Status& status) { return std::string(status.message()); }

class MixtureTest : public testing::Test {
 protected:
  void SetUp() override { Build(at::kFloat); }

  void Build(at::ScalarType dtype) {
    ASSERT_TRUE(
        WriteRandomModel(temp_.Join("base"), TinyModelConfig(ModelType::kLlama), {.seed = 9}).ok());
    auto model = Model::Load(temp_.Join("base"), {.dtype = dtype});
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto pool = ExpertPool::Create(*model_, {.capacity = 16, .max_rank = 8});
    ASSERT_TRUE(pool.ok());
    pool_ = std::move(*pool);
    mixture_ = std::make_unique<Mixture>(*model_, *pool_);
    for (int i = 0; i < 3; ++i) {
      RandomAdapterOptions spec;
      spec.r = 2 + 2 * i;
      spec.target_modules = {"q_proj", "v_proj", "down_proj"};
      spec.seed = 40 + i;
      spec.std = 0.2;
      const std::string name = names_[i];
      ASSERT_TRUE(WriteRandomAdapter(temp_.Join(name), model_->config(), spec).ok());
      auto info = mixture_->AttachExpert(name, temp_.Join(name));
      ASSERT_TRUE(info.ok()) << info.status();
    }
  }

  std::shared_ptr<const Router> MakeRouter(
      const std::string& name, std::vector<std::string> experts,
      RouterInput input = RouterInput::kEmbeddings,
      RoutingGranularity granularity = RoutingGranularity::kToken, int64_t top_k = 0) {
    RouterConfig config;
    config.name = name;
    config.experts = std::move(experts);
    config.input = input;
    config.granularity = granularity;
    config.top_k = top_k;
    at::manual_seed(7);
    const int64_t k = static_cast<int64_t>(config.experts.size());
    auto router =
        Router::Create(config, at::randn({k, model_->config().hidden_size}), at::randn({k}) * 0.1);
    EXPECT_TRUE(router.ok()) << router.status();
    return *router;
  }

  absl::StatusOr<MixtureOutput> Run(std::vector<MixtureSequence> batch) {
    auto cache = model_->CreateKvCache(4, 32);
    return mixture_->Forward(batch, *cache, {.all_logits = true});
  }

  MixtureSequence Sequence(RoutingControls controls, int64_t slot = 0,
                           std::vector<int64_t> tokens = {5, 17, 29, 2}) {
    return MixtureSequence{{slot, std::move(tokens)}, std::move(controls), nullptr};
  }

  const std::vector<std::string> names_ = {"math", "code", "chat"};
  testing_support::ScopedTempDir temp_{"mixture_test"};
  std::unique_ptr<Model> model_;
  std::unique_ptr<ExpertPool> pool_;
  std::unique_ptr<Mixture> mixture_;
};

TEST_F(MixtureTest, PinnedAndExplicitWeightsAreTracedPerToken) {
  auto pinned = Run({Sequence({.pinned_expert = "code"})});
  ASSERT_TRUE(pinned.ok()) << pinned.status();
  EXPECT_EQ(pinned->routing.experts, names_);
  EXPECT_TRUE(at::equal(pinned->routing.weights, at::tensor({0.f, 1.f, 0.f}).repeat({4, 1})));

  auto mixed = Run(
      {Sequence({.explicit_weights = {{"math", 0.25}, {"chat", 0.5}}, .masked_experts = {"chat"}}),
       Sequence({}, 1, {9, 9})});
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  EXPECT_TRUE(at::equal(mixed->routing.weights.slice(0, 0, 4),
                        at::tensor({0.25f, 0.f, 0.f}).repeat({4, 1})));
  // No router and no controls: the base model.
  EXPECT_TRUE(at::equal(mixed->routing.weights.slice(0, 4), at::zeros({2, 3})));
}

TEST_F(MixtureTest, RoutedForwardEqualsForwardWithItsTracedWeights) {
  ASSERT_TRUE(mixture_->AttachRouter(MakeRouter("r", names_), false).ok());
  auto routed = Run({Sequence({}), Sequence({}, 1, {100, 3})});
  ASSERT_TRUE(routed.ok()) << routed.status();
  auto cache = model_->CreateKvCache(4, 32);
  auto direct =
      mixture_->ForwardWithWeights({{0, {5, 17, 29, 2}}, {1, {100, 3}}}, *cache, pool_->snapshot(),
                                   routed->routing.weights, {.all_logits = true});
  ASSERT_TRUE(direct.ok());
  EXPECT_TRUE(at::equal(routed->forward.logits, direct->logits));
  // Token granularity from embeddings: exactly the router on each token's embedding.
  const auto router = MakeRouter("r", names_);  // same seed: the same gate
  const at::Tensor expected = NormalizeRouting(router->Logits(*model_->Embed({5, 17, 29, 2})), {});
  EXPECT_TRUE(at::allclose(routed->routing.weights.slice(0, 0, 4), expected, 1e-6, 1e-6));
  EXPECT_FALSE(at::allclose(routed->routing.weights[0], routed->routing.weights[1]));
}

// Top-1 routing over 16 experts: ForwardWithWeights sees at most one non-zero weight a token and
// takes the sparse path (each token reads only its expert's rows), which gives what the dense
// pass over every expert gives.
TEST_F(MixtureTest, FewExpertsATokenTakeTheSparsePathWithTheDenseResult) {
  for (int i = 3; i < 16; ++i) {
    RandomAdapterOptions spec;
    spec.r = 8;
    spec.target_modules = {"q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"};
    spec.seed = 44 + i;
    spec.std = 0.2;
    const std::string name = absl::StrCat("extra", i);
    ASSERT_TRUE(WriteRandomAdapter(temp_.Join(name), model_->config(), spec).ok());
    ASSERT_TRUE(mixture_->AttachExpert(name, temp_.Join(name)).ok());
  }
  const auto snapshot = pool_->snapshot();
  ASSERT_EQ(snapshot->size(), 16);
  // Tokens 0 and 1 each on one expert, token 2 on none, token 3 on the last at weight 0.5.
  at::Tensor weights = at::zeros({4, 16});
  weights[0][1] = 0.5;
  weights[1][6] = 0.75;
  weights[3][15] = 0.5;
  const std::vector<SequenceInput> batch = {{0, {5, 17, 29}}, {1, {100}}};

  EXPECT_TRUE(MixtureDelta(*pool_, snapshot, weights, 1).sparse());
  EXPECT_FALSE(MixtureDelta(*pool_, snapshot, weights, 2).sparse());  // an eighth each: dense
  EXPECT_FALSE(MixtureDelta(*pool_, snapshot, weights).sparse());
  EXPECT_FALSE(MixtureDelta(*pool_, snapshot, at::zeros({9, 16}), 1).sparse());  // 9 pairs

  auto cache = model_->CreateKvCache(4, 32);
  auto sparse =
      mixture_->ForwardWithWeights(batch, *cache, snapshot, weights, {.all_logits = true});
  ASSERT_TRUE(sparse.ok()) << sparse.status();
  const MixtureDelta dense_delta(*pool_, snapshot, weights);
  auto dense_cache = model_->CreateKvCache(4, 32);
  auto dense = model_->Forward(batch, *dense_cache, {.all_logits = true, .delta = &dense_delta});
  ASSERT_TRUE(dense.ok()) << dense.status();
  EXPECT_TRUE(at::allclose(sparse->logits, dense->logits, 1e-4, 1e-4));
  auto base_cache = model_->CreateKvCache(4, 32);
  auto base = model_->Forward(batch, *base_cache, {.all_logits = true});
  ASSERT_TRUE(base.ok());
  EXPECT_FALSE(at::allclose(sparse->logits, base->logits, 1e-3, 1e-3));
}

TEST_F(MixtureTest, SequenceGranularityIsFixedAtTheFirstForward) {
  ASSERT_TRUE(mixture_
                  ->AttachRouter(MakeRouter("seq", names_, RouterInput::kEmbeddings,
                                            RoutingGranularity::kSequence, 2),
                                 false)
                  .ok());
  RoutingState state;
  auto cache = model_->CreateKvCache(1, 32);
  std::vector<MixtureSequence> prefill = {{{0, {5, 17, 29, 2}}, {}, &state}};
  auto first = mixture_->Forward(prefill, *cache);
  ASSERT_TRUE(first.ok()) << first.status();
  const at::Tensor row = first->routing.weights[0];
  for (int t = 1; t < 4; ++t) EXPECT_TRUE(at::equal(first->routing.weights[t], row));
  EXPECT_EQ(row.gt(0).sum().item<int64_t>(), 2);  // top-2
  EXPECT_NEAR(row.sum().item<double>(), 1.0, 1e-6);
  // The mean-pooled prompt embedding, through the router.
  const at::Tensor pooled = model_->Embed({5, 17, 29, 2})->mean(0, true);
  RoutingNormalization top2;
  top2.top_k = 2;
  const at::Tensor expected = NormalizeRouting(MakeRouter("seq", names_)->Logits(pooled), top2);
  EXPECT_TRUE(at::allclose(row, expected[0], 1e-6, 1e-6));
  // Decode steps keep the prompt's weights, whatever the new token.
  std::vector<MixtureSequence> decode = {{{0, {77}}, {}, &state}};
  auto step = mixture_->Forward(decode, *cache);
  ASSERT_TRUE(step.ok());
  EXPECT_TRUE(at::allclose(step->routing.weights[0], row));
}

TEST_F(MixtureTest, BaseHiddenRoutesFromTheBaseModelsFinalHiddenState) {
  ASSERT_TRUE(mixture_
                  ->AttachRouter(MakeRouter("hidden", names_, RouterInput::kBaseHidden,
                                            RoutingGranularity::kSequence),
                                 false)
                  .ok());
  auto routed = Run({Sequence({})});
  ASSERT_TRUE(routed.ok()) << routed.status();
  auto cache = model_->CreateKvCache(1, 8);
  auto base = model_->Forward({{0, {5, 17, 29, 2}}}, *cache, {.return_hidden = true});
  ASSERT_TRUE(base.ok());
  const at::Tensor expected =
      NormalizeRouting(MakeRouter("hidden", names_)->Logits(base->hidden.mean(0, true)), {});
  EXPECT_TRUE(at::allclose(routed->routing.weights[0], expected[0], 1e-5, 1e-6));
}

TEST_F(MixtureTest, InvalidControlsAreRejected) {
  ASSERT_TRUE(mixture_->AttachRouter(MakeRouter("r", names_), false).ok());
  const struct {
    RoutingControls controls;
    const char* message;
    absl::StatusCode code = absl::StatusCode::kInvalidArgument;
  } cases[] = {
      {{.explicit_weights = {{"math", std::nan("")}}}, "finite"},
      {{.explicit_weights = {{"math", -1}}}, "finite and >= 0"},
      {{.explicit_weights = {{"poetry", 1}}}, "'poetry'", absl::StatusCode::kNotFound},
      {{.explicit_weights = {{"math", 1}}, .masked_experts = {"math"}}, "weight 0"},
      {{.pinned_expert = "poetry"}, "pinned expert 'poetry'", absl::StatusCode::kNotFound},
      {{.pinned_expert = "math", .masked_experts = {"math"}}, "also masked"},
      {{.masked_experts = {"poetry"}}, "'poetry'", absl::StatusCode::kNotFound},
      {{.masked_experts = {"math", "code", "chat"}}, "no expert"},
      {{.router = "nope"}, "no router named 'nope'", absl::StatusCode::kNotFound},
      {{.top_k = 4}, "top_k"},
      {{.temperature = 0.0}, "temperature"},
      {{.temperature = std::nan("")}, "temperature"},
  };
  for (const auto& c : cases) {
    auto out = Run({Sequence(c.controls)});
    ASSERT_FALSE(out.ok()) << c.message;
    EXPECT_EQ(out.status().code(), c.code) << c.message;
    EXPECT_THAT(Message(out.status()), HasSubstr(c.message));
  }
}

TEST_F(MixtureTest, RouterAndExpertPreconditionsAndForce) {
  auto missing = mixture_->AttachRouter(MakeRouter("r", {"math", "poetry", "chat"}), false);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(Message(missing.status()), HasSubstr("poetry"));
  auto forced = mixture_->AttachRouter(MakeRouter("r", {"math", "poetry", "chat"}), true);
  ASSERT_TRUE(forced.ok()) << forced.status();
  EXPECT_EQ(forced->missing_experts, std::vector<std::string>{"poetry"});
  EXPECT_TRUE(forced->is_default);
  // The missing expert's weight is dropped and the rest renormalised.
  auto routed = Run({Sequence({})});
  ASSERT_TRUE(routed.ok()) << routed.status();
  EXPECT_TRUE(at::allclose(routed->routing.weights.sum(1), at::ones({4})));
  EXPECT_TRUE(
      at::equal(routed->routing.weights.select(1, 1), at::zeros({4})));  // code: not in router

  const absl::Status needed = mixture_->DetachExpert("chat", false);
  EXPECT_EQ(needed.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(Message(needed), HasSubstr("router 'r'"));
  ASSERT_TRUE(mixture_->DetachExpert("chat", true).ok());
  routed = Run({Sequence({})});
  ASSERT_TRUE(routed.ok()) << routed.status();
  EXPECT_EQ(routed->routing.experts, (std::vector<std::string>{"math", "code"}));
  EXPECT_TRUE(at::allclose(routed->routing.weights.select(1, 0), at::ones({4})));

  EXPECT_EQ(mixture_->AttachRouter(MakeRouter("r", names_), true).status().code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(mixture_->SetDefaultRouter("nope").code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(mixture_->DetachRouter("r").ok());
  EXPECT_TRUE(mixture_->ListRouters().empty());
  EXPECT_EQ(mixture_->DetachRouter("r").code(), absl::StatusCode::kNotFound);
}

// d(loss)/d(routing weights) and d(loss)/d(gate) exist, are finite and non-zero, and agree with
// finite differences (in double precision, where the check is sharp).
TEST_F(MixtureTest, GradientsReachRoutingWeightsAndTheGate) {
  Build(at::kDouble);
  const auto snapshot = pool_->snapshot();
  const std::vector<SequenceInput> batch = {{0, {5, 17, 29, 2}}};
  const at::Tensor targets = at::tensor(std::vector<int64_t>{17, 29, 2, 40}, at::kLong);
  auto loss_for = [&](const at::Tensor& weights) {
    auto cache = model_->CreateKvCache(1, 8);
    auto out = mixture_->ForwardWithWeights(batch, *cache, snapshot, weights, {.all_logits = true});
    EXPECT_TRUE(out.ok()) << out.status();
    return at::cross_entropy_loss(out->logits, targets);
  };
  at::Tensor weights = at::full({4, 3}, 0.3, at::kDouble).requires_grad_();
  at::Tensor loss = loss_for(weights);
  loss.backward();
  const at::Tensor grad = weights.grad();
  ASSERT_TRUE(grad.defined());
  EXPECT_TRUE(at::isfinite(grad).all().item<bool>());
  EXPECT_GT(grad.abs().max().item<double>(), 0);
  const double eps = 1e-6;
  for (const auto& [t, e] : std::vector<std::pair<int, int>>{{0, 0}, {3, 2}}) {
    at::Tensor plus = weights.detach().clone(), minus = weights.detach().clone();
    plus[t][e] += eps;
    minus[t][e] -= eps;
    const double numeric =
        (loss_for(plus).item<double>() - loss_for(minus).item<double>()) / (2 * eps);
    EXPECT_NEAR(grad[t][e].item<double>(), numeric, 1e-6 + 1e-4 * std::abs(numeric));
  }

  // Through a router: gate -> logits -> softmax -> weights -> the single pass.
  RouterConfig config{.name = "g", .experts = names_};
  at::Tensor gate = (at::randn({3, 64}) * 0.5).requires_grad_();
  at::Tensor bias = at::zeros({3}).requires_grad_();
  auto router = Router::Create(config, gate, bias);
  ASSERT_TRUE(router.ok());
  auto routed_loss = [&]() {
    const at::Tensor features = model_->Embed({5, 17, 29, 2})->to(at::kFloat);
    return loss_for(NormalizeRouting((*router)->Logits(features), {}).to(at::kDouble));
  };
  routed_loss().backward();
  ASSERT_TRUE((*router)->gate_weight().grad().defined());
  EXPECT_TRUE(at::isfinite((*router)->gate_weight().grad()).all().item<bool>());
  EXPECT_GT((*router)->gate_weight().grad().abs().max().item<double>(), 0);
  EXPECT_GT((*router)->gate_bias().grad().abs().max().item<double>(), 0);
  const double analytic = (*router)->gate_weight().grad()[1][5].item<double>();
  const double step = 1e-2;
  double numeric = 0;
  {
    c10::NoGradGuard no_grad;
    gate[1][5] += step;
    const double up = routed_loss().item<double>();
    gate[1][5] -= 2 * step;
    const double down = routed_loss().item<double>();
    gate[1][5] += step;
    numeric = (up - down) / (2 * step);
  }
  EXPECT_NEAR(analytic, numeric, 1e-3 + 2e-2 * std::abs(numeric));
}

TEST_F(MixtureTest, KPassBaselineMatchesTheSinglePassForOneExpert) {
  const auto snapshot = pool_->snapshot();
  const std::vector<SequenceInput> batch = {{0, {5, 17, 29, 2}}, {1, {8, 1}}};
  const at::Tensor one_hot = at::tensor({0.f, 1.f, 0.f}).repeat({2, 1});
  auto k_pass = mixture_->KPassLogits(batch, snapshot, one_hot);
  ASSERT_TRUE(k_pass.ok()) << k_pass.status();
  auto cache = model_->CreateKvCache(2, 8);
  auto fused = mixture_->ForwardWithWeights(batch, *cache, snapshot,
                                            at::tensor({0.f, 1.f, 0.f}).repeat({6, 1}));
  ASSERT_TRUE(fused.ok());
  EXPECT_LE((*k_pass - fused->logits).abs().max().item<double>(), 1e-5);
  // With two experts the baseline mixes logits, which is not the same model as mixing adapters.
  auto mixed = mixture_->KPassLogits(batch, snapshot, at::tensor({0.5f, 0.5f, 0.f}).repeat({2, 1}));
  ASSERT_TRUE(mixed.ok());
  EXPECT_EQ(mixed->sizes(), (std::vector<int64_t>{2, 128}));
  EXPECT_FALSE(mixture_->KPassLogits(batch, snapshot, at::zeros({2, 3})).ok());
}

// Greedy generation through the mixture equals the model's greedy loop with the same fused delta,
// and reports the weights behind every generated token.
TEST_F(MixtureTest, GreedyGenerateThroughTheMixture) {
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 29, 2}, {8, 1}};
  auto routed =
      GreedyGenerate(*mixture_, prompts, 5, {.explicit_weights = {{"code", 0.6}, {"chat", 0.4}}});
  ASSERT_TRUE(routed.ok()) << routed.status();
  EXPECT_EQ(routed->experts, names_);
  ASSERT_EQ(routed->routing.size(), 2u);
  EXPECT_TRUE(at::equal(routed->routing[1], at::tensor({0.f, 0.6f, 0.4f}).repeat({5, 1})));
  // The same weights as a fixed delta over every forward of the plain greedy loop.
  const at::Tensor per_token = at::tensor({0.f, 0.6f, 0.4f});
  class FixedMix : public LinearDelta {
   public:
    FixedMix(const ExpertPool& pool, at::Tensor row) : pool_(pool), row_(std::move(row)) {}
    at::Tensor Apply(const ProjectionId& id, const at::Tensor& x, at::Tensor y) const override {
      MixtureDelta delta(pool_, pool_.snapshot(), row_.repeat({x.size(0), 1}));
      return delta.Apply(id, x, std::move(y));
    }

   private:
    const ExpertPool& pool_;
    at::Tensor row_;
  } fixed(*pool_, per_token);
  auto plain = GreedyGenerate(*model_, prompts, 5, &fixed);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(routed->tokens, *plain);
}

}  // namespace
}  // namespace moelora
