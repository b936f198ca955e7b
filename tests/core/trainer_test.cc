#include "core/trainer.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/adapter.h"
#include "core/checkpoint.h"
#include "core/demo_assets.h"
#include "core/expert_pool.h"
#include "core/file_io.h"
#include "core/mixture.h"
#include "core/random_model.h"
#include "core/router.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::HasSubstr;
using testing_support::ScopedTempDir;
using Json = nlohmann::json;

// Debian's gtest matchers do not take absl::string_view.
std::string Message(const absl::Status& status) { return std::string(status.message()); }

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// Three synthetic domains over disjoint token ranges of the tiny model's vocabulary (128).
std::vector<SyntheticDomain> TestDomains() {
  return {{.name = "alpha", .first_token = 8, .num_tokens = 24, .rule_seed = 101},
          {.name = "beta", .first_token = 40, .num_tokens = 24, .rule_seed = 102},
          {.name = "gamma", .first_token = 72, .num_tokens = 24, .rule_seed = 103}};
}

const std::vector<std::string> kExpertTargets = {"q_proj", "v_proj", "o_proj", "up_proj",
                                                 "down_proj"};

TrainerOptions Quiet(TrainerOptions options) {
  options.on_log = [](const TrainingLog&, const std::string&) {};
  return options;
}

bool Same(const at::Tensor& a, const at::Tensor& b) { return at::equal(a.cpu(), b.cpu()); }

std::vector<TokenSequence> Batch(const SyntheticDomain& domain, int64_t count, uint64_t seed) {
  return DomainSequences(domain, count, 10, seed);
}

// One tiny llama and, made once for the whole suite, one expert per test domain trained with
// the trainer's expert mode.
class TrainerTest : public ::testing::Test {
 protected:
  struct DomainExpert {
    ExpertSource source;
    TrainingSummary summary;
  };

  static void SetUpTestSuite() {
    // The tiny model's ops are far too small to share among threads: on a busy 2-core machine
    // two OpenMP threads make a step 10x slower than one.
    at::set_num_threads(1);
    dir_ = new ScopedTempDir("trainer");
    ASSERT_TRUE(
        WriteRandomModel(dir_->Join("model"), TinyModelConfig(ModelType::kLlama), {.seed = 3})
            .ok());
    auto model = Model::Load(dir_->Join("model"));
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete dir_;
    model_ = nullptr;
    dir_ = nullptr;
  }

  // The domain experts (trained on first use, in expert mode).
  static const std::vector<DomainExpert>& DomainExperts() {
    static const std::vector<DomainExpert>* experts = [] {
      auto* out = new std::vector<DomainExpert>();
      const auto start = std::chrono::steady_clock::now();
      for (const SyntheticDomain& domain : TestDomains()) {
        TrainerOptions options = Quiet({.steps = 100,
                                        .batch_size = 8,
                                        .expert_lr = 1e-2,
                                        .seed = domain.rule_seed,
                                        .out_dir = dir_->Join("experts/" + domain.name),
                                        .log_every = 25});
        auto trainer = Trainer::ForNewExpert(
            *model_,
            {.name = domain.name, .r = 8, .lora_alpha = 16, .target_modules = kExpertTargets},
            options);
        EXPECT_TRUE(trainer.ok()) << trainer.status();
        auto data = SplitHeldout(DomainSequences(domain, 64, 12, domain.rule_seed), 0.25, 1);
        EXPECT_TRUE(data.ok());
        auto summary = (*trainer)->Train(*data);
        EXPECT_TRUE(summary.ok()) << summary.status();
        std::cerr << "expert " << domain.name << ": loss " << summary->first_loss << " -> "
                  << summary->last_loss << ", held-out " << summary->initial_heldout_loss << " -> "
                  << summary->final_heldout_loss << "\n";
        out->push_back({{domain.name, options.out_dir}, *summary});
      }
      std::cerr << "domain experts trained in " << Seconds(start) << " s\n";
      return out;
    }();
    return *experts;
  }

  static std::vector<ExpertSource> DomainExpertSources() {
    std::vector<ExpertSource> out;
    for (const DomainExpert& expert : DomainExperts()) out.push_back(expert.source);
    return out;
  }

  // Random experts (B non-zero, so every gradient is non-zero from the first step).
  static std::vector<ExpertSource> RandomExperts(int count) {
    std::vector<ExpertSource> out;
    for (int i = 0; i < count; ++i) {
      const std::string dir = dir_->Join(absl::StrCat("random/e", i));
      EXPECT_TRUE(WriteRandomAdapter(dir, model_->config(),
                                     {.r = 2 + i,
                                      .lora_alpha = 8,
                                      .target_modules = {"q_proj", "v_proj", "down_proj"},
                                      .seed = static_cast<uint64_t>(40 + i)})
                      .ok());
      out.push_back({absl::StrCat("e", i), dir});
    }
    return out;
  }

  static ScopedTempDir* dir_;
  static Model* model_;
};

ScopedTempDir* TrainerTest::dir_ = nullptr;
Model* TrainerTest::model_ = nullptr;

// ---- gradient flow ---------------------------------------------------------------------------

TEST_F(TrainerTest, OneStepMovesTheGateAndNothingFrozen) {
  auto trainer = Trainer::ForRouter(*model_, RandomExperts(3), Quiet({.lr = 1e-2}));
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const at::Tensor gate_before = (*trainer)->router()->gate_weight().detach().clone();
  const at::Tensor bias_before = (*trainer)->router()->gate_bias().detach().clone();
  const at::Tensor base_before = model_->projection(0, ProjectionKind::kQ).weight().clone();
  const at::Tensor embed_row_before = model_->Embed({9}).value().clone();

  auto log = (*trainer)->Step(Batch(TestDomains()[0], 4, 1));
  ASSERT_TRUE(log.ok()) << log.status();
  const at::Tensor& gate = (*trainer)->router()->gate_weight();
  ASSERT_TRUE(gate.grad().defined());
  EXPECT_TRUE(at::isfinite(gate.grad()).all().item<bool>());
  EXPECT_GT(gate.grad().abs().max().item<double>(), 0);
  EXPECT_GT((*trainer)->router()->gate_bias().grad().abs().max().item<double>(), 0);
  EXPECT_FALSE(Same(gate.detach(), gate_before));
  EXPECT_FALSE(Same((*trainer)->router()->gate_bias().detach(), bias_before));
  // The base model is untouched and never asked for gradients.
  EXPECT_TRUE(Same(model_->projection(0, ProjectionKind::kQ).weight(), base_before));
  EXPECT_FALSE(model_->projection(0, ProjectionKind::kQ).weight().requires_grad());
  EXPECT_TRUE(Same(model_->Embed({9}).value(), embed_row_before));
  EXPECT_TRUE(std::isfinite(log->loss));
  EXPECT_GT(log->grad_norm, 0);
  ASSERT_EQ(log->share.size(), 3u);
  EXPECT_NEAR(log->share[0] + log->share[1] + log->share[2], 1.0, 1e-5);
  EXPECT_GT(log->entropy, 0);
  EXPECT_LE(log->entropy, std::log(3.0) + 1e-6);
  // Frozen experts: only the gate is trained.
  EXPECT_EQ((*trainer)->parameters().size(), 2u);
}

TEST_F(TrainerTest, TrainableExpertsMoveTheirAAndB) {
  const std::vector<ExpertSource> experts = RandomExperts(2);
  auto trainer =
      Trainer::ForRouter(*model_, experts, Quiet({.expert_lr = 1e-2, .train_experts = true}));
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  std::vector<at::Tensor> before;
  for (const at::Tensor& t : (*trainer)->expert_parameters("e1"))
    before.push_back(t.detach().clone());
  ASSERT_EQ(before.size(), 2u * 2 * 3);  // A and B x 3 projections x 2 layers
  const at::Tensor base_before = model_->projection(1, ProjectionKind::kDown).weight().clone();
  const at::Tensor gate_before = (*trainer)->router()->gate_weight().detach().clone();

  ASSERT_TRUE((*trainer)->Step(Batch(TestDomains()[1], 4, 2)).ok());
  const std::vector<at::Tensor> after = (*trainer)->expert_parameters("e1");
  for (size_t i = 0; i < after.size(); ++i) {
    ASSERT_TRUE(after[i].grad().defined()) << i;
    EXPECT_TRUE(at::isfinite(after[i].grad()).all().item<bool>()) << i;
    EXPECT_GT(after[i].grad().abs().max().item<double>(), 0) << i;
    EXPECT_FALSE(Same(after[i].detach(), before[i])) << i;
  }
  EXPECT_FALSE(Same((*trainer)->router()->gate_weight().detach(), gate_before));
  EXPECT_TRUE(Same(model_->projection(1, ProjectionKind::kDown).weight(), base_before));

  // Saved: the router, and each expert as a PEFT adapter core reads back with the new values.
  ScopedTempDir out("trained");
  ASSERT_TRUE((*trainer)->Save(out.path()).ok());
  ASSERT_TRUE(Router::Load(out.path(), model_->config().hidden_size).ok());
  auto reloaded = Adapter::Load("e1", out.Join("experts/e1"), model_->config());
  ASSERT_TRUE(reloaded.ok()) << reloaded.status();
  ASSERT_EQ(reloaded->modules().size(), 6u);
  EXPECT_TRUE(Same(reloaded->modules()[0].a, after[0].detach()));
  EXPECT_TRUE(Same(reloaded->modules()[0].b, after[1].detach()));
  // The original adapter config is kept (rank, alpha, targets).
  auto original = Adapter::Load("e1", experts[1].dir, model_->config());
  ASSERT_TRUE(original.ok());
  EXPECT_EQ(reloaded->config().r, original->config().r);
  EXPECT_EQ(reloaded->modules()[0].scaling, original->modules()[0].scaling);
}

// ---- expert mode -----------------------------------------------------------------------------

TEST_F(TrainerTest, NewExpertIsInitialisedAsPeftAndRoundTrips) {
  auto trainer = Trainer::ForNewExpert(
      *model_, {.name = "fresh", .r = 4, .lora_alpha = 8, .target_modules = {"q_proj", "up_proj"}},
      Quiet({.expert_lr = 1e-2, .seed = 9}));
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const std::vector<at::Tensor> params = (*trainer)->parameters();
  ASSERT_EQ(params.size(), 2u * 2 * 2);
  const double bound_q = 1.0 / std::sqrt(64.0);  // in_features of q_proj
  EXPECT_LE(params[0].abs().max().item<double>(), bound_q);
  EXPECT_GT(params[0].abs().max().item<double>(), 0.5 * bound_q);
  EXPECT_EQ(params[1].abs().max().item<double>(), 0.0);  // B = 0: starts as the base model
  EXPECT_EQ(params[1].size(0), 64);
  EXPECT_EQ(params[1].size(1), 4);
  EXPECT_EQ(params[3].size(0), 128);  // up_proj: [intermediate, r]

  ASSERT_TRUE((*trainer)->Step(Batch(TestDomains()[2], 4, 3)).ok());
  EXPECT_GT(params[1].abs().max().item<double>(), 0);  // B moved (A has no gradient while B = 0)

  ScopedTempDir out("fresh");
  ASSERT_TRUE((*trainer)->Save(out.path()).ok());
  auto text = ReadFileToString(out.Join("adapter_config.json"), "config");
  ASSERT_TRUE(text.ok());
  const Json config = Json::parse(*text);
  EXPECT_EQ(config["peft_type"], "LORA");
  EXPECT_EQ(config["task_type"], "CAUSAL_LM");
  EXPECT_EQ(config["bias"], "none");
  EXPECT_EQ(config["r"], 4);
  EXPECT_EQ(config["lora_alpha"], 8.0);
  EXPECT_EQ(config["target_modules"], Json({"q_proj", "up_proj"}));
  auto file = Checkpoint::OpenFile(out.Join("adapter_model.safetensors"));
  ASSERT_TRUE(file.ok());
  EXPECT_TRUE(file->Has("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"));
  EXPECT_TRUE(file->Has("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"));
  EXPECT_EQ(file->Names().size(), 8u);

  auto adapter = Adapter::Load("fresh", out.path(), model_->config());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  ASSERT_EQ(adapter->modules().size(), 4u);
  EXPECT_EQ(adapter->modules()[0].rank, 4);
  EXPECT_DOUBLE_EQ(adapter->modules()[0].scaling, 2.0);
  for (size_t i = 0; i < adapter->modules().size(); ++i) {
    EXPECT_TRUE(Same(adapter->modules()[i].a, params[2 * i].detach())) << i;
    EXPECT_TRUE(Same(adapter->modules()[i].b, params[2 * i + 1].detach())) << i;
  }
  // And the serving pool attaches it.
  auto pool = ExpertPool::Create(*model_, {.capacity = 2, .max_rank = 8});
  ASSERT_TRUE(pool.ok());
  EXPECT_TRUE((*pool)->Attach("fresh", out.path()).ok());
}

TEST_F(TrainerTest, ExpertModeConverges) {
  for (const DomainExpert& expert : DomainExperts()) {
    const TrainingSummary& s = expert.summary;
    EXPECT_LT(s.last_loss, s.first_loss - 2.0) << expert.source.name;
    EXPECT_LT(s.final_heldout_loss, s.initial_heldout_loss - 2.0) << expert.source.name;
    ASSERT_FALSE(s.logs.empty());
    EXPECT_EQ(s.logs.back().step, 100);
  }
}

// ---- router training -------------------------------------------------------------------------

TEST_F(TrainerTest, RouterConvergesAndRoutingIsLearned) {
  const std::vector<SyntheticDomain> domains = TestDomains();
  std::vector<TokenSequence> train, heldout;
  std::vector<int64_t> heldout_domain;
  for (size_t d = 0; d < domains.size(); ++d) {
    for (auto& s : DomainSequences(domains[d], 32, 12, 500 + d)) train.push_back(std::move(s));
    for (auto& s : DomainSequences(domains[d], 10, 12, 900 + d)) {
      heldout.push_back(std::move(s));
      heldout_domain.push_back(static_cast<int64_t>(d));
    }
  }
  const std::vector<ExpertSource> experts = DomainExpertSources();
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::string> lines;
  TrainerOptions options{.steps = 100, .batch_size = 8, .lr = 3e-2, .seed = 5, .log_every = 25};
  options.on_log = [&](const TrainingLog&, const std::string& line) { lines.push_back(line); };
  auto trainer = Trainer::ForRouter(*model_, experts, options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const at::Tensor uniform = at::full({3}, 1.0 / 3, at::kFloat);
  auto uniform_loss = (*trainer)->EvalLoss(heldout, uniform);
  ASSERT_TRUE(uniform_loss.ok());
  auto summary = (*trainer)->Train({train, heldout});
  ASSERT_TRUE(summary.ok()) << summary.status();
  std::cerr << "router: loss " << summary->first_loss << " -> " << summary->last_loss
            << ", held-out " << summary->initial_heldout_loss << " -> "
            << summary->final_heldout_loss << ", uniform weights " << *uniform_loss << " ("
            << Seconds(start) << " s)\n";
  // Convergence: a clear fall of the training and the held-out loss.
  EXPECT_LT(summary->last_loss, 0.5 * summary->first_loss);
  EXPECT_LT(summary->final_heldout_loss, 0.5 * summary->initial_heldout_loss);
  // Routed loss beats uniform weights.
  EXPECT_LT(summary->final_heldout_loss, 0.5 * *uniform_loss);

  // The router's top-1 (mean weight over the sequence's tokens) is the domain's expert.
  int correct = 0;
  for (size_t i = 0; i < heldout.size(); ++i) {
    auto weights = (*trainer)->Route(heldout[i]);
    ASSERT_TRUE(weights.ok());
    if (weights->mean(0).argmax().item<int64_t>() == heldout_domain[i]) ++correct;
  }
  const double accuracy = static_cast<double>(correct) / static_cast<double>(heldout.size());
  std::cerr << "router top-1 matches the domain on " << 100 * accuracy << "% of " << heldout.size()
            << " held-out sequences\n";
  EXPECT_GE(accuracy, 0.9);

  // Log lines: step, loss, held-out loss, entropy, per-expert share.
  ASSERT_EQ(lines.size(), 4u);
  EXPECT_THAT(lines[0], HasSubstr("step  25/100"));
  EXPECT_THAT(lines[0], HasSubstr("heldout"));
  EXPECT_THAT(lines[0], HasSubstr("entropy"));
  EXPECT_THAT(lines[0], HasSubstr("alpha="));

  // The saved router, attached to a Mixture, routes the same way in the daemon's code path.
  ScopedTempDir out("router");
  ASSERT_TRUE((*trainer)->Save(out.path()).ok());
  auto pool = ExpertPool::Create(*model_, {.capacity = 4, .max_rank = 8});
  ASSERT_TRUE(pool.ok());
  Mixture mixture(*model_, **pool);
  for (const ExpertSource& e : experts) ASSERT_TRUE(mixture.AttachExpert(e.name, e.dir).ok());
  auto info = mixture.AttachRouter(out.path(), /*force=*/false);
  ASSERT_TRUE(info.ok()) << info.status();
  auto cache = model_->CreateKvCache(1, 16);
  ASSERT_TRUE(cache.ok());
  std::vector<MixtureSequence> batch = {{{0, heldout[0]}, {}, nullptr}};
  auto routed = mixture.Forward(batch, *cache);
  ASSERT_TRUE(routed.ok()) << routed.status();
  auto expected = (*trainer)->Route(heldout[0]);
  ASSERT_TRUE(expected.ok());
  EXPECT_TRUE(at::allclose(routed->routing.weights, *expected, 1e-5, 1e-6));
}

TEST_F(TrainerTest, LoadBalancingEvensOutTheShares) {
  // All data from one domain: without balancing the router sends almost everything to its expert;
  // a strong balancing loss keeps the shares close to uniform.
  const std::vector<TokenSequence> data = DomainSequences(TestDomains()[0], 32, 10, 77);
  double top_share[2] = {0, 0};
  for (int balanced = 0; balanced < 2; ++balanced) {
    auto trainer = Trainer::ForRouter(
        *model_, DomainExpertSources(),
        Quiet({.steps = 40, .lr = 3e-2, .load_balance_coef = balanced ? 5.0 : 0.0, .seed = 1}));
    ASSERT_TRUE(trainer.ok());
    auto summary = (*trainer)->Train({data, {}});
    ASSERT_TRUE(summary.ok()) << summary.status();
    const std::vector<double>& share = summary->logs.back().share;
    top_share[balanced] = *std::max_element(share.begin(), share.end());
  }
  EXPECT_GT(top_share[0], 0.8);
  EXPECT_LT(top_share[1], top_share[0] - 0.2);
}

TEST_F(TrainerTest, CheckpointsAndSequenceGranularity) {
  ScopedTempDir out("ckpt");
  auto trainer = Trainer::ForRouter(*model_, RandomExperts(2),
                                    Quiet({.steps = 6,
                                           .batch_size = 2,
                                           .router_name = "seq-router",
                                           .granularity = RoutingGranularity::kSequence,
                                           .out_dir = out.path(),
                                           .checkpoint_every = 2,
                                           .log_every = 3}));
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const std::vector<TokenSequence> data = Batch(TestDomains()[0], 6, 4);
  auto summary = (*trainer)->Train({data, {}});
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->steps, 6);
  EXPECT_EQ(summary->final_heldout_loss, -1);
  for (const char* step : {"step-000002", "step-000004"}) {
    auto router = Router::Load(out.Join(absl::StrCat("checkpoints/", step)), 64);
    ASSERT_TRUE(router.ok()) << step << ": " << router.status();
  }
  auto router = Router::Load(out.path(), 64);
  ASSERT_TRUE(router.ok()) << router.status();
  EXPECT_EQ((*router)->config().name, "seq-router");
  EXPECT_EQ((*router)->config().granularity, RoutingGranularity::kSequence);
  EXPECT_EQ((*router)->config().experts, std::vector<std::string>({"e0", "e1"}));
  EXPECT_TRUE(Same((*router)->gate_weight(), (*trainer)->router()->gate_weight().detach()));
  // One weight row for the whole sequence.
  auto weights = (*trainer)->Route(data[0]);
  ASSERT_TRUE(weights.ok());
  EXPECT_TRUE(Same((*weights)[0], (*weights)[5]));

  // Continuing from the saved router (its expert order wins).
  std::vector<ExpertSource> reversed = RandomExperts(2);
  std::swap(reversed[0], reversed[1]);
  auto resumed = Trainer::ForRouter(*model_, reversed, Quiet({.init_router_dir = out.path()}));
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  EXPECT_EQ((*resumed)->expert_names(), std::vector<std::string>({"e0", "e1"}));
  EXPECT_TRUE(Same((*resumed)->router()->gate_weight().detach(), (*router)->gate_weight()));
}

// ---- bad input -------------------------------------------------------------------------------

TEST_F(TrainerTest, BadInputIsRefusedClearly) {
  const std::vector<ExpertSource> experts = RandomExperts(2);
  auto trainer = Trainer::ForRouter(*model_, experts, Quiet({.steps = 1}));
  ASSERT_TRUE(trainer.ok());
  // Empty data, a one-token sequence, an id past the vocabulary.
  EXPECT_THAT(Message((*trainer)->Train({{}, {}}).status()), HasSubstr("no sequences"));
  EXPECT_THAT(Message((*trainer)->Train({{{5}}, {}}).status()),
              HasSubstr("sequence 0 has 1 token(s)"));
  absl::Status status = (*trainer)->Train({{{5, 6, 128}}, {}}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), HasSubstr("token id 128 at position 2"));
  EXPECT_THAT(Message(status), HasSubstr("[0, 128)"));
  status = (*trainer)->Train({{{5, 6}}, {{1, 200}}}).status();
  EXPECT_THAT(Message(status), HasSubstr("held-out data"));

  // An expert made for another base model.
  ModelConfig other = TinyModelConfig(ModelType::kLlama);
  other.hidden_size = 32;
  other.head_dim = 8;
  ASSERT_TRUE(WriteRandomAdapter(dir_->Join("other"), other, {}).ok());
  status = Trainer::ForRouter(*model_, {{"other", dir_->Join("other")}}, Quiet({})).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), HasSubstr("adapter 'other'"));
  EXPECT_THAT(Message(status), HasSubstr("expected"));
  // Missing expert directory, duplicate names, no experts.
  EXPECT_EQ(Trainer::ForRouter(*model_, {{"gone", dir_->Join("gone")}}, Quiet({})).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_THAT(Message(Trainer::ForRouter(*model_, {experts[0], experts[0]}, Quiet({})).status()),
              HasSubstr("given twice"));
  EXPECT_THAT(Message(Trainer::ForRouter(*model_, {}, Quiet({})).status()),
              HasSubstr("needs experts"));

  // A router whose expert list disagrees with the attached experts.
  ScopedTempDir router_dir("r");
  RouterConfig config{.name = "r", .experts = {"e0", "math"}};
  auto router = Router::Create(config, at::zeros({2, 64}), at::zeros({2}));
  ASSERT_TRUE(router.ok());
  ASSERT_TRUE((*router)->Save(router_dir.path()).ok());
  status =
      Trainer::ForRouter(*model_, experts, Quiet({.init_router_dir = router_dir.path()})).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), HasSubstr("names experts [e0, math]"));
  EXPECT_THAT(Message(status), HasSubstr("not attached: [math]"));
  EXPECT_THAT(Message(status), HasSubstr("not in the router: [e1]"));
  // A router over base_hidden.
  config = {.name = "h",
            .experts = {"e0", "e1"},
            .input = RouterInput::kBaseHidden,
            .granularity = RoutingGranularity::kSequence};
  router = Router::Create(config, at::zeros({2, 64}), at::zeros({2}));
  ASSERT_TRUE(router.ok());
  ASSERT_TRUE((*router)->Save(router_dir.path()).ok());
  EXPECT_THAT(
      Message(Trainer::ForRouter(*model_, experts, Quiet({.init_router_dir = router_dir.path()}))
                  .status()),
      HasSubstr("base_hidden"));

  // Options and new-expert specs.
  EXPECT_THAT(Message(Trainer::ForRouter(*model_, experts, Quiet({.temperature = 0})).status()),
              HasSubstr("temperature"));
  EXPECT_THAT(Message(Trainer::ForRouter(*model_, experts, Quiet({.batch_size = 0})).status()),
              HasSubstr("batch_size"));
  EXPECT_THAT(
      Message(Trainer::ForNewExpert(*model_, {.name = "x", .target_modules = {"qproj"}}, Quiet({}))
                  .status()),
      HasSubstr("'qproj'"));
  EXPECT_THAT(Message(Trainer::ForNewExpert(*model_, {.name = "x", .r = 0}, Quiet({})).status()),
              HasSubstr("r must be > 0"));
  EXPECT_THAT(Message(Trainer::ForNewExpert(*model_, {.name = ""}, Quiet({})).status()),
              HasSubstr("needs a name"));
}

// ---- data ------------------------------------------------------------------------------------

TEST(TrainingDataTest, ReadsTokenIdFiles) {
  ScopedTempDir dir("data");
  const std::string path = dir.Join("ids.txt");
  std::ofstream(path) << "# a comment\n1 2 3\n\n4,5, 6\t7\n  8 9  \n";
  auto sequences = ReadTokenSequences(path);
  ASSERT_TRUE(sequences.ok()) << sequences.status();
  EXPECT_EQ(*sequences, (std::vector<TokenSequence>{{1, 2, 3}, {4, 5, 6, 7}, {8, 9}}));

  std::ofstream(path) << "1 2 3\n4 x 6\n";
  absl::Status status = ReadTokenIdFile(path).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Message(status), HasSubstr("ids.txt:2: 'x' is not a token id"));
  std::ofstream(path) << "1 -2\n";
  EXPECT_THAT(Message(ReadTokenIdFile(path).status()), HasSubstr("negative token id -2"));
  std::ofstream(path) << "\n# nothing\n";
  auto empty = ReadTokenIdFile(path);
  ASSERT_TRUE(empty.ok());
  EXPECT_THAT(Message(ValidateSequences(*empty, 128, "ids.txt")), HasSubstr("no sequences"));
  EXPECT_EQ(ReadTokenIdFile(dir.Join("missing.txt")).status().code(), absl::StatusCode::kNotFound);
}

TEST(TrainingDataTest, ReadsSafetensorsWithTrailingPadding) {
  ScopedTempDir dir("data");
  const std::string path = dir.Join("ids.safetensors");
  const at::Tensor ids =
      at::tensor(std::vector<int64_t>{1, 2, 3, 4, 5, 6, -100, -100}, at::kLong).view({2, 4});
  ASSERT_TRUE(WriteTensors(path, {{"input_ids", ids}, {"other", at::zeros({2})}}).ok());
  auto sequences = ReadTokenSequences(path);
  ASSERT_TRUE(sequences.ok()) << sequences.status();
  EXPECT_EQ(*sequences, (std::vector<TokenSequence>{{1, 2, 3, 4}, {5, 6}}));

  ASSERT_TRUE(WriteTensors(path, {{"tokens", ids.to(at::kInt).view({8})}}).ok());
  sequences = ReadTokenSequences(path);
  ASSERT_TRUE(sequences.ok()) << sequences.status();
  EXPECT_EQ(*sequences, (std::vector<TokenSequence>{{1, 2, 3, 4, 5, 6}}));

  ASSERT_TRUE(WriteTensors(path, {{"a", ids}, {"b", ids}}).ok());
  EXPECT_THAT(Message(ReadTokenSequences(path).status()), HasSubstr("'input_ids'"));
  ASSERT_TRUE(WriteTensors(path, {{"input_ids", at::zeros({2, 3})}}).ok());
  EXPECT_THAT(Message(ReadTokenSequences(path).status()), HasSubstr("expected integer token ids"));
  ASSERT_TRUE(
      WriteTensors(path, {{"input_ids", at::tensor(std::vector<int64_t>{1, -1, 2}, at::kLong)}})
          .ok());
  EXPECT_THAT(Message(ReadTokenSequences(path).status()), HasSubstr("negative id -1"));
}

TEST(TrainingDataTest, SplitsChunksAndMakesDomains) {
  std::vector<TokenSequence> sequences;
  for (int64_t i = 0; i < 10; ++i) sequences.push_back({i, i + 1});
  auto split = SplitHeldout(sequences, 0.2, 3);
  ASSERT_TRUE(split.ok());
  EXPECT_EQ(split->heldout.size(), 2u);
  EXPECT_EQ(split->train.size(), 8u);
  split = SplitHeldout({{1, 2}}, 0.5, 3);
  ASSERT_TRUE(split.ok());
  EXPECT_EQ(split->train.size(), 1u);  // never empty
  EXPECT_FALSE(SplitHeldout(sequences, 1.0, 3).ok());
  EXPECT_FALSE(SplitHeldout(sequences, -0.1, 3).ok());

  EXPECT_EQ(ChunkSequences({{1, 2, 3, 4, 5, 6, 7}}, 3),
            (std::vector<TokenSequence>{{1, 2, 3}, {4, 5, 6}}));
  EXPECT_EQ(ChunkSequences({{1, 2, 3, 4, 5}}, 0), (std::vector<TokenSequence>{{1, 2, 3, 4, 5}}));

  const SyntheticDomain domain{.name = "d", .first_token = 10, .num_tokens = 5, .rule_seed = 4};
  const std::vector<TokenSequence> a = DomainSequences(domain, 3, 11, 1);
  ASSERT_EQ(a.size(), 3u);
  for (const TokenSequence& s : a) {
    ASSERT_EQ(s.size(), 11u);
    for (size_t t = 0; t < s.size(); ++t) {
      EXPECT_GE(s[t], 10);
      EXPECT_LT(s[t], 15);
      if (t > 0) {
        EXPECT_EQ(s[t], DomainNextToken(domain, s[t - 1]));
      }
    }
    EXPECT_EQ(s[0], s[5]);  // one cycle through all 5 tokens
  }
  EXPECT_EQ(a, DomainSequences(domain, 3, 11, 1));  // deterministic
}

// ---- the built-in demo -----------------------------------------------------------------------

TEST_F(TrainerTest, DemoAssetsAreTrainedAndRouteByDomain) {
  ScopedTempDir demo("demo");
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(WriteDemoAssets(demo.path()).ok());
  std::cerr << "WriteDemoAssets: " << Seconds(start) << " s\n";

  auto model = Model::Load(demo.Join("model"));
  ASSERT_TRUE(model.ok());
  auto pool = ExpertPool::Create(**model, {.capacity = 5, .max_rank = 8});
  ASSERT_TRUE(pool.ok());
  Mixture mixture(**model, **pool);
  const std::vector<std::string> names = DemoExpertNames();
  for (const std::string& name : names) {
    ASSERT_TRUE(mixture.AttachExpert(name, demo.Join("experts/" + name)).ok()) << name;
  }
  ASSERT_TRUE(mixture.AttachExpert("extra", demo.Join("experts/extra")).ok());
  ASSERT_TRUE(mixture.AttachRouter(demo.Join("routers/demo-router"), false).ok());

  const std::vector<SyntheticDomain> domains = DemoDomains();
  ASSERT_EQ(domains.size(), names.size());
  for (size_t d = 0; d < domains.size(); ++d) {
    EXPECT_EQ(domains[d].name, names[d]);
    // Held-out prompts of the domain (other seeds than the training data).
    const std::vector<TokenSequence> prompts = DomainSequences(domains[d], 6, 6, 4000 + d);
    auto cache = (*model)->CreateKvCache(static_cast<int64_t>(prompts.size()), 8);
    ASSERT_TRUE(cache.ok());
    std::vector<MixtureSequence> batch;
    for (size_t i = 0; i < prompts.size(); ++i) {
      batch.push_back({{static_cast<int64_t>(i), prompts[i]}, {}, nullptr});
    }
    auto out = mixture.Forward(batch, *cache);
    ASSERT_TRUE(out.ok()) << out.status();
    const at::Tensor mean = out->routing.weights.mean(0);
    const int64_t top = mean.argmax().item<int64_t>();
    std::cerr << domains[d].name << " prompts: mean routing weight of '" << names[d]
              << "' = " << mean[d].item<double>() << "\n";
    EXPECT_EQ(out->routing.experts[top], names[d]);
    EXPECT_GT(mean[d].item<double>(), 0.6) << names[d];
  }
}

}  // namespace
}  // namespace moelora
