#ifndef MOELORA_SERVER_INFERENCE_SERVICE_H_
#define MOELORA_SERVER_INFERENCE_SERVICE_H_

// moelora.v1.Inference over core::Engine, on gRPC's callback API: no thread per call.
//
// Generate: the handler validates and maps the request, submits it, and returns a write
// reactor. The engine's sink runs on the compute thread and never blocks: it merges the event
// into the reactor's next message under a mutex and, when no write is in flight, starts one;
// OnWriteDone starts the next. While a write is in flight, later events accumulate in one
// message (the proto allows several tokens per message), so memory stays bounded however slow
// the client. A cancelled call (client gone, deadline) cancels the engine request; the reactor
// calls Finish exactly once, after the engine's last event, so the sink never outlives it.

#include <grpcpp/server_context.h>
#include <grpcpp/support/server_callback.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "core/engine.h"
#include "core/expert_pool.h"
#include "moelora/v1/inference.grpc.pb.h"
#include "server/metrics.h"
#include "server/text_codec.h"

namespace moelora::server {

struct InferenceServiceOptions {
  std::string model_dir;                   // reported by GetModelInfo
  int64_t max_message_bytes = 0;           // reported by GetModelInfo
  std::shared_ptr<const TextCodec> codec;  // null: token ids only
  bool log_requests = true;                // one line per finished request on stderr
  Metrics* metrics = nullptr;              // optional; outlives the service
};

class InferenceService final : public v1::Inference::CallbackService {
 public:
  // `engine` and `pool` outlive the service.
  InferenceService(Engine& engine, const ExpertPool& pool, InferenceServiceOptions options);

  // Until set, every call is refused with UNAVAILABLE (the server is still loading).
  void set_ready(bool ready) { ready_.store(ready, std::memory_order_release); }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Score(grpc::CallbackServerContext* context,
                                  const v1::ScoreRequest* request,
                                  v1::ScoreResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

  // The request as the engine takes it (defaults applied: max_new_tokens 0 -> 16, top_p 0 -> 1).
  // InvalidArgument for text without a tokenizer, or both or neither of ids and text.
  absl::StatusOr<GenerateRequest> ToEngineRequest(const v1::GenerateRequest& request,
                                                  absl::Time deadline) const;
  absl::StatusOr<ScoreRequest> ToEngineRequest(const v1::ScoreRequest& request,
                                               absl::Time deadline) const;

  // The model, limits, experts and routers as GetModelInfo reports them.
  v1::ModelInfo ModelInfo() const;

 private:
  absl::StatusOr<std::vector<int64_t>> Tokens(const google::protobuf::RepeatedField<int64_t>& ids,
                                              const std::string& text,
                                              absl::string_view what) const;

  Engine& engine_;
  const ExpertPool& pool_;
  const InferenceServiceOptions options_;
  std::atomic<bool> ready_{false};
};

// The call's deadline as absl::Time (InfiniteFuture when the client set none).
absl::Time CallDeadline(const grpc::CallbackServerContext& context);

}  // namespace moelora::server

#endif  // MOELORA_SERVER_INFERENCE_SERVICE_H_
