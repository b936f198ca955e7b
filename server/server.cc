#include "server/server.h"

#include <c10/core/ScalarType.h>
#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/server.h>
#include <grpcpp/server_builder.h>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/file_io.h"
#include "core/status_macros.h"
#include "moelora/v1/admin.grpc.pb.h"
#include "moelora/v1/inference.grpc.pb.h"
#include "server/admin_service.h"
#include "server/inference_service.h"
#include "server/request_log.h"

namespace moelora::server {
namespace {

// Calls still open when the engine has drained get this long before gRPC cancels them.
constexpr absl::Duration kShutdownGrace = absl::Seconds(2);
constexpr int64_t kDefaultMaxSeqLen = 4096;

std::string ResolvePath(const std::string& path, const std::string& manifest_path) {
  if (path.empty() || std::filesystem::path(path).is_absolute()) return path;
  return (std::filesystem::path(manifest_path).parent_path() / path).string();
}

void ApplyChannelArgs(const ServerOptions& options, grpc::ServerBuilder& builder) {
  const int max_message = static_cast<int>(
      std::min<int64_t>(options.max_message_bytes, std::numeric_limits<int>::max()));
  builder.SetMaxReceiveMessageSize(max_message);
  builder.SetMaxSendMessageSize(max_message);
  const KeepaliveOptions& keepalive = options.keepalive;
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, keepalive.time_ms);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, keepalive.timeout_ms);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS,
                             keepalive.permit_without_calls ? 1 : 0);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS,
                             keepalive.min_recv_ping_interval_ms);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA,
                             keepalive.max_pings_without_data);
}

void SetHealth(grpc::Server* server, const std::vector<std::string>& services, bool serving) {
  if (server == nullptr) return;
  grpc::HealthCheckServiceInterface* health = server->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);
  for (const std::string& service : services) health->SetServingStatus(service, serving);
}

}  // namespace

absl::StatusOr<std::vector<ExpertSpec>> ParseExpertList(absl::string_view text) {
  std::vector<ExpertSpec> experts;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    item = absl::StripAsciiWhitespace(item);
    std::vector<std::string> parts = absl::StrSplit(item, absl::MaxSplits('=', 1));
    if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("expert '", item, "' is not name=dir"));
    }
    experts.push_back({std::move(parts[0]), std::move(parts[1])});
  }
  return experts;
}

absl::StatusOr<StartupManifest> ParseManifest(absl::string_view json_text,
                                              const std::string& manifest_path) {
  const auto fail = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(manifest_path, ": ", what));
  };
  const nlohmann::json json = nlohmann::json::parse(json_text.begin(), json_text.end(), nullptr,
                                                    /*allow_exceptions=*/false);
  if (json.is_discarded()) return fail("not valid JSON");
  if (!json.is_object()) return fail("expected a JSON object");
  for (const auto& [key, value] : json.items()) {
    if (key != "experts" && key != "routers") {
      return fail(absl::StrCat("unknown field '", key, "' (expected experts, routers)"));
    }
  }
  StartupManifest manifest;
  if (json.contains("experts")) {
    const nlohmann::json& experts = json["experts"];
    if (!experts.is_array()) return fail("'experts' must be a list");
    for (size_t i = 0; i < experts.size(); ++i) {
      const nlohmann::json& expert = experts[i];
      if (!expert.is_object() || !expert.contains("name") || !expert.contains("path") ||
          !expert["name"].is_string() || !expert["path"].is_string() || expert.size() != 2) {
        return fail(absl::StrCat("experts[", i, "] must be {\"name\": ..., \"path\": ...}"));
      }
      manifest.experts.push_back({expert["name"].get<std::string>(),
                                  ResolvePath(expert["path"].get<std::string>(), manifest_path)});
      if (manifest.experts.back().name.empty() || manifest.experts.back().path.empty()) {
        return fail(absl::StrCat("experts[", i, "]: empty name or path"));
      }
    }
  }
  if (json.contains("routers")) {
    const nlohmann::json& routers = json["routers"];
    if (!routers.is_array()) return fail("'routers' must be a list");
    for (size_t i = 0; i < routers.size(); ++i) {
      const nlohmann::json& router = routers[i];
      const bool has_default = router.is_object() && router.contains("default");
      if (!router.is_object() || !router.contains("path") || !router["path"].is_string() ||
          router["path"].get<std::string>().empty() ||
          (has_default && !router["default"].is_boolean()) ||
          router.size() != (has_default ? 2u : 1u)) {
        return fail(absl::StrCat("routers[", i, "] must be {\"path\": ..., \"default\": bool}"));
      }
      manifest.routers.push_back({ResolvePath(router["path"].get<std::string>(), manifest_path),
                                  has_default && router["default"].get<bool>()});
    }
  }
  return manifest;
}

absl::StatusOr<StartupManifest> ReadManifest(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, "start-up manifest"));
  return ParseManifest(text, path);
}

absl::StatusOr<int64_t> RunningRequestsForKvBytes(const ModelConfig& config, at::ScalarType dtype,
                                                  int64_t max_seq_len, int64_t bytes) {
  const int64_t per_sequence = 2 * config.num_hidden_layers * max_seq_len *
                               config.num_key_value_heads * config.head_dim *
                               static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t sequences = per_sequence > 0 ? bytes / per_sequence : 0;
  if (sequences < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_cache_bytes ", bytes, " holds no sequence of max_seq_len ", max_seq_len,
                     " tokens (", per_sequence, " bytes each)"));
  }
  return sequences;
}

Server::Server(ServerOptions options) : options_(std::move(options)) {}

Server::~Server() {
  bool shut_down;
  {
    absl::MutexLock lock(&shutdown_mu_);
    shut_down = shut_down_;
  }
  if (!shut_down) Shutdown(absl::ZeroDuration());
}

absl::StatusOr<std::unique_ptr<Server>> Server::Start(ServerOptions options) {
  std::unique_ptr<Server> server(new Server(std::move(options)));
  absl::Status status = server->Init();
  if (status.ok()) status = server->StartPorts();
  if (status.ok()) status = server->AttachStartup();
  if (!status.ok()) {
    server->StopPorts(absl::ZeroDuration());
    {
      absl::MutexLock lock(&server->shutdown_mu_);
      server->shut_down_ = true;
    }
    server->stopped_.Notify();
    return status;
  }
  server->inference_->set_ready(true);
  server->admin_->set_ready(true);
  server->SetServing(true);
  LogLine('I', absl::StrCat("serving on port ", server->data_port_, ", admin on port ",
                            server->admin_port_,
                            server->metrics_port_ > 0
                                ? absl::StrCat(", metrics on port ", server->metrics_port_)
                                : ""));
  return server;
}

absl::Status Server::Init() {
  if (options_.model_dir.empty()) return absl::InvalidArgumentError("no model directory given");
  LogLine('I',
          absl::StrCat("loading model ", options_.model_dir, " on ", options_.load.device.str(),
                       " as ", c10::toString(options_.load.dtype)));
  LoadOptions load = options_.load;
  // Room for the pool's stacks next to every weight, so the base GEMMs do part of the LoRA work
  // (docs/architecture.md, "The fused pass"); the layout of gate's and up's as asked.
  load.adapter_room.slots = options_.pool.capacity;
  load.adapter_room.rank = options_.pool.max_rank;
  ASSIGN_OR_RETURN(model_, Model::Load(options_.model_dir, load));
  ASSIGN_OR_RETURN(pool_, ExpertPool::Create(*model_, options_.pool));
  mixture_ = std::make_unique<Mixture>(*model_, *pool_);
  EngineOptions engine_options = options_.engine;
  if (options_.kv_cache_bytes > 0) {
    const int64_t max_seq_len =
        engine_options.max_seq_len > 0
            ? engine_options.max_seq_len
            : std::min(model_->config().max_position_embeddings, kDefaultMaxSeqLen);
    ASSIGN_OR_RETURN(engine_options.max_running_requests,
                     RunningRequestsForKvBytes(model_->config(), options_.load.dtype, max_seq_len,
                                               options_.kv_cache_bytes));
  }
  ASSIGN_OR_RETURN(engine_, Engine::Create(*model_, *mixture_, engine_options));
  if (!options_.metrics_listen.empty()) {
    metrics_ = std::make_shared<Metrics>();
    metrics_->set_engine(engine_.get());
    engine_->set_observer(metrics_.get());
    ASSIGN_OR_RETURN(exposer_, MetricsHttpServer::Start(options_.metrics_listen, metrics_));
    metrics_port_ = exposer_->port();
  }

  std::shared_ptr<const BearerTokenChecker> checker;
  if (!options_.admin_token_file.empty()) {
    ASSIGN_OR_RETURN(std::string token, ReadTokenFile(options_.admin_token_file));
    checker = std::make_shared<BearerTokenChecker>(std::move(token));
  }
  inference_ = std::make_unique<InferenceService>(
      *engine_, *pool_,
      InferenceServiceOptions{.model_dir = options_.model_dir,
                              .max_message_bytes = options_.max_message_bytes,
                              .codec = options_.codec,
                              .log_requests = options_.log_requests,
                              .metrics = metrics_.get()});
  // On a TLS admin port of its own, the port's processor checks the token (StartPorts).
  const bool processor_checks =
      checker != nullptr && options_.tls.enabled() && !options_.admin_on_data_port;
  admin_ = std::make_unique<AdminService>(
      *engine_, *pool_,
      AdminServiceOptions{.token_checker = processor_checks ? nullptr : checker,
                          .log_calls = options_.log_requests,
                          .metrics = metrics_.get()});
  if (processor_checks) admin_checker_ = std::move(checker);
  return absl::OkStatus();
}

absl::Status Server::StartPorts() {
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();

  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> data_credentials,
                   MakeServerCredentials(options_.tls));
  grpc::ServerBuilder data_builder;
  data_builder.AddListeningPort(options_.listen, data_credentials, &data_port_);
  ApplyChannelArgs(options_, data_builder);
  data_builder.RegisterService(inference_.get());
  if (options_.admin_on_data_port) data_builder.RegisterService(admin_.get());
  data_server_ = data_builder.BuildAndStart();
  if (data_server_ == nullptr || data_port_ == 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen on ", options_.listen));
  }
  if (options_.admin_on_data_port) {
    admin_port_ = data_port_;
  } else {
    ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> admin_credentials,
                     MakeServerCredentials(options_.tls));
    if (admin_checker_ != nullptr) {
      admin_credentials->SetAuthMetadataProcessor(
          std::make_shared<BearerTokenAuthProcessor>(admin_checker_));
    }
    grpc::ServerBuilder admin_builder;
    admin_builder.AddListeningPort(options_.admin_listen, admin_credentials, &admin_port_);
    ApplyChannelArgs(options_, admin_builder);
    admin_builder.RegisterService(admin_.get());
    admin_server_ = admin_builder.BuildAndStart();
    if (admin_server_ == nullptr || admin_port_ == 0) {
      return absl::UnavailableError(
          absl::StrCat("cannot listen on ", options_.admin_listen, " (admin)"));
    }
  }
  // The default health service starts SERVING; not until the start-up experts are attached.
  SetServing(false);
  return absl::OkStatus();
}

absl::Status Server::AttachStartup() {
  const StartupManifest& startup = options_.startup;
  for (const ExpertSpec& expert : startup.experts) {
    absl::StatusOr<ExpertStatus> attached = engine_->AttachExpert(expert.name, expert.path);
    if (!attached.ok()) {
      return PrefixStatus(attached.status(), absl::StrCat("start-up expert '", expert.name, "' (",
                                                          expert.path, "): "));
    }
    LogLine('I', absl::StrCat("attached expert ", expert.name, " from ", expert.path, " (slot ",
                              attached->info.slot, ", rank ", attached->info.max_rank, ")"));
  }
  std::string default_router = startup.default_router;
  for (const RouterSpec& router : startup.routers) {
    absl::StatusOr<RouterInfo> attached = engine_->AttachRouter(router.path, /*force=*/false);
    if (!attached.ok()) {
      return PrefixStatus(attached.status(), absl::StrCat("start-up router ", router.path, ": "));
    }
    LogLine('I', absl::StrCat("attached router ", attached->name, " from ", router.path));
    if (router.make_default) {
      if (!default_router.empty() && default_router != attached->name) {
        return absl::InvalidArgumentError(
            absl::StrCat("two default routers: '", default_router, "' and '", attached->name, "'"));
      }
      default_router = attached->name;
    }
  }
  if (!default_router.empty()) {
    absl::Status status = engine_->SetDefaultRouter(default_router);
    if (!status.ok()) return PrefixStatus(status, "start-up default router: ");
    LogLine('I', absl::StrCat("default router ", default_router));
  }
  return absl::OkStatus();
}

void Server::SetServing(bool serving) {
  SetHealth(data_server_.get(), {v1::Inference::service_full_name()}, serving);
  if (options_.admin_on_data_port) {
    SetHealth(data_server_.get(), {v1::Admin::service_full_name()}, serving);
  }
  SetHealth(admin_server_.get(), {v1::Admin::service_full_name()}, serving);
}

void Server::StopPorts(absl::Duration grace) {
  const auto deadline = absl::ToChronoTime(absl::Now() + grace);
  if (data_server_ != nullptr) data_server_->Shutdown(deadline);
  if (admin_server_ != nullptr) admin_server_->Shutdown(deadline);
}

bool Server::Shutdown(absl::Duration drain_timeout) {
  bool already;
  {
    absl::MutexLock lock(&shutdown_mu_);
    already = shut_down_;
    shut_down_ = true;
  }
  if (already) {
    stopped_.WaitForNotification();
    absl::MutexLock lock(&shutdown_mu_);
    return drained_;
  }
  LogLine('I', absl::StrCat("draining for up to ", absl::FormatDuration(drain_timeout)));
  SetServing(false);
  const bool drained = engine_->Drain(drain_timeout);
  LogLine(drained ? 'I' : 'W',
          drained ? "drained" : "drain timed out: requests left ended with UNAVAILABLE");
  StopPorts(kShutdownGrace);
  {
    absl::MutexLock lock(&shutdown_mu_);
    drained_ = drained;
  }
  LogLine('I', "stopped");
  stopped_.Notify();
  return drained;
}

void Server::Wait() { stopped_.WaitForNotification(); }

}  // namespace moelora::server
