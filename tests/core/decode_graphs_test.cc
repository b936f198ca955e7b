#include "core/decode_graphs.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/mixture.h"
#include "core/random_model.h"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

// On the CPU, DecodeGraphs runs its fixed-shape step eagerly (eager_fallback): these tests check
// that step's math (context buckets, masks past each sequence's length, the mixture's static
// weights) against the ordinary forward. scripts/gpu-check.sh runs the same tests with real
// graphs on the GPU machine. Each family runs with gate and up's B in their column room and
// with their A in row room (a 16-slot pool's default, the sparse path's layout).
class DecodeGraphsTest : public testing::TestWithParam<std::tuple<ModelType, RoomLayout>> {
 protected:
  void SetUp() override {
    const std::string base = temp_.Join("base");
    ASSERT_TRUE(WriteRandomModel(base, TinyModelConfig(std::get<0>(GetParam())), {.seed = 3}).ok());
    const LoadOptions options = {
        .device = at::hasCUDA() ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU),
        .adapter_room = {.slots = 16, .rank = 8, .wide_layout = std::get<1>(GetParam())}};
    auto model = Model::Load(base, options);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto pool = ExpertPool::Create(*model_, {.capacity = 16, .max_rank = 8});
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
    mixture_ = std::make_unique<Mixture>(*model_, *pool_);
    for (int i = 0; i < 2; ++i) AttachExpert(i);
  }

  // Expert i: rank 4 or 6 (the pool's max_rank is 8) over all seven projections.
  void AttachExpert(int i) {
    RandomAdapterOptions spec;
    spec.r = 4 + 2 * (i % 2);
    spec.target_modules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                           "gate_proj", "up_proj", "down_proj"};
    spec.seed = 20 + i;
    spec.std = 0.2;
    const std::string dir = temp_.Join(absl::StrCat("expert", i));
    ASSERT_TRUE(WriteRandomAdapter(dir, model_->config(), spec).ok());
    ASSERT_TRUE(mixture_->AttachExpert(absl::StrCat("expert", i), dir).ok());
  }

  // Prompts of different lengths in slots 0..n-1.
  std::vector<SequenceInput> Prompts(int64_t n) const {
    std::vector<SequenceInput> prompts;
    for (int64_t b = 0; b < n; ++b) {
      std::vector<int64_t> tokens;
      for (int64_t t = 0; t < 2 + 3 * b; ++t) tokens.push_back((b * 13 + t * 7) % 50 + 1);
      prompts.push_back({b, std::move(tokens)});
    }
    return prompts;
  }

  // Decodes `steps` tokens greedily for every prompt twice: eagerly and through DecodeGraphs.
  // Logits must agree at every step. `top_one`: each token on one expert of four (the sparse
  // path over 16 experts, MixtureDelta::UsesSparsePath), else softmax weights over all experts.
  void ExpectSameAsEager(bool mixture, int64_t batch, int64_t steps, bool top_one = false) {
    c10::NoGradGuard no_grad;
    auto eager_cache = model_->CreateKvCache(batch + 1, 40);
    auto graph_cache = model_->CreateKvCache(batch + 1, 40);
    ASSERT_TRUE(eager_cache.ok() && graph_cache.ok());
    DecodeGraphs graphs(*model_, *graph_cache, {.min_context_bucket = 4, .eager_fallback = true});
    const auto snapshot = mixture ? pool_->snapshot() : nullptr;
    const std::vector<SequenceInput> prompts = Prompts(batch);
    at::Tensor weights;
    if (mixture && top_one) {
      weights = at::zeros({batch, snapshot->size()});
      for (int64_t b = 0; b < batch; ++b) weights[b][(5 * b + 1) % snapshot->size()] = 0.75;
    } else if (mixture) {
      weights = at::softmax(at::randn({batch, snapshot->size()}), 1);
    }
    auto forward = [&](const std::vector<SequenceInput>& step, KvCache& cache,
                       DecodeGraphs* decode_graphs) -> absl::StatusOr<ForwardOutput> {
      if (!mixture) {
        if (decode_graphs != nullptr) return decode_graphs->Run(step, cache, nullptr, nullptr, {});
        return model_->Forward(step, cache);
      }
      int64_t tokens = 0;
      for (const auto& seq : step) tokens += static_cast<int64_t>(seq.tokens.size());
      at::Tensor rows = tokens == batch ? weights : weights.narrow(0, 0, 1).expand({tokens, -1});
      return mixture_->ForwardWithWeights(step, cache, snapshot, rows.contiguous(),
                                          {.decode_graphs = decode_graphs});
    };
    for (const SequenceInput& prompt : prompts) {
      ASSERT_TRUE(forward({prompt}, *eager_cache, nullptr).ok());
      ASSERT_TRUE(forward({prompt}, *graph_cache, nullptr).ok());
    }
    std::vector<SequenceInput> step;
    for (int64_t b = 0; b < batch; ++b) step.push_back({b, {(b * 5) % 50 + 1}});
    for (int64_t s = 0; s < steps; ++s) {
      auto eager = forward(step, *eager_cache, nullptr);
      auto graphed = forward(step, *graph_cache, &graphs);
      ASSERT_TRUE(eager.ok()) << eager.status();
      ASSERT_TRUE(graphed.ok()) << graphed.status();
      ASSERT_EQ(graphed->logits.sizes(), eager->logits.sizes());
      EXPECT_TRUE(at::allclose(graphed->logits.cpu(), eager->logits.cpu(), 1e-4, 1e-5))
          << "step " << s << " max diff "
          << (graphed->logits.cpu() - eager->logits.cpu()).abs().max().item<float>();
      EXPECT_EQ(graphed->token_offsets.size(), static_cast<size_t>(batch + 1));
      for (int64_t b = 0; b < batch; ++b) {
        EXPECT_EQ(graph_cache->length(b), eager_cache->length(b));
        step[b].tokens = {eager->logits[b].argmax().item<int64_t>()};
      }
    }
    const DecodeGraphStats stats = graphs.stats();
    EXPECT_EQ(stats.eager_steps + stats.replays, steps);
    // Contexts from 3..11 tokens up to 3b + steps: several buckets (4, 8, 16, 32).
    EXPECT_GE(stats.graphs, 2);
  }

  testing_support::ScopedTempDir temp_{"decode_graphs_test"};
  std::unique_ptr<Model> model_;
  std::unique_ptr<ExpertPool> pool_;
  std::unique_ptr<Mixture> mixture_;
};

TEST_P(DecodeGraphsTest, BaseStepsMatchEagerForward) { ExpectSameAsEager(false, 3, 12); }

TEST_P(DecodeGraphsTest, MixtureStepsMatchEagerForward) { ExpectSameAsEager(true, 3, 12); }

TEST_P(DecodeGraphsTest, SingleSequenceMatchesEagerForward) { ExpectSameAsEager(true, 1, 6); }

TEST_P(DecodeGraphsTest, TopOneRoutingStepsMatchEagerForward) {
  for (int i = 2; i < 16; ++i) AttachExpert(i);
  ExpectSameAsEager(true, 3, 12, /*top_one=*/true);
}

// The room layout (q/k/v grouped, A and B inside the projections' buffers, the block-diagonal
// expand) gives what a pool keeping its own buffers gives, on this device: on the GPU machine
// this checks the strided writes at attach and the in-place expands on CUDA.
TEST_P(DecodeGraphsTest, RoomLayoutMatchesPoolBuffers) {
  c10::NoGradGuard no_grad;
  auto plain_model = Model::Load(temp_.Join("base"), {.device = model_->options().device});
  ASSERT_TRUE(plain_model.ok()) << plain_model.status();
  auto plain_pool = ExpertPool::Create(**plain_model, {.capacity = 4, .max_rank = 8});
  ASSERT_TRUE(plain_pool.ok()) << plain_pool.status();
  for (int i = 0; i < 2; ++i) {
    const std::string name = absl::StrCat("expert", i);
    ASSERT_TRUE((*plain_pool)->Attach(name, temp_.Join(name)).ok());
  }
  Mixture plain(**plain_model, **plain_pool);
  const std::vector<SequenceInput> prompts = Prompts(3);
  int64_t tokens = 0;
  for (const SequenceInput& prompt : prompts) tokens += static_cast<int64_t>(prompt.tokens.size());
  const at::Tensor weights = at::softmax(at::randn({tokens, 2}), 1);
  auto logits = [&](const Mixture& mixture) {
    auto cache = mixture.model().CreateKvCache(3, 16);
    EXPECT_TRUE(cache.ok());
    auto out = mixture.ForwardWithWeights(prompts, *cache, mixture.pool().snapshot(), weights,
                                          {.all_logits = true});
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? out->logits.cpu() : at::Tensor();
  };
  const at::Tensor roomy = logits(*mixture_), own = logits(plain);
  ASSERT_TRUE(roomy.defined() && own.defined());
  EXPECT_TRUE(at::allclose(roomy, own, 1e-4, 1e-4))
      << "max diff " << (roomy - own).abs().max().item<float>();
}

INSTANTIATE_TEST_SUITE_P(Families, DecodeGraphsTest,
                         testing::Combine(testing::Values(ModelType::kLlama, ModelType::kMistral,
                                                          ModelType::kQwen2, ModelType::kGemma),
                                          testing::Values(RoomLayout::kRows, RoomLayout::kColumns)),
                         [](const auto& info) {
                           return absl::StrCat(ModelTypeName(std::get<0>(info.param)),
                                               std::get<1>(info.param) == RoomLayout::kRows
                                                   ? "_WideRows"
                                                   : "_WideColumns");
                         });

class DecodeGraphsAcceptsTest : public DecodeGraphsTest {};

TEST_P(DecodeGraphsAcceptsTest, OnlyDecodeStepsOnItsCacheAndCurrentSnapshot) {
  auto cache = model_->CreateKvCache(4, 16);
  auto other = model_->CreateKvCache(4, 16);
  ASSERT_TRUE(cache.ok() && other.ok());
  DecodeGraphs graphs(*model_, *cache, {.max_batch = 2, .eager_fallback = true});
  const std::vector<SequenceInput> decode = {{0, {1}}, {1, {2}}};
  const auto current = pool_->snapshot();
  EXPECT_TRUE(graphs.Accepts(decode, *cache, pool_.get(), current.get()));
  EXPECT_TRUE(graphs.Accepts(decode, *cache, nullptr, nullptr));
  EXPECT_FALSE(graphs.Accepts({{0, {1, 2}}}, *cache, pool_.get(), current.get()));  // prefill
  EXPECT_FALSE(graphs.Accepts(decode, *other, pool_.get(), current.get()));         // other cache
  EXPECT_FALSE(graphs.Accepts({{0, {1}}, {1, {2}}, {2, {3}}}, *cache, nullptr, nullptr));
  ASSERT_TRUE(mixture_->DetachExpert("expert1", false).ok());
  EXPECT_FALSE(graphs.Accepts(decode, *cache, pool_.get(), current.get()));  // not current now
  // Without the fallback, a CPU model has no graphs at all.
  DecodeGraphs strict(*model_, *cache);
  EXPECT_EQ(strict.Accepts(decode, *cache, nullptr, nullptr), DecodeGraphs::CanCapture(*model_));
}

TEST_P(DecodeGraphsAcceptsTest, NewSnapshotReplacesGraphsWhichPinNoExperts) {
  c10::NoGradGuard no_grad;
  auto cache = model_->CreateKvCache(2, 16);
  ASSERT_TRUE(cache.ok());
  ASSERT_TRUE(model_->Forward({{0, {3, 4}}}, *cache).ok());
  DecodeGraphs graphs(*model_, *cache, {.eager_fallback = true});
  auto snapshot = pool_->snapshot();
  const auto first = graphs.Run({{0, {5}}}, *cache, pool_.get(), snapshot, at::full({1, 2}, 0.5));
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(graphs.stats().graphs, 1);
  const int64_t free_before = pool_->free_slots();
  ASSERT_TRUE(mixture_->DetachExpert("expert1", false).ok());
  snapshot.reset();
  EXPECT_EQ(pool_->free_slots(), free_before + 1);  // the graph does not hold expert1's slot
  const auto second =
      graphs.Run({{0, {6}}}, *cache, pool_.get(), pool_->snapshot(), at::ones({1, 1}));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ(graphs.stats().graphs, 1);  // the old snapshot's graph is gone
  EXPECT_EQ(cache->length(0), 4);
}

TEST_P(DecodeGraphsAcceptsTest, BadWeightsAreInvalidArgument) {
  auto cache = model_->CreateKvCache(2, 16);
  ASSERT_TRUE(cache.ok());
  DecodeGraphs graphs(*model_, *cache, {.eager_fallback = true});
  const auto result =
      graphs.Run({{0, {5}}}, *cache, pool_.get(), pool_->snapshot(), at::ones({1, 3}));
  EXPECT_EQ(result.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->length(0), 0);
}

INSTANTIATE_TEST_SUITE_P(Llama, DecodeGraphsAcceptsTest,
                         testing::Values(std::make_tuple(ModelType::kLlama, RoomLayout::kRows)));

}  // namespace
}  // namespace moelora
