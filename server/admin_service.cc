#include "server/admin_service.h"

#include <string>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "server/proto_convert.h"
#include "server/request_log.h"
#include "server/status_mapping.h"

namespace moelora::server {
namespace {

absl::Status RequireName(const std::string& name, absl::string_view field) {
  if (name.empty()) return absl::InvalidArgumentError(absl::StrCat(field, " is empty"));
  return absl::OkStatus();
}

}  // namespace

AdminService::AdminService(Engine& engine, const ExpertPool& pool, AdminServiceOptions options)
    : engine_(engine), pool_(pool), options_(std::move(options)) {}

absl::Status AdminService::Admit(const grpc::ServerContext& context) const {
  if (options_.token_checker != nullptr) {
    absl::Status status = options_.token_checker->CheckMetadata(context.client_metadata());
    if (!status.ok()) return status;
  }
  if (!ready_.load(std::memory_order_acquire)) {
    return absl::UnavailableError("the server is loading its model and experts");
  }
  return absl::OkStatus();
}

grpc::Status AdminService::Reply(absl::string_view rpc, absl::string_view subject, absl::Time start,
                                 const absl::Status& status) const {
  if (options_.log_calls) {
    std::string line = absl::StrCat(
        "admin rpc=", rpc, " name=\"", absl::CHexEscape(subject),
        "\" latency_ms=", absl::StrFormat("%.1f", absl::ToDoubleMilliseconds(absl::Now() - start)),
        " status=", absl::StatusCodeToString(status.code()));
    if (!status.ok()) {
      absl::StrAppend(&line, " message=\"", absl::CHexEscape(status.message()), "\"");
    }
    LogLine(status.ok() ? 'I' : 'W', line);
  }
  if (options_.metrics != nullptr) {
    options_.metrics->RecordRpc(std::string(rpc), absl::StatusCodeToString(status.code()));
  }
  return ToGrpcStatus(status);
}

grpc::Status AdminService::AttachExpert(grpc::ServerContext* context,
                                        const v1::AttachExpertRequest* request,
                                        v1::ExpertInfo* response) {
  const absl::Time start = absl::Now();
  absl::Status status = Admit(*context);
  if (status.ok()) status = RequireName(request->name(), "AttachExpertRequest.name");
  if (status.ok()) status = RequireName(request->path(), "AttachExpertRequest.path");
  if (status.ok()) {
    const absl::Time attach_start = absl::Now();
    absl::StatusOr<ExpertStatus> expert = engine_.AttachExpert(request->name(), request->path());
    if (expert.ok()) {
      ToProto(*expert, response);
    } else {
      status = expert.status();
    }
    if (options_.metrics != nullptr) {
      options_.metrics->RecordAttach(status.ok(),
                                     status.ok() ? "" : absl::StatusCodeToString(status.code()),
                                     absl::Now() - attach_start);
    }
  }
  return Reply("AttachExpert", request->name(), start, status);
}

grpc::Status AdminService::DetachExpert(grpc::ServerContext* context,
                                        const v1::DetachExpertRequest* request,
                                        v1::DetachExpertResponse* response) {
  const absl::Time start = absl::Now();
  absl::Status status = Admit(*context);
  if (status.ok()) status = RequireName(request->name(), "DetachExpertRequest.name");
  if (status.ok()) {
    const absl::Time detach_start = absl::Now();
    status = engine_.DetachExpert(request->name(), request->force());
    if (options_.metrics != nullptr) {
      options_.metrics->RecordDetach(status.ok(), absl::Now() - detach_start);
    }
  }
  return Reply("DetachExpert", request->name(), start, status);
}

grpc::Status AdminService::ListExperts(grpc::ServerContext* context,
                                       const v1::ListExpertsRequest* request,
                                       v1::ListExpertsResponse* response) {
  const absl::Time start = absl::Now();
  const absl::Status status = Admit(*context);
  if (status.ok()) {
    for (const ExpertStatus& expert : engine_.ListExperts()) {
      ToProto(expert, response->add_experts());
    }
    response->set_free_slots(pool_.free_slots());
  }
  return Reply("ListExperts", "", start, status);
}

grpc::Status AdminService::AttachRouter(grpc::ServerContext* context,
                                        const v1::AttachRouterRequest* request,
                                        v1::RouterInfo* response) {
  const absl::Time start = absl::Now();
  absl::Status status = Admit(*context);
  if (status.ok()) status = RequireName(request->path(), "AttachRouterRequest.path");
  std::string name = request->path();
  if (status.ok()) {
    absl::StatusOr<RouterInfo> router = engine_.AttachRouter(request->path(), request->force());
    if (router.ok()) {
      ToProto(*router, response);
      name = router->name;
    } else {
      status = router.status();
    }
  }
  return Reply("AttachRouter", name, start, status);
}

grpc::Status AdminService::DetachRouter(grpc::ServerContext* context,
                                        const v1::DetachRouterRequest* request,
                                        v1::DetachRouterResponse* response) {
  const absl::Time start = absl::Now();
  absl::Status status = Admit(*context);
  if (status.ok()) status = RequireName(request->name(), "DetachRouterRequest.name");
  if (status.ok()) status = engine_.DetachRouter(request->name());
  return Reply("DetachRouter", request->name(), start, status);
}

grpc::Status AdminService::SetDefaultRouter(grpc::ServerContext* context,
                                            const v1::SetDefaultRouterRequest* request,
                                            v1::SetDefaultRouterResponse* response) {
  const absl::Time start = absl::Now();
  absl::Status status = Admit(*context);
  // An empty name is meaningful here: no default router.
  if (status.ok()) status = engine_.SetDefaultRouter(request->name());
  return Reply("SetDefaultRouter", request->name(), start, status);
}

grpc::Status AdminService::ListRouters(grpc::ServerContext* context,
                                       const v1::ListRoutersRequest* request,
                                       v1::ListRoutersResponse* response) {
  const absl::Time start = absl::Now();
  const absl::Status status = Admit(*context);
  if (status.ok()) {
    for (const RouterInfo& router : engine_.ListRouters()) {
      ToProto(router, response->add_routers());
      if (router.is_default) response->set_default_router(router.name);
    }
  }
  return Reply("ListRouters", "", start, status);
}

}  // namespace moelora::server
