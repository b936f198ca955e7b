#ifndef MOELORA_CORE_ENGINE_H_
#define MOELORA_CORE_ENGINE_H_

// The serving engine: one compute thread owns the model, the KV cache and the expert mixture's
// forwards; any thread submits requests and runs admin operations.
//
// Each step the compute thread
//   1. drops requests that were cancelled or passed their deadline (their KV slot is freed),
//   2. admits waiting requests in arrival order while a KV slot is free and the step's token
//      budget (max_batch_tokens) allows their prompt,
//   3. runs ONE mixture forward over every running request: the whole prompt of the newly
//      admitted ones, one token for the others (continuous batching),
//   4. samples each request's next token and hands it to the request's sink.
//
// Hot swap: a request pins the experts and routers attached when it was submitted
// (Mixture::Pin), so attach/detach never fails or alters a request already in the engine. A
// request naming an expert or router that is not attached is refused at Submit.
//
// KV budget: the cache holds max_running_requests sequences of max_seq_len tokens, allocated
// once at start. A request whose prompt + max_new_tokens can never fit max_seq_len is refused;
// one that can waits for a slot in a bounded queue (beyond max_queued_requests:
// ResourceExhausted at once).

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "core/decode_graphs.h"
#include "core/expert_pool.h"
#include "core/mixture.h"
#include "core/model.h"
#include "core/sampler.h"

namespace moelora {

struct EngineOptions {
  int64_t max_running_requests = 16;  // KV-cache slots
  int64_t max_seq_len = 0;            // per request, prompt + generated; 0: min(model's, 4096)
  int64_t max_batch_tokens = 4096;    // new tokens per forward; longer prompts are refused
  int64_t max_queued_requests = 64;   // waiting requests; beyond: ResourceExhausted
  // Decode steps (every running request adds one token) through CUDA graphs when the model is on
  // a GPU and this build has them (core/decode_graphs.h); prefill and mixed steps stay eager.
  bool cuda_graphs = true;
};

enum class FinishReason { kNone, kLength, kStop };

struct GenerateRequest {
  std::string id;  // for logs; the engine makes one when empty
  std::vector<int64_t> prompt;
  SamplingParams sampling;
  RoutingControls routing;
  bool return_routing = false;
  absl::Time deadline = absl::InfiniteFuture();
};

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  absl::Duration queue_time;           // submit -> admitted
  absl::Duration time_to_first_token;  // submit -> first token
  absl::Duration total_time;           // submit -> finished
};

// What a request produced in one step, or how it ended. Events of one request arrive in order,
// on the compute thread; the last one has `finished` set.
struct GenerateEvent {
  std::vector<int64_t> tokens;  // new tokens (one per step)
  // With return_routing: column names (first event only) and one row per token in `tokens`.
  std::vector<std::string> routing_experts;
  std::vector<std::vector<float>> routing;
  bool finished = false;
  // Set on the last event: OK with a finish reason, or why it stopped (Cancelled,
  // DeadlineExceeded, Unavailable on shutdown, Internal).
  absl::Status status;
  FinishReason finish_reason = FinishReason::kNone;
  Usage usage;
};

// Called on the compute thread: must return quickly and never block on the client. The engine
// calls it up to and including the final event, also after Cancel: keep whatever it captures
// alive until then (capture a shared_ptr, not a pointer to a reactor that may be gone).
using GenerateSink = std::function<void(GenerateEvent)>;

struct ScoreRequest {
  std::string id;
  std::vector<int64_t> tokens;  // at least 2
  int64_t top_n = 0;
  RoutingControls routing;
  bool return_routing = false;
  absl::Time deadline = absl::InfiniteFuture();
};

struct ScoredToken {
  int64_t token = 0;
  double logprob = 0;
  std::vector<std::pair<int64_t, double>> top;  // (token, logprob), most likely first
};

struct ScoreResult {
  std::vector<ScoredToken> tokens;  // tokens[1..]
  double total_logprob = 0;
  std::vector<std::string> routing_experts;
  std::vector<std::vector<float>> routing;  // one row per input token, with return_routing
};

using ScoreCallback = std::function<void(absl::StatusOr<ScoreResult>)>;

// Handle to a submitted request. Cancel is safe from any thread and at any time (also after
// the request finished); the request then ends within one step with Cancelled.
class RequestHandle {
 public:
  void Cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancelled() const { return cancelled_.load(std::memory_order_relaxed); }
  const std::string& id() const { return id_; }

 private:
  friend class Engine;
  std::string id_;
  std::atomic<bool> cancelled_{false};
};

// An attached expert as the admin API reports it.
struct ExpertStatus {
  ExpertInfo info;
  std::vector<std::string> target_modules;  // projection kinds it adapts ("q_proj", ...)
  absl::Time attach_time;
  int64_t requests_served = 0;  // finished requests that gave it a non-zero weight
};

struct EngineStats {
  int64_t queued = 0;
  int64_t running = 0;
  int64_t kv_slots_total = 0;
  int64_t kv_slots_used = 0;
  int64_t kv_tokens_total = 0;     // slots * max_seq_len
  int64_t kv_tokens_reserved = 0;  // Σ (prompt + max_new_tokens) of running requests
  int64_t kv_tokens_used = 0;      // tokens in the cache now
  int64_t steps = 0;               // forwards run since start
  int64_t graph_steps = 0;         // decode steps replayed from a CUDA graph
  int64_t graph_captures = 0;
};

// Per-step and per-request events for metrics (issue 5). Called on the compute thread unless
// noted; implementations must be quick.
class EngineObserver {
 public:
  virtual ~EngineObserver() = default;
  // One forward: how many requests and new tokens it carried and how long it took.
  virtual void OnStep(int64_t requests, int64_t tokens, absl::Duration duration) {}
  // One request's routing in one forward: `weights` is [tokens, experts.size()] row-major
  // (every new token of the step: the prompt on prefill, one token on decode); `router` is
  // empty when the request was pinned, weighted explicitly or used the base model.
  // `prefill` marks the request's first forward (once per request).
  virtual void OnRouting(const std::string& router, const std::vector<std::string>& experts,
                         absl::Span<const float> weights, int64_t tokens, bool prefill,
                         double routing_seconds) {}
  virtual void OnRequestFinished(const GenerateRequest& request, const GenerateEvent& last) {}
};

class Engine {
 public:
  // Takes the model and mixture by reference (they outlive the engine), allocates the KV cache
  // and starts the compute thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const Model& model, Mixture& mixture,
                                                        const EngineOptions& options);
  // Stops the compute thread; requests still running end with Unavailable.
  ~Engine();

  // Validates against the model and what is attached now, pins that, and queues. Errors:
  // InvalidArgument (bad ids, empty prompt, sampling or routing values, a request that can
  // never fit max_seq_len / max_batch_tokens), NotFound (an expert or router not attached),
  // ResourceExhausted (queue full), Unavailable (shutting down). On OK, `sink` receives every event
  // of the request.
  absl::StatusOr<std::shared_ptr<RequestHandle>> Submit(GenerateRequest request, GenerateSink sink);
  // Scores run on the compute thread between steps, one forward each; `done` is called there.
  absl::StatusOr<std::shared_ptr<RequestHandle>> SubmitScore(ScoreRequest request,
                                                             ScoreCallback done);

  // Admin: any thread; never waits for a step.
  absl::StatusOr<ExpertStatus> AttachExpert(const std::string& name, const std::string& dir);
  absl::Status DetachExpert(const std::string& name, bool force);
  std::vector<ExpertStatus> ListExperts() const;
  absl::StatusOr<RouterInfo> AttachRouter(const std::string& dir, bool force);
  absl::Status DetachRouter(const std::string& name);
  absl::Status SetDefaultRouter(const std::string& name);
  std::vector<RouterInfo> ListRouters() const;

  // Refuse new requests (Unavailable) and wait up to `timeout` for queued and running ones to
  // finish; those left then end with Unavailable. Returns true when everything finished in time.
  bool Drain(absl::Duration timeout);

  EngineStats stats() const;
  const EngineOptions& options() const { return options_; }
  const Model& model() const { return model_; }
  const Mixture& mixture() const { return mixture_; }
  int64_t kv_cache_bytes() const;
  // Not owned; set before the first Submit.
  void set_observer(EngineObserver* observer) { observer_ = observer; }

 private:
  struct Pending;
  struct Running;

  Engine(const Model& model, Mixture& mixture, const EngineOptions& options);
  // Ids in the vocabulary, at most max_batch_tokens of them.
  absl::Status ValidateTokens(const std::vector<int64_t>& tokens) const;
  absl::Status Enqueue(std::unique_ptr<Pending> pending);
  void Loop();
  // One step: drop, admit, forward, sample, emit.
  void Step();
  void RunScore(Pending& pending);
  // Ends a request that never ran (queued when cancelled, expired or shut down).
  void EndQueued(std::unique_ptr<Pending> pending, const absl::Status& status);
  // Ends a request: frees its slot and sends `event` as its last one.
  void Finish(Running& running, absl::Status status, FinishReason reason, GenerateEvent event = {});
  // Samples the next token from `logits` ([vocab]) and emits it with its routing row.
  void EmitToken(Running& running, const at::Tensor& logits, const MixtureOutput& out,
                 size_t index);
  void CountServed(const Running& running);
  // Recomputes stats_ from the running requests (compute thread).
  void PublishStats(bool step_done);

  const Model& model_;
  Mixture& mixture_;
  EngineOptions options_;
  EngineObserver* observer_ = nullptr;

  mutable absl::Mutex mu_;
  std::vector<std::unique_ptr<Pending>> queue_ ABSL_GUARDED_BY(mu_);
  bool accepting_ ABSL_GUARDED_BY(mu_) = true;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  int64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  EngineStats stats_ ABSL_GUARDED_BY(mu_);

  mutable absl::Mutex experts_mu_;
  struct ExpertRecord {
    absl::Time attach_time;
    int64_t requests_served = 0;
  };
  std::map<std::string, ExpertRecord> expert_records_ ABSL_GUARDED_BY(experts_mu_);

  // Compute thread only.
  KvCache cache_;
  std::unique_ptr<DecodeGraphs> decode_graphs_;  // null when cuda_graphs is off
  std::vector<std::unique_ptr<Running>> running_;
  std::vector<int64_t> free_slots_;
  int64_t scores_in_hand_ = 0;  // taken from the queue this step, not yet run

  std::thread thread_;
};

}  // namespace moelora

#endif  // MOELORA_CORE_ENGINE_H_
