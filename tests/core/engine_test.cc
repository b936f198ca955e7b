#include "core/engine.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "core/generation.h"
#include "core/random_model.h"
#include "tests/testing/temp_dir.h"

namespace moelora {
namespace {

using ::testing::HasSubstr;

std::string Message(const absl::Status& status) { return std::string(status.message()); }

// Collects one request's events; Wait() blocks until the final one. The sink shares the state,
// so the engine may still be inside it when the test drops the collector.
class Collector {
 public:
  GenerateSink Sink() {
    return [state = state_](GenerateEvent event) {
      absl::MutexLock lock(&state->mu);
      for (int64_t token : event.tokens) state->tokens.push_back(token);
      for (auto& row : event.routing) state->routing.push_back(row);
      if (!event.routing_experts.empty()) state->routing_experts = event.routing_experts;
      if (event.finished) {
        state->final_event = event;
        state->done = true;
      }
    };
  }
  GenerateEvent Wait() {
    absl::MutexLock lock(&state_->mu);
    state_->mu.Await(absl::Condition(&state_->done));
    return state_->final_event;
  }
  bool WaitFor(absl::Duration timeout) {
    absl::MutexLock lock(&state_->mu);
    return state_->mu.AwaitWithTimeout(absl::Condition(&state_->done), timeout);
  }
  std::vector<int64_t> tokens() {
    absl::MutexLock lock(&state_->mu);
    return state_->tokens;
  }
  std::vector<std::vector<float>> routing() {
    absl::MutexLock lock(&state_->mu);
    return state_->routing;
  }
  std::vector<std::string> routing_experts() {
    absl::MutexLock lock(&state_->mu);
    return state_->routing_experts;
  }

 private:
  struct State {
    absl::Mutex mu;
    std::vector<int64_t> tokens;
    std::vector<std::vector<float>> routing;
    std::vector<std::string> routing_experts;
    GenerateEvent final_event;
    bool done = false;
  };
  std::shared_ptr<State> state_ = std::make_shared<State>();
};

class EngineTest : public testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(
        WriteRandomModel(temp_.Join("base"), TinyModelConfig(ModelType::kLlama), {.seed = 3}).ok());
    auto model = Model::Load(temp_.Join("base"));
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    auto pool = ExpertPool::Create(*model_, {.capacity = 6, .max_rank = 8});
    ASSERT_TRUE(pool.ok());
    pool_ = std::move(*pool);
    mixture_ = std::make_unique<Mixture>(*model_, *pool_);
    for (int i = 0; i < 3; ++i) {
      RandomAdapterOptions spec;
      spec.r = 4;
      spec.target_modules = {"q_proj", "v_proj", "gate_proj", "down_proj"};
      spec.seed = 70 + i;
      spec.std = 0.3;
      ASSERT_TRUE(WriteRandomAdapter(temp_.Join(names_[i]), model_->config(), spec).ok());
      ASSERT_TRUE(mixture_->AttachExpert(names_[i], temp_.Join(names_[i])).ok());
    }
    RouterConfig config;
    config.name = "router";
    config.experts = names_;
    at::manual_seed(5);
    auto router =
        Router::Create(config, at::randn({3, model_->config().hidden_size}), at::randn({3}) * 0.1);
    ASSERT_TRUE(router.ok());
    ASSERT_TRUE(mixture_->AttachRouter(*router, false).ok());
  }

  void StartEngine(EngineOptions options = {.max_running_requests = 4, .max_seq_len = 64}) {
    auto engine = Engine::Create(*model_, *mixture_, options);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = std::move(*engine);
  }

  GenerateRequest Request(std::vector<int64_t> prompt, int64_t max_new_tokens,
                          RoutingControls routing = {}) {
    GenerateRequest request;
    request.prompt = std::move(prompt);
    request.sampling.max_new_tokens = max_new_tokens;
    request.routing = std::move(routing);
    return request;
  }

  std::vector<int64_t> Direct(const std::vector<int64_t>& prompt, int64_t n,
                              const RoutingControls& routing = {}) {
    auto out = GreedyGenerate(*mixture_, {prompt}, n, routing);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? out->tokens[0] : std::vector<int64_t>{};
  }

  void WaitUntilRunning(int64_t count) {
    for (int i = 0; i < 2000 && engine_->stats().running < count; ++i) {
      absl::SleepFor(absl::Milliseconds(1));
    }
    ASSERT_GE(engine_->stats().running, count);
  }

  const std::vector<std::string> names_ = {"math", "code", "chat"};
  testing_support::ScopedTempDir temp_{"engine_test"};
  std::unique_ptr<Model> model_;
  std::unique_ptr<ExpertPool> pool_;
  std::unique_ptr<Mixture> mixture_;
  std::unique_ptr<Engine> engine_;
};

TEST_F(EngineTest, ConcurrentRequestsEqualSingleRequestGreedyGeneration) {
  StartEngine();
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 29, 2}, {9}, {100, 3, 7}, {42, 42}};
  const std::vector<RoutingControls> controls = {
      {}, {.pinned_expert = "code"}, {.explicit_weights = {{"math", 0.5}, {"chat", 0.25}}}, {}};
  std::vector<std::unique_ptr<Collector>> collectors;
  for (size_t i = 0; i < prompts.size(); ++i) {
    collectors.push_back(std::make_unique<Collector>());
    GenerateRequest request = Request(prompts[i], 6 + static_cast<int64_t>(i), controls[i]);
    request.return_routing = true;
    ASSERT_TRUE(engine_->Submit(request, collectors.back()->Sink()).ok());
  }
  for (size_t i = 0; i < prompts.size(); ++i) {
    const GenerateEvent last = collectors[i]->Wait();
    ASSERT_TRUE(last.status.ok()) << last.status;
    EXPECT_EQ(last.finish_reason, FinishReason::kLength);
    EXPECT_EQ(last.usage.prompt_tokens, static_cast<int64_t>(prompts[i].size()));
    EXPECT_EQ(last.usage.generated_tokens, 6 + static_cast<int64_t>(i));
    EXPECT_EQ(collectors[i]->tokens(), Direct(prompts[i], 6 + i, controls[i])) << "prompt " << i;
    EXPECT_EQ(collectors[i]->routing_experts(), names_);
    EXPECT_EQ(collectors[i]->routing().size(), 6 + i);
  }
  // The pinned request's weights are exactly one-hot on its expert.
  for (const auto& row : collectors[1]->routing()) EXPECT_EQ(row, (std::vector<float>{0, 1, 0}));
  // Routed rows sum to 1.
  for (const auto& row : collectors[0]->routing()) {
    EXPECT_NEAR(row[0] + row[1] + row[2], 1.0, 1e-5);
  }
  const EngineStats stats = engine_->stats();
  EXPECT_EQ(stats.running, 0);
  EXPECT_EQ(stats.kv_slots_used, 0);
  EXPECT_EQ(stats.kv_tokens_used, 0);
}

TEST_F(EngineTest, SeededSamplingIsReproducibleWhateverTheBatch) {
  StartEngine();
  GenerateRequest request = Request({5, 6, 7}, 10);
  request.sampling.temperature = 0.9;
  request.sampling.top_p = 0.95;
  request.sampling.seed = 1234;
  Collector alone;
  ASSERT_TRUE(engine_->Submit(request, alone.Sink()).ok());
  ASSERT_TRUE(alone.Wait().status.ok());
  // Same request again, now batched with others.
  Collector again, other1, other2;
  ASSERT_TRUE(engine_->Submit(Request({1, 2, 3, 4, 5}, 12), other1.Sink()).ok());
  ASSERT_TRUE(engine_->Submit(request, again.Sink()).ok());
  ASSERT_TRUE(engine_->Submit(Request({8}, 3), other2.Sink()).ok());
  ASSERT_TRUE(again.Wait().status.ok());
  EXPECT_EQ(again.tokens(), alone.tokens());
  other1.Wait();
  other2.Wait();
}

TEST_F(EngineTest, StopTokenEndsWithStopReason) {
  StartEngine();
  const std::vector<int64_t> expected = Direct({5, 17}, 6);
  GenerateRequest request = Request({5, 17}, 6);
  request.sampling.stop_token_ids = {expected[2]};
  Collector collector;
  ASSERT_TRUE(engine_->Submit(request, collector.Sink()).ok());
  const GenerateEvent last = collector.Wait();
  ASSERT_TRUE(last.status.ok());
  EXPECT_EQ(last.finish_reason, FinishReason::kStop);
  // Up to and including the first occurrence of the stop token.
  const auto stop = std::find(expected.begin(), expected.end(), expected[2]);
  EXPECT_EQ(collector.tokens(), std::vector<int64_t>(expected.begin(), stop + 1));
}

TEST_F(EngineTest, BadRequestsAreRefusedWithClearMessages) {
  StartEngine({.max_running_requests = 2, .max_seq_len = 32, .max_batch_tokens = 16});
  const int64_t vocab = model_->config().vocab_size;
  const struct {
    GenerateRequest request;
    absl::StatusCode code;
    const char* message;
  } cases[] = {
      {Request({}, 4), absl::StatusCode::kInvalidArgument, "prompt is empty"},
      {Request({1, vocab}, 4), absl::StatusCode::kInvalidArgument, "outside the vocabulary"},
      {Request({1, -1}, 4), absl::StatusCode::kInvalidArgument, "outside the vocabulary"},
      {Request({1, 2}, 31), absl::StatusCode::kInvalidArgument, "max_seq_len 32"},
      {Request(std::vector<int64_t>(17, 1), 4), absl::StatusCode::kInvalidArgument,
       "max_batch_tokens 16"},
      {Request({1}, 0), absl::StatusCode::kInvalidArgument, "max_new_tokens"},
      {Request({1}, 4, {.explicit_weights = {{"math", std::nan("")}}}),
       absl::StatusCode::kInvalidArgument, "finite"},
      {Request({1}, 4, {.explicit_weights = {{"math", -0.5}}}), absl::StatusCode::kInvalidArgument,
       ">= 0"},
      {Request({1}, 4, {.pinned_expert = "poetry"}), absl::StatusCode::kNotFound, "'poetry'"},
      {Request({1}, 4, {.router = "nope"}), absl::StatusCode::kNotFound, "'nope'"},
      {Request({1}, 4, {.top_k = 5}), absl::StatusCode::kInvalidArgument, "top_k"},
  };
  for (const auto& c : cases) {
    Collector collector;
    auto handle = engine_->Submit(c.request, collector.Sink());
    ASSERT_FALSE(handle.ok()) << c.message;
    EXPECT_EQ(handle.status().code(), c.code) << handle.status();
    EXPECT_THAT(Message(handle.status()), HasSubstr(c.message));
  }
  GenerateRequest nan_temperature = Request({1}, 4);
  nan_temperature.sampling.temperature = std::nan("");
  EXPECT_EQ(engine_->Submit(nan_temperature, [](GenerateEvent) {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Still serving.
  Collector ok;
  ASSERT_TRUE(engine_->Submit(Request({1, 2}, 3), ok.Sink()).ok());
  EXPECT_TRUE(ok.Wait().status.ok());
}

TEST_F(EngineTest, FullQueueRefusesExactlyTheOverflow) {
  StartEngine({.max_running_requests = 1, .max_seq_len = 64, .max_queued_requests = 3});
  Collector blocker;
  auto blocking = engine_->Submit(Request({1, 2}, 60), blocker.Sink());
  ASSERT_TRUE(blocking.ok());
  WaitUntilRunning(1);
  std::vector<std::unique_ptr<Collector>> waiting;
  std::vector<std::shared_ptr<RequestHandle>> handles;
  int refused = 0;
  for (int i = 0; i < 5; ++i) {
    auto collector = std::make_unique<Collector>();
    auto handle = engine_->Submit(Request({3}, 2), collector->Sink());
    if (handle.ok()) {
      handles.push_back(*handle);
      waiting.push_back(std::move(collector));
    } else {
      EXPECT_EQ(handle.status().code(), absl::StatusCode::kResourceExhausted);
      EXPECT_THAT(Message(handle.status()), HasSubstr("queue is full"));
      ++refused;
    }
  }
  EXPECT_EQ(refused, 2);
  EXPECT_EQ(handles.size(), 3u);
  (*blocking)->Cancel();
  EXPECT_EQ(blocker.Wait().status.code(), absl::StatusCode::kCancelled);
  for (auto& collector : waiting) {
    ASSERT_TRUE(collector->WaitFor(absl::Seconds(10)));
    EXPECT_TRUE(collector->Wait().status.ok());
  }
}

TEST_F(EngineTest, CancelAndDeadlineFreeTheKvBudget) {
  StartEngine();
  const EngineStats before = engine_->stats();
  Collector cancelled;
  auto handle = engine_->Submit(Request({1, 2, 3}, 60), cancelled.Sink());
  ASSERT_TRUE(handle.ok());
  WaitUntilRunning(1);
  (*handle)->Cancel();
  const GenerateEvent last = cancelled.Wait();
  EXPECT_EQ(last.status.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(last.usage.generated_tokens, 60);

  // A deadline that passes mid-generation (the sink slows each step down).
  GenerateRequest slow = Request({4, 5}, 60);
  slow.deadline = absl::Now() + absl::Milliseconds(100);
  Collector expired;
  GenerateSink sink = expired.Sink();
  ASSERT_TRUE(engine_
                  ->Submit(slow,
                           [sink](GenerateEvent event) {
                             absl::SleepFor(absl::Milliseconds(10));
                             sink(std::move(event));
                           })
                  .ok());
  const GenerateEvent expired_last = expired.Wait();
  EXPECT_EQ(expired_last.status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_GT(expired_last.usage.generated_tokens, 0);
  EXPECT_LT(expired_last.usage.generated_tokens, 60);

  // Already expired while queued.
  GenerateRequest late = Request({4}, 4);
  late.deadline = absl::Now() - absl::Seconds(1);
  Collector queued;
  ASSERT_TRUE(engine_->Submit(late, queued.Sink()).ok());
  EXPECT_EQ(queued.Wait().status.code(), absl::StatusCode::kDeadlineExceeded);

  const EngineStats after = engine_->stats();
  EXPECT_EQ(after.kv_slots_used, before.kv_slots_used);
  EXPECT_EQ(after.kv_tokens_used, 0);
  EXPECT_EQ(after.kv_tokens_reserved, 0);
}

TEST_F(EngineTest, InFlightRequestKeepsItsExpertsThroughDetachAndAttach) {
  StartEngine();
  const std::vector<int64_t> expected = Direct({7, 8, 9}, 20, {.pinned_expert = "math"});
  const std::vector<int64_t> routed_expected = Direct({3, 1}, 20);
  Collector pinned, routed;
  GenerateSink slow_sink = pinned.Sink();
  ASSERT_TRUE(engine_
                  ->Submit(Request({7, 8, 9}, 20, {.pinned_expert = "math"}),
                           [slow_sink](GenerateEvent event) {
                             absl::SleepFor(absl::Milliseconds(2));
                             slow_sink(std::move(event));
                           })
                  .ok());
  ASSERT_TRUE(engine_->Submit(Request({3, 1}, 20), routed.Sink()).ok());
  WaitUntilRunning(1);
  // Swap everything underneath the running requests.
  ASSERT_TRUE(engine_->DetachRouter("router").ok());
  ASSERT_TRUE(engine_->DetachExpert("math", false).ok());
  ASSERT_TRUE(engine_->AttachExpert("math2", temp_.Join("chat")).ok());
  // New requests see the new state.
  auto gone = engine_->Submit(Request({1}, 2, {.pinned_expert = "math"}), [](GenerateEvent) {});
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound);
  Collector fresh;
  ASSERT_TRUE(engine_->Submit(Request({1, 2}, 5, {.pinned_expert = "math2"}), fresh.Sink()).ok());

  ASSERT_TRUE(pinned.Wait().status.ok());
  ASSERT_TRUE(routed.Wait().status.ok());
  EXPECT_EQ(pinned.tokens(), expected);
  EXPECT_EQ(routed.tokens(), routed_expected);
  ASSERT_TRUE(fresh.Wait().status.ok());
  EXPECT_EQ(fresh.tokens(), Direct({1, 2}, 5, {.pinned_expert = "math2"}));
}

TEST_F(EngineTest, ScoreMatchesTheForwardsLogSoftmax) {
  StartEngine();
  const std::vector<int64_t> tokens = {5, 17, 29, 2, 11};
  auto promise = std::make_shared<std::promise<absl::StatusOr<ScoreResult>>>();
  std::future<absl::StatusOr<ScoreResult>> future = promise->get_future();
  ScoreRequest request;
  request.tokens = tokens;
  request.top_n = 3;
  request.routing.pinned_expert = "code";
  request.return_routing = true;
  ASSERT_TRUE(engine_
                  ->SubmitScore(request,
                                [promise](absl::StatusOr<ScoreResult> r) {
                                  promise->set_value(std::move(r));
                                })
                  .ok());
  const absl::StatusOr<ScoreResult> result = future.get();
  ASSERT_TRUE(result.ok()) << result.status();
  std::vector<MixtureSequence> batch = {{{0, tokens}, {.pinned_expert = "code"}}};
  auto cache = model_->CreateKvCache(1, 16);
  auto direct = mixture_->Forward(batch, *cache, {.all_logits = true});
  ASSERT_TRUE(direct.ok());
  const at::Tensor logprobs = at::log_softmax(direct->forward.logits, 1);
  ASSERT_EQ(result->tokens.size(), tokens.size() - 1);
  double total = 0;
  for (size_t i = 1; i < tokens.size(); ++i) {
    const ScoredToken& scored = result->tokens[i - 1];
    EXPECT_EQ(scored.token, tokens[i]);
    EXPECT_NEAR(scored.logprob, logprobs[i - 1][tokens[i]].item<double>(), 1e-5);
    ASSERT_EQ(scored.top.size(), 3u);
    EXPECT_EQ(scored.top[0].first, logprobs[i - 1].argmax().item<int64_t>());
    EXPECT_GE(scored.top[0].second, scored.top[1].second);
    total += scored.logprob;
  }
  EXPECT_NEAR(result->total_logprob, total, 1e-6);
  EXPECT_EQ(result->routing_experts, names_);
  ASSERT_EQ(result->routing.size(), tokens.size());
  EXPECT_EQ(result->routing[0], (std::vector<float>{0, 1, 0}));

  ScoreRequest short_request;
  short_request.tokens = {1};
  EXPECT_EQ(engine_->SubmitScore(short_request, [](absl::StatusOr<ScoreResult>) {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineTest, ScoresAndGenerationsShareOneSlot) {
  StartEngine({.max_running_requests = 1, .max_seq_len = 64});
  std::vector<std::future<absl::StatusOr<ScoreResult>>> scores;
  std::vector<std::unique_ptr<Collector>> generations;
  for (int i = 0; i < 4; ++i) {
    auto promise = std::make_shared<std::promise<absl::StatusOr<ScoreResult>>>();
    scores.push_back(promise->get_future());
    ScoreRequest score;
    score.tokens = {1, 2, 3, static_cast<int64_t>(i)};
    ASSERT_TRUE(engine_
                    ->SubmitScore(score,
                                  [promise](absl::StatusOr<ScoreResult> r) {
                                    promise->set_value(std::move(r));
                                  })
                    .ok());
    generations.push_back(std::make_unique<Collector>());
    ASSERT_TRUE(engine_->Submit(Request({4, 5}, 3), generations.back()->Sink()).ok());
  }
  for (auto& score : scores) EXPECT_TRUE(score.get().ok());
  for (auto& generation : generations) EXPECT_TRUE(generation->Wait().status.ok());
  EXPECT_EQ(engine_->stats().kv_slots_used, 0);
}

TEST_F(EngineTest, AdminListsExpertsWithServedCounts) {
  StartEngine();
  Collector collector;
  ASSERT_TRUE(
      engine_->Submit(Request({1, 2}, 2, {.pinned_expert = "code"}), collector.Sink()).ok());
  ASSERT_TRUE(collector.Wait().status.ok());
  const std::vector<ExpertStatus> experts = engine_->ListExperts();
  ASSERT_EQ(experts.size(), 3u);
  for (const ExpertStatus& expert : experts) {
    EXPECT_EQ(expert.requests_served, expert.info.name == "code" ? 1 : 0) << expert.info.name;
    EXPECT_EQ(expert.target_modules,
              (std::vector<std::string>{"q_proj", "v_proj", "gate_proj", "down_proj"}));
    EXPECT_GT(expert.info.device_bytes, 0);
  }
  auto attached = engine_->AttachExpert("extra", temp_.Join("math"));
  ASSERT_TRUE(attached.ok()) << attached.status();
  EXPECT_EQ(attached->info.name, "extra");
  EXPECT_LE(attached->attach_time, absl::Now());
  EXPECT_EQ(engine_->AttachExpert("bad", temp_.Join("nowhere")).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(engine_->DetachExpert("math", false).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(engine_->ListRouters().size(), 1u);
}

TEST_F(EngineTest, DrainFinishesInFlightWorkAndRefusesNewRequests) {
  StartEngine();
  std::vector<std::unique_ptr<Collector>> collectors;
  for (int i = 0; i < 6; ++i) {
    collectors.push_back(std::make_unique<Collector>());
    ASSERT_TRUE(
        engine_->Submit(Request({1, 2, static_cast<int64_t>(i)}, 10), collectors.back()->Sink())
            .ok());
  }
  EXPECT_TRUE(engine_->Drain(absl::Seconds(30)));
  for (auto& collector : collectors) {
    ASSERT_TRUE(collector->WaitFor(absl::Seconds(1)));
    EXPECT_TRUE(collector->Wait().status.ok());
    EXPECT_EQ(collector->tokens().size(), 10u);
  }
  EXPECT_EQ(engine_->Submit(Request({1}, 2), [](GenerateEvent) {}).status().code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(EngineTest, DrainTimeoutEndsLeftoversWithUnavailable) {
  StartEngine({.max_running_requests = 1, .max_seq_len = 64});
  Collector slow;
  GenerateSink sink = slow.Sink();
  ASSERT_TRUE(engine_
                  ->Submit(Request({1, 2}, 60),
                           [sink](GenerateEvent event) {
                             absl::SleepFor(absl::Milliseconds(5));
                             sink(std::move(event));
                           })
                  .ok());
  Collector queued;
  ASSERT_TRUE(engine_->Submit(Request({3}, 4), queued.Sink()).ok());
  EXPECT_FALSE(engine_->Drain(absl::Milliseconds(30)));
  EXPECT_EQ(slow.Wait().status.code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(queued.Wait().status.code(), absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace moelora
