#include "server/inference_service.h"

#include <chrono>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "server/proto_convert.h"
#include "server/request_log.h"
#include "server/status_mapping.h"

namespace moelora::server {
namespace {

constexpr int64_t kDefaultMaxNewTokens = 16;

const absl::Status& NotReady() {
  static const absl::Status* status =
      new absl::Status(absl::UnavailableError("the server is loading its model and experts"));
  return *status;
}

v1::FinishReason ToProto(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case FinishReason::kNone:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

void ToProto(const Usage& usage, v1::Usage* out) {
  out->set_prompt_tokens(usage.prompt_tokens);
  out->set_generated_tokens(usage.generated_tokens);
  out->set_queue_seconds(absl::ToDoubleSeconds(usage.queue_time));
  out->set_time_to_first_token_seconds(absl::ToDoubleSeconds(usage.time_to_first_token));
  out->set_total_seconds(absl::ToDoubleSeconds(usage.total_time));
}

void AddRouting(const std::vector<std::vector<float>>& rows,
                google::protobuf::RepeatedPtrField<v1::TokenRouting>* out) {
  for (const std::vector<float>& row : rows) {
    out->Add()->mutable_weights()->Add(row.begin(), row.end());
  }
}

std::string DtypeName(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return "float32";
    case at::kBFloat16:
      return "bfloat16";
    case at::kHalf:
      return "float16";
    case at::kDouble:
      return "float64";
    default:
      return c10::toString(dtype);
  }
}

std::string DeviceName(const c10::Device& device) {
  if (device.is_cuda() && !device.has_index()) return "cuda:0";
  return device.str();
}

// Streams one Generate call; deletes itself in OnDone.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(std::shared_ptr<const TextCodec> codec, bool log_requests, Metrics* metrics)
      : log_requests_(log_requests),
        metrics_(metrics),
        start_(absl::Now()),
        text_(codec != nullptr ? codec->NewStream() : nullptr) {}

  // Submits `request`, or finishes the call at once when it is refused.
  void Start(Engine& engine, absl::StatusOr<GenerateRequest> request) {
    if (!request.ok()) {
      FinishRefused(request.status(), {}, "");
      return;
    }
    const int64_t prompt_tokens = static_cast<int64_t>(request->prompt.size());
    std::string id = request->id;
    std::string router = RoutingLabel(request->routing);
    {
      absl::MutexLock lock(&mu_);
      record_.id = id;
      record_.router = router;
      record_.prompt_tokens = prompt_tokens;
    }
    // The sink may run on the compute thread before Submit returns; the call cannot finish
    // (and OnDone cannot delete this) before the handler has returned the reactor.
    absl::StatusOr<std::shared_ptr<RequestHandle>> handle = engine.Submit(
        *std::move(request), [this](GenerateEvent event) { OnEvent(std::move(event)); });
    if (!handle.ok()) {
      FinishRefused(handle.status(), std::move(id), std::move(router), prompt_tokens);
      return;
    }
    absl::MutexLock lock(&mu_);
    handle_ = *std::move(handle);
    record_.id = handle_->id();
  }

  void OnWriteDone(bool ok) override {
    Action action;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        // The client is gone: stop writing; the engine's last event finishes the call.
        broken_ = true;
        if (handle_ != nullptr) handle_->Cancel();
      }
      action = NextLocked();
    }
    Perform(std::move(action));
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    broken_ = true;
    if (handle_ != nullptr) handle_->Cancel();
  }

  void OnDone() override { delete this; }

 private:
  struct Action {
    enum Kind { kNone, kWrite, kFinish } kind = kNone;
    grpc::Status status;
    std::string code;  // the status code's name, for metrics
    std::string log_line;
  };

  // On the compute thread: merge into the next message, start a write or finish.
  void OnEvent(GenerateEvent event) {
    Action action;
    {
      absl::MutexLock lock(&mu_);
      if (!event.tokens.empty()) {
        next_.mutable_token_ids()->Add(event.tokens.begin(), event.tokens.end());
        if (text_ != nullptr) AppendText(text_->Add(event.tokens));
        has_next_ = true;
      }
      for (const std::string& expert : event.routing_experts) next_.add_routing_experts(expert);
      AddRouting(event.routing, next_.mutable_routing());
      if (event.finished) {
        done_ = true;
        final_status_ = event.status;
        record_.generated_tokens = event.usage.generated_tokens;
        record_.time_to_first_token = event.usage.time_to_first_token;
        if (event.status.ok()) {
          if (text_ != nullptr) AppendText(text_->Flush());
          next_.set_finish_reason(ToProto(event.finish_reason));
          ToProto(event.usage, next_.mutable_usage());
          has_next_ = true;
        }
      }
      action = NextLocked();
    }
    Perform(std::move(action));
  }

  // A piece of text that cannot be decoded is left out; the token ids are the truth.
  void AppendText(const absl::StatusOr<std::string>& text) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (text.ok()) next_.mutable_text()->append(*text);
  }

  // What to do next; at most one write in flight, Finish once after the last write.
  Action NextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Action action;
    if (writing_ || finishing_) return action;
    if (has_next_ && !broken_) {
      in_flight_.Swap(&next_);
      next_.Clear();
      has_next_ = false;
      writing_ = true;
      action.kind = Action::kWrite;
      return action;
    }
    if (!done_) return action;
    finishing_ = true;
    action.kind = Action::kFinish;
    action.status = ToGrpcStatus(final_status_);
    action.code = absl::StatusCodeToString(final_status_.code());
    if (log_requests_) {
      record_.status = final_status_;
      record_.latency = absl::Now() - start_;
      action.log_line = FormatRequestRecord(record_);
    }
    return action;
  }

  // Called without the lock, as the caller's last use of `this`: after Finish, OnDone may
  // already have deleted it.
  void Perform(Action action) {
    switch (action.kind) {
      case Action::kNone:
        return;
      case Action::kWrite:
        StartWrite(&in_flight_);
        return;
      case Action::kFinish:
        if (!action.log_line.empty()) LogLine('I', action.log_line);
        if (metrics_ != nullptr) metrics_->RecordRpc("Generate", action.code);
        Finish(action.status);
        return;
    }
  }

  void FinishRefused(const absl::Status& status, std::string id, std::string router,
                     int64_t prompt_tokens = 0) {
    if (log_requests_) {
      RequestRecord record;
      record.id = std::move(id);
      record.rpc = "Generate";
      record.prompt_tokens = prompt_tokens;
      record.latency = absl::Now() - start_;
      record.router = std::move(router);
      record.status = status;
      LogRequest(record);
    }
    if (metrics_ != nullptr) {
      metrics_->RecordRpc("Generate", absl::StatusCodeToString(status.code()));
    }
    {
      absl::MutexLock lock(&mu_);
      finishing_ = true;
    }
    Finish(ToGrpcStatus(status));
  }

  const bool log_requests_;
  Metrics* const metrics_;
  const absl::Time start_;

  absl::Mutex mu_;
  std::unique_ptr<TextStream> text_ ABSL_GUARDED_BY(mu_);  // with a tokenizer
  std::shared_ptr<RequestHandle> handle_ ABSL_GUARDED_BY(mu_);
  v1::GenerateResponse in_flight_;  // owned by the write in flight
  v1::GenerateResponse next_ ABSL_GUARDED_BY(mu_);
  bool has_next_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;     // cancelled or a write failed
  bool done_ ABSL_GUARDED_BY(mu_) = false;       // the engine's last event arrived
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;  // Finish called (or about to be)
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
  RequestRecord record_ ABSL_GUARDED_BY(mu_) = {.rpc = "Generate"};
};

// One Score call; deletes itself in OnDone.
class ScoreReactor final : public grpc::ServerUnaryReactor {
 public:
  ScoreReactor(v1::ScoreResponse* response, bool log_requests, Metrics* metrics)
      : response_(response), log_requests_(log_requests), metrics_(metrics), start_(absl::Now()) {}

  void Start(Engine& engine, absl::StatusOr<ScoreRequest> request) {
    if (!request.ok()) {
      Done(request.status(), {}, "", 0);
      return;
    }
    const int64_t tokens = static_cast<int64_t>(request->tokens.size());
    std::string router = RoutingLabel(request->routing);
    std::string id = request->id;
    {
      absl::MutexLock lock(&mu_);
      router_ = router;
      tokens_ = tokens;
      id_ = id;
    }
    // `done` runs on the compute thread, once; the call finishes there.
    absl::StatusOr<std::shared_ptr<RequestHandle>> handle =
        engine.SubmitScore(*std::move(request), [this](absl::StatusOr<ScoreResult> result) {
          std::string id, router;
          int64_t tokens;
          {
            absl::MutexLock lock(&mu_);
            id = id_;
            router = router_;
            tokens = tokens_;
          }
          if (!result.ok()) {
            Done(result.status(), std::move(id), std::move(router), tokens);
            return;
          }
          for (const ScoredToken& scored : result->tokens) {
            v1::ScoredToken* out = response_->add_tokens();
            out->set_token_id(scored.token);
            out->set_logprob(scored.logprob);
            for (const auto& [token, logprob] : scored.top) {
              v1::TokenLogprob* top = out->add_top();
              top->set_token_id(token);
              top->set_logprob(logprob);
            }
          }
          response_->set_total_logprob(result->total_logprob);
          for (const std::string& expert : result->routing_experts) {
            response_->add_routing_experts(expert);
          }
          AddRouting(result->routing, response_->mutable_routing());
          Done(absl::OkStatus(), std::move(id), std::move(router), tokens);
        });
    if (!handle.ok()) {
      Done(handle.status(), std::move(id), std::move(router), tokens);
      return;
    }
    absl::MutexLock lock(&mu_);
    handle_ = *std::move(handle);
    id_ = handle_->id();
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    if (handle_ != nullptr) handle_->Cancel();
  }

  void OnDone() override { delete this; }

 private:
  // Logs and finishes: the last use of `this`.
  void Done(const absl::Status& status, std::string id, std::string router, int64_t tokens) {
    if (log_requests_) {
      LogRequest({.id = std::move(id),
                  .rpc = "Score",
                  .prompt_tokens = tokens,
                  .latency = absl::Now() - start_,
                  .router = std::move(router),
                  .status = status});
    }
    if (metrics_ != nullptr) metrics_->RecordRpc("Score", absl::StatusCodeToString(status.code()));
    Finish(ToGrpcStatus(status));
  }

  v1::ScoreResponse* const response_;
  const bool log_requests_;
  Metrics* const metrics_;
  const absl::Time start_;
  absl::Mutex mu_;
  std::shared_ptr<RequestHandle> handle_ ABSL_GUARDED_BY(mu_);
  std::string id_ ABSL_GUARDED_BY(mu_);
  std::string router_ ABSL_GUARDED_BY(mu_);
  int64_t tokens_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace

absl::Time CallDeadline(const grpc::CallbackServerContext& context) {
  const std::chrono::system_clock::time_point deadline = context.deadline();
  if (deadline == std::chrono::system_clock::time_point::max()) return absl::InfiniteFuture();
  return absl::FromChrono(deadline);
}

InferenceService::InferenceService(Engine& engine, const ExpertPool& pool,
                                   InferenceServiceOptions options)
    : engine_(engine), pool_(pool), options_(std::move(options)) {}

absl::StatusOr<std::vector<int64_t>> InferenceService::Tokens(
    const google::protobuf::RepeatedField<int64_t>& ids, const std::string& text,
    absl::string_view what) const {
  if (!ids.empty() && !text.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": give token ids or text, not both"));
  }
  if (!text.empty()) {
    if (options_.codec == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": the server has no tokenizer; send token ids instead of text"));
    }
    return options_.codec->Encode(text);
  }
  if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": the prompt is empty"));
  return std::vector<int64_t>(ids.begin(), ids.end());
}

absl::StatusOr<GenerateRequest> InferenceService::ToEngineRequest(
    const v1::GenerateRequest& request, absl::Time deadline) const {
  GenerateRequest out;
  out.id = request.request_id();
  absl::StatusOr<std::vector<int64_t>> prompt =
      Tokens(request.prompt_token_ids(), request.prompt_text(), "GenerateRequest");
  if (!prompt.ok()) return prompt.status();
  out.prompt = *std::move(prompt);
  const v1::SamplingParams& sampling = request.sampling();
  out.sampling.max_new_tokens =
      sampling.max_new_tokens() == 0 ? kDefaultMaxNewTokens : sampling.max_new_tokens();
  out.sampling.temperature = sampling.temperature();
  out.sampling.top_k = sampling.top_k();
  out.sampling.top_p = sampling.top_p() == 0 ? 1.0 : sampling.top_p();
  out.sampling.seed = sampling.seed();
  out.sampling.stop_token_ids.assign(sampling.stop_token_ids().begin(),
                                     sampling.stop_token_ids().end());
  out.routing = FromProto(request.routing());
  out.return_routing = request.return_routing();
  out.deadline = deadline;
  return out;
}

absl::StatusOr<ScoreRequest> InferenceService::ToEngineRequest(const v1::ScoreRequest& request,
                                                               absl::Time deadline) const {
  ScoreRequest out;
  out.id = request.request_id();
  absl::StatusOr<std::vector<int64_t>> tokens =
      Tokens(request.token_ids(), request.text(), "ScoreRequest");
  if (!tokens.ok()) return tokens.status();
  out.tokens = *std::move(tokens);
  out.top_n = request.top_n();
  out.routing = FromProto(request.routing());
  out.return_routing = request.return_routing();
  out.deadline = deadline;
  return out;
}

grpc::ServerWriteReactor<v1::GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto* reactor = new GenerateReactor(options_.codec, options_.log_requests, options_.metrics);
  if (!ready_.load(std::memory_order_acquire)) {
    reactor->Start(engine_, NotReady());
  } else {
    reactor->Start(engine_, ToEngineRequest(*request, CallDeadline(*context)));
  }
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::Score(grpc::CallbackServerContext* context,
                                                  const v1::ScoreRequest* request,
                                                  v1::ScoreResponse* response) {
  auto* reactor = new ScoreReactor(response, options_.log_requests, options_.metrics);
  if (!ready_.load(std::memory_order_acquire)) {
    reactor->Start(engine_, NotReady());
  } else {
    reactor->Start(engine_, ToEngineRequest(*request, CallDeadline(*context)));
  }
  return reactor;
}

v1::ModelInfo InferenceService::ModelInfo() const {
  v1::ModelInfo info;
  const Model& model = engine_.model();
  const ModelConfig& config = model.config();
  info.set_model_type(std::string(ModelTypeName(config.model_type)));
  info.set_model_dir(options_.model_dir);
  info.set_vocab_size(config.vocab_size);
  info.set_hidden_size(config.hidden_size);
  info.set_num_layers(config.num_hidden_layers);
  info.set_max_position_embeddings(config.max_position_embeddings);
  info.set_dtype(DtypeName(model.options().dtype));
  info.set_device(DeviceName(model.options().device));
  info.set_has_tokenizer(options_.codec != nullptr);

  const EngineStats stats = engine_.stats();
  const EngineOptions& engine_options = engine_.options();
  v1::Limits* limits = info.mutable_limits();
  limits->set_max_running_requests(stats.kv_slots_total);
  limits->set_max_seq_len(stats.kv_slots_total > 0 ? stats.kv_tokens_total / stats.kv_slots_total
                                                   : engine_options.max_seq_len);
  limits->set_kv_cache_tokens(stats.kv_tokens_total);
  limits->set_kv_cache_bytes(engine_.kv_cache_bytes());
  limits->set_max_batch_tokens(engine_options.max_batch_tokens);
  limits->set_max_queued_requests(engine_options.max_queued_requests);
  limits->set_expert_pool_capacity(pool_.options().capacity);
  limits->set_expert_max_rank(pool_.options().max_rank);
  limits->set_max_message_bytes(options_.max_message_bytes);

  for (const ExpertStatus& expert : engine_.ListExperts()) ToProto(expert, info.add_experts());
  for (const RouterInfo& router : engine_.ListRouters()) ToProto(router, info.add_routers());
  return info;
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const v1::GetModelInfoRequest* request,
                                                         v1::ModelInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const absl::Status status =
      ready_.load(std::memory_order_acquire) ? absl::OkStatus() : NotReady();
  if (status.ok()) *response = ModelInfo();
  if (options_.metrics != nullptr) {
    options_.metrics->RecordRpc("GetModelInfo", absl::StatusCodeToString(status.code()));
  }
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

}  // namespace moelora::server
