#include "core/engine.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "core/status_macros.h"

namespace moelora {

struct Engine::Pending {
  std::shared_ptr<RequestHandle> handle;
  bool is_score = false;
  GenerateRequest generate;
  GenerateSink sink;
  ScoreRequest score;
  ScoreCallback score_done;
  MixturePin pin;
  absl::Time submitted;

  absl::Time deadline() const { return is_score ? score.deadline : generate.deadline; }
};

struct Engine::Running {
  explicit Running(std::unique_ptr<Pending> p)
      : pending(std::move(p)),
        sampler(pending->generate.sampling),
        expert_names(pending->pin.experts->Names()),
        used(expert_names.size(), false) {}
  std::unique_ptr<Pending> pending;
  int64_t slot = -1;
  Sampler sampler;
  RoutingState routing_state;
  std::vector<int64_t> generated;
  bool prefilled = false;
  bool finished = false;
  bool routing_names_sent = false;
  absl::Time admitted;
  absl::Time first_token = absl::InfinitePast();
  std::vector<std::string> expert_names;  // the pin's experts, the routing rows' columns
  std::vector<bool> used;                 // per column: non-zero weight on some token
};

namespace {

// Names of the projection kinds an expert adapts, in kind order.
std::vector<std::string> TargetModules(const ResidentExpert& expert) {
  std::set<int64_t> kinds;
  for (const auto& [index, scaling] : expert.scaling()) kinds.insert(index % kNumProjectionKinds);
  std::vector<std::string> names;
  for (int64_t kind : kinds) {
    names.emplace_back(ProjectionName(static_cast<ProjectionKind>(kind)));
  }
  return names;
}

std::vector<float> Row(const at::Tensor& weights, int64_t row) {
  const at::Tensor r = weights.select(0, row).contiguous();
  return std::vector<float>(r.data_ptr<float>(), r.data_ptr<float>() + r.numel());
}

}  // namespace

Engine::Engine(const Model& model, Mixture& mixture, const EngineOptions& options)
    : model_(model), mixture_(mixture), options_(options) {}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const Model& model, Mixture& mixture,
                                                       const EngineOptions& options) {
  EngineOptions resolved = options;
  const int64_t model_limit = model.config().max_position_embeddings;
  if (resolved.max_seq_len <= 0) {
    resolved.max_seq_len = model_limit > 0 ? std::min<int64_t>(model_limit, 4096) : 4096;
  }
  if (resolved.max_running_requests <= 0 || resolved.max_batch_tokens <= 0 ||
      resolved.max_queued_requests < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine needs max_running_requests > 0, max_batch_tokens > 0 and max_queued_requests "
        ">= 0, got ",
        resolved.max_running_requests, ", ", resolved.max_batch_tokens, ", ",
        resolved.max_queued_requests));
  }
  if (model_limit > 0 && resolved.max_seq_len > model_limit) {
    return absl::InvalidArgumentError(absl::StrCat("max_seq_len ", resolved.max_seq_len,
                                                   " exceeds the model's max_position_embeddings ",
                                                   model_limit));
  }
  std::unique_ptr<Engine> engine(new Engine(model, mixture, resolved));
  ASSIGN_OR_RETURN(engine->cache_,
                   model.CreateKvCache(resolved.max_running_requests, resolved.max_seq_len));
  if (resolved.cuda_graphs) {
    engine->decode_graphs_ = std::make_unique<DecodeGraphs>(
        model, engine->cache_, DecodeGraphOptions{.max_batch = resolved.max_running_requests});
  }
  for (int64_t slot = resolved.max_running_requests - 1; slot >= 0; --slot) {
    engine->free_slots_.push_back(slot);
  }
  {
    absl::MutexLock lock(&engine->mu_);
    engine->stats_.kv_slots_total = resolved.max_running_requests;
    engine->stats_.kv_tokens_total = resolved.max_running_requests * resolved.max_seq_len;
  }
  {
    absl::MutexLock lock(&engine->experts_mu_);
    for (const ExpertInfo& info : mixture.pool().List()) {
      engine->expert_records_[info.name].attach_time = absl::Now();
    }
  }
  engine->thread_ = std::thread([raw = engine.get()] { raw->Loop(); });
  return engine;
}

Engine::~Engine() {
  {
    absl::MutexLock lock(&mu_);
    accepting_ = false;
    stop_ = true;
  }
  if (thread_.joinable()) thread_.join();
}

int64_t Engine::kv_cache_bytes() const { return cache_.bytes(); }

EngineStats Engine::stats() const {
  absl::MutexLock lock(&mu_);
  EngineStats stats = stats_;
  stats.queued = static_cast<int64_t>(queue_.size());
  return stats;
}

absl::Status Engine::ValidateTokens(const std::vector<int64_t>& tokens) const {
  const int64_t vocab = model_.config().vocab_size;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[i], " at position ", i,
                                                     " is outside the vocabulary [0, ", vocab,
                                                     ")"));
    }
  }
  if (static_cast<int64_t>(tokens.size()) > options_.max_batch_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("prompt of ", tokens.size(),
                                                   " tokens exceeds max_batch_tokens ",
                                                   options_.max_batch_tokens));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<RequestHandle>> Engine::Submit(GenerateRequest request,
                                                              GenerateSink sink) {
  if (request.prompt.empty()) return absl::InvalidArgumentError("the prompt is empty");
  RETURN_IF_ERROR(ValidateTokens(request.prompt));
  RETURN_IF_ERROR(ValidateSamplingParams(request.sampling, model_.config().vocab_size));
  const int64_t needed =
      static_cast<int64_t>(request.prompt.size()) + request.sampling.max_new_tokens;
  if (needed > options_.max_seq_len) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", request.prompt.size(), " tokens) + max_new_tokens (",
                     request.sampling.max_new_tokens, ") exceeds the context limit max_seq_len ",
                     options_.max_seq_len));
  }
  auto pending = std::make_unique<Pending>();
  pending->pin = mixture_.Pin();
  RETURN_IF_ERROR(mixture_.ValidateControls(request.routing, pending->pin));
  pending->generate = std::move(request);
  pending->sink = std::move(sink);
  auto handle = std::make_shared<RequestHandle>();
  pending->handle = handle;
  RETURN_IF_ERROR(Enqueue(std::move(pending)));
  return handle;
}

absl::StatusOr<std::shared_ptr<RequestHandle>> Engine::SubmitScore(ScoreRequest request,
                                                                   ScoreCallback done) {
  if (request.tokens.size() < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("scoring needs at least 2 tokens, got ", request.tokens.size()));
  }
  RETURN_IF_ERROR(ValidateTokens(request.tokens));
  if (static_cast<int64_t>(request.tokens.size()) > options_.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat(
        "scoring ", request.tokens.size(), " tokens exceeds max_seq_len ", options_.max_seq_len));
  }
  if (request.top_n < 0 || request.top_n > model_.config().vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "top_n must be in [0, vocab size ", model_.config().vocab_size, "], got ", request.top_n));
  }
  auto pending = std::make_unique<Pending>();
  pending->is_score = true;
  pending->pin = mixture_.Pin();
  RETURN_IF_ERROR(mixture_.ValidateControls(request.routing, pending->pin));
  pending->score = std::move(request);
  pending->score_done = std::move(done);
  auto handle = std::make_shared<RequestHandle>();
  pending->handle = handle;
  RETURN_IF_ERROR(Enqueue(std::move(pending)));
  return handle;
}

absl::Status Engine::Enqueue(std::unique_ptr<Pending> pending) {
  absl::MutexLock lock(&mu_);
  if (!accepting_) return absl::UnavailableError("the server is shutting down");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queued_requests) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the request queue is full (", options_.max_queued_requests, " waiting); retry later"));
  }
  std::string& id = pending->is_score ? pending->score.id : pending->generate.id;
  if (id.empty()) id = absl::StrCat("req-", next_id_);
  ++next_id_;
  pending->handle->id_ = id;
  pending->submitted = absl::Now();
  queue_.push_back(std::move(pending));
  return absl::OkStatus();
}

// --- admin ---

absl::StatusOr<ExpertStatus> Engine::AttachExpert(const std::string& name, const std::string& dir) {
  ASSIGN_OR_RETURN(ExpertInfo info, mixture_.AttachExpert(name, dir));
  const absl::Time now = absl::Now();
  {
    absl::MutexLock lock(&experts_mu_);
    expert_records_[name] = ExpertRecord{now, 0};
  }
  for (const ExpertStatus& status : ListExperts()) {
    if (status.info.name == name && status.info.slot == info.slot) return status;
  }
  // Detached again before we looked: report what was attached.
  return ExpertStatus{info, {}, now, 0};
}

absl::Status Engine::DetachExpert(const std::string& name, bool force) {
  RETURN_IF_ERROR(mixture_.DetachExpert(name, force));
  absl::MutexLock lock(&experts_mu_);
  expert_records_.erase(name);
  return absl::OkStatus();
}

std::vector<ExpertStatus> Engine::ListExperts() const {
  const auto snapshot = mixture_.pool().snapshot();
  absl::MutexLock lock(&experts_mu_);
  std::vector<ExpertStatus> out;
  for (const auto& expert : snapshot->experts()) {
    ExpertStatus status;
    status.info = expert->info();
    status.target_modules = TargetModules(*expert);
    const auto it = expert_records_.find(status.info.name);
    if (it != expert_records_.end()) {
      status.attach_time = it->second.attach_time;
      status.requests_served = it->second.requests_served;
    }
    out.push_back(std::move(status));
  }
  return out;
}

absl::StatusOr<RouterInfo> Engine::AttachRouter(const std::string& dir, bool force) {
  return mixture_.AttachRouter(dir, force);
}
absl::Status Engine::DetachRouter(const std::string& name) { return mixture_.DetachRouter(name); }
absl::Status Engine::SetDefaultRouter(const std::string& name) {
  return mixture_.SetDefaultRouter(name);
}
std::vector<RouterInfo> Engine::ListRouters() const { return mixture_.ListRouters(); }

void Engine::CountServed(const Running& running) {
  absl::MutexLock lock(&experts_mu_);
  for (size_t i = 0; i < running.used.size(); ++i) {
    if (!running.used[i]) continue;
    const auto it = expert_records_.find(running.expert_names[i]);
    if (it != expert_records_.end()) ++it->second.requests_served;
  }
}

// --- drain ---

bool Engine::Drain(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  accepting_ = false;
  const bool done = mu_.AwaitWithTimeout(absl::Condition(
                                             +[](Engine* e) ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) {
                                               return e->queue_.empty() && e->stats_.running == 0;
                                             },
                                             this),
                                         timeout);
  if (!done) stop_ = true;  // the compute thread ends what is left with Unavailable
  return done;
}

// --- compute thread ---

void Engine::Loop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (running_.empty()) {
        mu_.Await(absl::Condition(
            +[](Engine* e)
                 ABSL_EXCLUSIVE_LOCKS_REQUIRED(e->mu_) { return e->stop_ || !e->queue_.empty(); },
            this));
      }
      if (stop_) break;
    }
    Step();
  }
  // Shutting down: end everything still here.
  std::vector<std::unique_ptr<Pending>> left;
  {
    absl::MutexLock lock(&mu_);
    left.swap(queue_);
  }
  const absl::Status shutdown = absl::UnavailableError("the server shut down before it finished");
  for (auto& running : running_) Finish(*running, shutdown, FinishReason::kNone);
  running_.clear();
  for (auto& pending : left) EndQueued(std::move(pending), shutdown);
  absl::MutexLock lock(&mu_);
  stats_.running = 0;
  stats_.kv_slots_used = 0;
  stats_.kv_tokens_reserved = 0;
  stats_.kv_tokens_used = 0;
}

void Engine::Finish(Running& running, absl::Status status, FinishReason reason,
                    GenerateEvent event) {
  if (running.finished) return;
  running.finished = true;
  event.finished = true;
  event.status = std::move(status);
  event.finish_reason = reason;
  const absl::Time now = absl::Now();
  Usage& usage = event.usage;
  usage.prompt_tokens = static_cast<int64_t>(running.pending->generate.prompt.size());
  usage.generated_tokens = static_cast<int64_t>(running.generated.size());
  const absl::Time submitted = running.pending->submitted;
  usage.queue_time = (running.slot >= 0 ? running.admitted : now) - submitted;
  usage.time_to_first_token = running.first_token == absl::InfinitePast()
                                  ? absl::ZeroDuration()
                                  : running.first_token - submitted;
  usage.total_time = now - submitted;
  if (running.slot >= 0) {
    cache_.Reset(running.slot);
    free_slots_.push_back(running.slot);
    running.slot = -1;
  }
  // Before the sink: whoever sees the last event sees the budget back.
  PublishStats(/*step_done=*/false);
  if (event.status.ok()) CountServed(running);
  if (observer_ != nullptr) observer_->OnRequestFinished(running.pending->generate, event);
  running.pending->sink(std::move(event));
}

void Engine::EndQueued(std::unique_ptr<Pending> pending, const absl::Status& status) {
  if (pending->is_score) {
    pending->score_done(status);
    return;
  }
  Running running(std::move(pending));
  Finish(running, status, FinishReason::kNone);
}

void Engine::RunScore(Pending& pending) {
  ScoreRequest& request = pending.score;
  const int64_t slot = free_slots_.back();
  const int64_t n = static_cast<int64_t>(request.tokens.size());
  std::vector<MixtureSequence> batch(1);
  batch[0].input = {slot, request.tokens};
  batch[0].controls = request.routing;
  batch[0].pin = &pending.pin;
  absl::StatusOr<MixtureOutput> out = mixture_.Forward(batch, cache_, {.all_logits = true});
  cache_.Reset(slot);
  if (!out.ok()) {
    pending.score_done(out.status());
    return;
  }
  ScoreResult result;
  try {
    const at::Tensor logprobs = at::log_softmax(out->forward.logits.to(at::kCPU, at::kFloat), 1);
    at::Tensor top_values, top_ids;
    if (request.top_n > 0) std::tie(top_values, top_ids) = logprobs.topk(request.top_n, 1);
    for (int64_t i = 1; i < n; ++i) {
      ScoredToken scored;
      scored.token = request.tokens[i];
      scored.logprob = logprobs[i - 1][scored.token].item<double>();
      for (int64_t j = 0; j < request.top_n; ++j) {
        scored.top.emplace_back(top_ids[i - 1][j].item<int64_t>(),
                                top_values[i - 1][j].item<double>());
      }
      result.total_logprob += scored.logprob;
      result.tokens.push_back(std::move(scored));
    }
    if (request.return_routing) {
      result.routing_experts = pending.pin.experts->Names();
      const at::Tensor& weights = out->routing.sequence_weights[0];
      for (int64_t i = 0; i < n; ++i) result.routing.push_back(Row(weights, i));
    }
  } catch (const c10::Error& e) {
    pending.score_done(absl::InternalError(absl::StrCat("scoring: ", e.what_without_backtrace())));
    return;
  }
  pending.score_done(std::move(result));
}

void Engine::Step() {
  const absl::Time now = absl::Now();
  // 1. Cancelled or expired: running ones free their slot; waiting ones leave the queue.
  for (auto& running : running_) {
    if (running->pending->handle->cancelled()) {
      Finish(*running, absl::CancelledError("the request was cancelled"), FinishReason::kNone);
    } else if (now >= running->pending->deadline()) {
      Finish(*running, absl::DeadlineExceededError("the request's deadline passed"),
             FinishReason::kNone);
    }
  }
  std::vector<std::unique_ptr<Pending>> dropped, scores;
  std::vector<std::unique_ptr<Running>> admitted;
  {
    absl::MutexLock lock(&mu_);
    std::vector<std::unique_ptr<Pending>> kept;
    for (auto& pending : queue_) {
      if (pending->handle->cancelled() || now >= pending->deadline()) {
        dropped.push_back(std::move(pending));
      } else {
        kept.push_back(std::move(pending));
      }
    }
    queue_.swap(kept);
    // 2. Admit in arrival order while a slot is free and the step's token budget allows.
    int64_t batch_tokens = 0;
    for (const auto& running : running_) {
      if (!running->finished) ++batch_tokens;
    }
    int64_t free = static_cast<int64_t>(free_slots_.size());
    size_t taken = 0;
    for (; taken < queue_.size() && free > 0; ++taken) {
      Pending& next = *queue_[taken];
      if (next.is_score) {
        // A score borrows a free slot for its own forward after this step's batch: keep one
        // back from this step's admissions so it is still free then.
        scores.push_back(std::move(queue_[taken]));
        --free;
        continue;
      }
      const int64_t prompt = static_cast<int64_t>(next.generate.prompt.size());
      const bool first = admitted.empty() && batch_tokens == 0;
      if (!first && batch_tokens + prompt > options_.max_batch_tokens) break;
      batch_tokens += prompt;
      admitted.push_back(std::make_unique<Running>(std::move(queue_[taken])));
      --free;
    }
    queue_.erase(queue_.begin(), queue_.begin() + taken);
    // Counted as running from here, so Drain never finds them in neither place.
    stats_.running = static_cast<int64_t>(running_.size() + admitted.size() + scores.size());
    scores_in_hand_ = static_cast<int64_t>(scores.size());
  }
  for (auto& running : admitted) {
    running->slot = free_slots_.back();
    free_slots_.pop_back();
    running->admitted = now;
    running_.push_back(std::move(running));
  }
  for (auto& pending : dropped) {
    const bool cancelled = pending->handle->cancelled();
    EndQueued(std::move(pending),
              cancelled
                  ? absl::CancelledError("the request was cancelled while queued")
                  : absl::DeadlineExceededError("the request's deadline passed while queued"));
  }
  std::erase_if(running_, [](const auto& running) { return running->finished; });

  // 3. One forward over every running request.
  if (!running_.empty()) {
    std::vector<MixtureSequence> batch(running_.size());
    int64_t tokens = 0;
    for (size_t b = 0; b < running_.size(); ++b) {
      Running& running = *running_[b];
      batch[b].input.slot = running.slot;
      batch[b].input.tokens = running.prefilled ? std::vector<int64_t>{running.generated.back()}
                                                : running.pending->generate.prompt;
      batch[b].controls = running.pending->generate.routing;
      batch[b].state = &running.routing_state;
      batch[b].pin = &running.pending->pin;
      tokens += static_cast<int64_t>(batch[b].input.tokens.size());
    }
    const absl::Time started = absl::Now();
    absl::StatusOr<MixtureOutput> out =
        mixture_.Forward(batch, cache_, {.decode_graphs = decode_graphs_.get()});
    if (out.ok()) {
      if (observer_ != nullptr) {
        observer_->OnStep(static_cast<int64_t>(batch.size()), tokens, absl::Now() - started);
      }
      // 4. Sample and emit.
      absl::Status sampled = absl::OkStatus();
      at::Tensor logits;
      try {
        logits = out->forward.logits.to(at::kCPU, at::kFloat).contiguous();
      } catch (const c10::Error& e) {
        sampled = absl::InternalError(absl::StrCat("reading logits: ", e.what_without_backtrace()));
      }
      for (size_t b = 0; b < running_.size(); ++b) {
        Running& running = *running_[b];
        if (!sampled.ok()) {
          Finish(running, sampled, FinishReason::kNone);
          continue;
        }
        EmitToken(running, logits.select(0, static_cast<int64_t>(b)), *out, b);
      }
    } else if (running_.size() == 1) {
      Finish(*running_.front(), out.status(), FinishReason::kNone);
    } else {
      // Find the request that broke the batch: run each alone (the failed forward left the
      // cache as it was), so one bad request never costs the others their work.
      for (size_t b = 0; b < running_.size(); ++b) {
        std::vector<MixtureSequence> one = {batch[b]};
        absl::StatusOr<MixtureOutput> single = mixture_.Forward(one, cache_);
        Running& running = *running_[b];
        if (!single.ok()) {
          Finish(running, single.status(), FinishReason::kNone);
          continue;
        }
        try {
          const at::Tensor logits = single->forward.logits.to(at::kCPU, at::kFloat).contiguous();
          EmitToken(running, logits.select(0, 0), *single, 0);
        } catch (const c10::Error& e) {
          Finish(running,
                 absl::InternalError(absl::StrCat("reading logits: ", e.what_without_backtrace())),
                 FinishReason::kNone);
        }
      }
    }
    std::erase_if(running_, [](const auto& running) { return running->finished; });
  }

  // Scores, each its own forward with every position's logits.
  for (auto& pending : scores) {
    RunScore(*pending);
    --scores_in_hand_;
  }

  scores_in_hand_ = 0;
  PublishStats(/*step_done=*/true);
}

void Engine::PublishStats(bool step_done) {
  absl::MutexLock lock(&mu_);
  if (step_done) ++stats_.steps;
  if (decode_graphs_ != nullptr) {
    const DecodeGraphStats graphs = decode_graphs_->stats();
    stats_.graph_steps = graphs.replays;
    stats_.graph_captures = graphs.captures;
  }
  stats_.running = scores_in_hand_;
  stats_.kv_slots_used = stats_.kv_slots_total - static_cast<int64_t>(free_slots_.size());
  stats_.kv_tokens_reserved = 0;
  stats_.kv_tokens_used = 0;
  for (const auto& running : running_) {
    if (running->finished) continue;
    ++stats_.running;
    stats_.kv_tokens_reserved += static_cast<int64_t>(running->pending->generate.prompt.size()) +
                                 running->pending->generate.sampling.max_new_tokens;
    stats_.kv_tokens_used += cache_.length(running->slot);
  }
}

void Engine::EmitToken(Running& running, const at::Tensor& logits, const MixtureOutput& out,
                       size_t index) {
  const GenerateRequest& request = running.pending->generate;
  const bool prefill = !running.prefilled;
  running.prefilled = true;
  absl::StatusOr<int64_t> token = running.sampler.Sample(logits);
  if (!token.ok()) {
    Finish(running, token.status(), FinishReason::kNone);
    return;
  }
  running.generated.push_back(*token);
  if (running.first_token == absl::InfinitePast()) running.first_token = absl::Now();

  GenerateEvent event;
  event.tokens = {*token};
  // The sequence's routing rows of this step, read in place (CPU fp32).
  const at::Tensor weights = out.routing.sequence_weights[index].contiguous();
  const int64_t rows = weights.size(0), columns = weights.size(1);
  const absl::Span<const float> routing(weights.data_ptr<float>(), rows * columns);
  for (int64_t i = 0; i < rows * columns; ++i) {
    if (routing[i] > 0) running.used[i % columns] = true;
  }
  if (observer_ != nullptr) {
    observer_->OnRouting(out.routing.routers[index], running.expert_names, routing, rows, prefill,
                         out.routing.routing_seconds[index]);
  }
  if (request.return_routing) {
    if (!running.routing_names_sent) {
      event.routing_experts = running.expert_names;
      running.routing_names_sent = true;
    }
    const absl::Span<const float> last = routing.subspan((rows - 1) * columns, columns);
    event.routing.emplace_back(last.begin(), last.end());
  }
  const int64_t generated = static_cast<int64_t>(running.generated.size());
  if (running.sampler.Finished(*token, generated)) {
    const bool stopped =
        generated < request.sampling.max_new_tokens ||
        std::find(request.sampling.stop_token_ids.begin(), request.sampling.stop_token_ids.end(),
                  *token) != request.sampling.stop_token_ids.end();
    // The last token travels with the final event.
    Finish(running, absl::OkStatus(), stopped ? FinishReason::kStop : FinishReason::kLength,
           std::move(event));
    return;
  }
  running.pending->sink(std::move(event));
}

}  // namespace moelora
