#ifndef MOELORA_SERVER_ADMIN_SERVICE_H_
#define MOELORA_SERVER_ADMIN_SERVICE_H_

// moelora.v1.Admin over core::Engine. A synchronous service: attaching reads adapter files for
// tens to hundreds of milliseconds, which would stall gRPC's callback threads (and with them
// every Generate stream); the sync server runs each call on its own pool thread instead.

#include <grpcpp/server_context.h>

#include <atomic>
#include <memory>

#include "absl/status/status.h"
#include "core/engine.h"
#include "core/expert_pool.h"
#include "moelora/v1/admin.grpc.pb.h"
#include "server/auth.h"
#include "server/metrics.h"

namespace moelora::server {

struct AdminServiceOptions {
  // Checked on every call when set (see auth.h for when the port's processor does it instead).
  std::shared_ptr<const BearerTokenChecker> token_checker;
  bool log_calls = true;       // one line per admin call on stderr
  Metrics* metrics = nullptr;  // optional; outlives the service
};

class AdminService final : public v1::Admin::Service {
 public:
  AdminService(Engine& engine, const ExpertPool& pool, AdminServiceOptions options);

  // Until set, every call is refused with UNAVAILABLE.
  void set_ready(bool ready) { ready_.store(ready, std::memory_order_release); }

  grpc::Status AttachExpert(grpc::ServerContext* context, const v1::AttachExpertRequest* request,
                            v1::ExpertInfo* response) override;
  grpc::Status DetachExpert(grpc::ServerContext* context, const v1::DetachExpertRequest* request,
                            v1::DetachExpertResponse* response) override;
  grpc::Status ListExperts(grpc::ServerContext* context, const v1::ListExpertsRequest* request,
                           v1::ListExpertsResponse* response) override;
  grpc::Status AttachRouter(grpc::ServerContext* context, const v1::AttachRouterRequest* request,
                            v1::RouterInfo* response) override;
  grpc::Status DetachRouter(grpc::ServerContext* context, const v1::DetachRouterRequest* request,
                            v1::DetachRouterResponse* response) override;
  grpc::Status SetDefaultRouter(grpc::ServerContext* context,
                                const v1::SetDefaultRouterRequest* request,
                                v1::SetDefaultRouterResponse* response) override;
  grpc::Status ListRouters(grpc::ServerContext* context, const v1::ListRoutersRequest* request,
                           v1::ListRoutersResponse* response) override;

 private:
  // Authentication and readiness, before any work.
  absl::Status Admit(const grpc::ServerContext& context) const;
  // Logs the call and maps its status.
  grpc::Status Reply(absl::string_view rpc, absl::string_view subject, absl::Time start,
                     const absl::Status& status) const;

  Engine& engine_;
  const ExpertPool& pool_;
  const AdminServiceOptions options_;
  std::atomic<bool> ready_{false};
};

}  // namespace moelora::server

#endif  // MOELORA_SERVER_ADMIN_SERVICE_H_
