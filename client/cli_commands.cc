#include "client/cli_commands.h"

#include <fstream>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"
#include "moelora/v1/admin.grpc.pb.h"
#include "moelora/v1/inference.grpc.pb.h"

namespace moelora::cli {
namespace {

using ::nlohmann::ordered_json;

absl::StatusOr<std::string> ReadFile(const std::string& path, absl::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(what, ": cannot open ", path));
  std::ostringstream contents;
  contents << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(what, ": cannot read ", path));
  return contents.str();
}

// Prints the error and returns its exit code.
int Fail(const CommandContext& command, const grpc::Status& status) {
  *command.err << FormatError(status) << "\n" << std::flush;
  return ExitCodeFor(status.error_code());
}

void PrintJson(const CommandContext& command, const ordered_json& json) {
  *command.out << json.dump(-1, ' ', false, ordered_json::error_handler_t::replace) << "\n"
               << std::flush;
}

std::string ServingStatusName(grpc::health::v1::HealthCheckResponse::ServingStatus status) {
  const std::string& name = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(status);
  return name.empty() ? absl::StrCat("STATUS_", static_cast<int>(status)) : name;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address,
                                                           const TlsFiles& tls) {
  if (address.empty()) return absl::InvalidArgumentError("the server address is empty");
  grpc::ChannelArguments args;
  // Score with a large top_n can exceed gRPC's default 4 MiB; the server enforces its own limit.
  args.SetMaxReceiveMessageSize(-1);
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (!tls.enabled()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    if (tls.cert_file.empty() != tls.key_file.empty()) {
      return absl::InvalidArgumentError("mutual TLS needs both --tls_cert_file and --tls_key_file");
    }
    grpc::SslCredentialsOptions options;
    if (!tls.ca_file.empty()) {
      absl::StatusOr<std::string> ca = ReadFile(tls.ca_file, "--tls_ca_file");
      if (!ca.ok()) return ca.status();
      options.pem_root_certs = *std::move(ca);
    }
    if (!tls.cert_file.empty()) {
      absl::StatusOr<std::string> cert = ReadFile(tls.cert_file, "--tls_cert_file");
      if (!cert.ok()) return cert.status();
      absl::StatusOr<std::string> key = ReadFile(tls.key_file, "--tls_key_file");
      if (!key.ok()) return key.status();
      options.pem_cert_chain = *std::move(cert);
      options.pem_private_key = *std::move(key);
    }
    credentials = grpc::SslCredentials(options);
  }
  return grpc::CreateCustomChannel(address, credentials, args);
}

absl::StatusOr<std::string> ReadTokenFile(const std::string& path) {
  absl::StatusOr<std::string> contents = ReadFile(path, "--admin_token_file");
  if (!contents.ok()) return contents.status();
  std::string token(absl::StripAsciiWhitespace(*contents));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--admin_token_file: ", path, " is empty"));
  }
  return token;
}

void PrepareContext(const CommandContext& command, grpc::ClientContext& context) {
  if (command.timeout != absl::InfiniteDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + command.timeout));
  }
  if (!command.bearer_token.empty()) {
    context.AddMetadata(kAuthorizationKey, absl::StrCat(kBearerPrefix, command.bearer_token));
  }
}

int RunGenerate(const CommandContext& command, const v1::GenerateRequest& request,
                bool stream_text) {
  auto stub = v1::Inference::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  GeneratePrinter printer(*command.out, command.format, request.return_routing(), stream_text);
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub->Generate(&context, request);
  v1::GenerateResponse message;
  while (reader->Read(&message)) printer.OnMessage(message);
  const grpc::Status status = reader->Finish();
  if (!status.ok()) {
    printer.Abort();
    return Fail(command, status);
  }
  printer.Finish();
  return kExitOk;
}

int RunScore(const CommandContext& command, const v1::ScoreRequest& request) {
  auto stub = v1::Inference::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::ScoreResponse response;
  const grpc::Status status = stub->Score(&context, request, &response);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, ToJson(response));
  } else {
    *command.out << FormatScore(request, response, request.return_routing()) << std::flush;
  }
  return kExitOk;
}

int RunInfo(const CommandContext& command) {
  auto stub = v1::Inference::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::ModelInfo info;
  const grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, ToJson(info));
  } else {
    *command.out << FormatModelInfo(info) << std::flush;
  }
  return kExitOk;
}

int RunListExperts(const CommandContext& command) {
  auto stub = v1::Admin::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::ListExpertsResponse response;
  const grpc::Status status = stub->ListExperts(&context, v1::ListExpertsRequest(), &response);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, ToJson(response));
  } else {
    *command.out << FormatListExperts(response) << std::flush;
  }
  return kExitOk;
}

int RunAttachExpert(const CommandContext& command, const std::string& name,
                    const std::string& path) {
  auto stub = v1::Admin::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::AttachExpertRequest request;
  request.set_name(name);
  request.set_path(path);
  v1::ExpertInfo expert;
  const grpc::Status status = stub->AttachExpert(&context, request, &expert);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, ToJson(expert));
  } else {
    *command.out << "attached " << FormatExpert(expert) << std::flush;
  }
  return kExitOk;
}

int RunDetachExpert(const CommandContext& command, const std::string& name, bool force) {
  auto stub = v1::Admin::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::DetachExpertRequest request;
  request.set_name(name);
  request.set_force(force);
  v1::DetachExpertResponse response;
  const grpc::Status status = stub->DetachExpert(&context, request, &response);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, {{"detached_expert", name}});
  } else {
    *command.out << "detached expert " << name << "\n" << std::flush;
  }
  return kExitOk;
}

int RunListRouters(const CommandContext& command) {
  auto stub = v1::Admin::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::ListRoutersResponse response;
  const grpc::Status status = stub->ListRouters(&context, v1::ListRoutersRequest(), &response);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, ToJson(response));
  } else {
    *command.out << FormatListRouters(response) << std::flush;
  }
  return kExitOk;
}

int RunAttachRouter(const CommandContext& command, const std::string& path, bool force) {
  auto stub = v1::Admin::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::AttachRouterRequest request;
  request.set_path(path);
  request.set_force(force);
  v1::RouterInfo router;
  const grpc::Status status = stub->AttachRouter(&context, request, &router);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, ToJson(router));
  } else {
    *command.out << "attached " << FormatRouter(router) << std::flush;
  }
  return kExitOk;
}

int RunDetachRouter(const CommandContext& command, const std::string& name) {
  auto stub = v1::Admin::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::DetachRouterRequest request;
  request.set_name(name);
  v1::DetachRouterResponse response;
  const grpc::Status status = stub->DetachRouter(&context, request, &response);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, {{"detached_router", name}});
  } else {
    *command.out << "detached router " << name << "\n" << std::flush;
  }
  return kExitOk;
}

int RunSetDefaultRouter(const CommandContext& command, const std::string& name) {
  auto stub = v1::Admin::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  v1::SetDefaultRouterRequest request;
  request.set_name(name);
  v1::SetDefaultRouterResponse response;
  const grpc::Status status = stub->SetDefaultRouter(&context, request, &response);
  if (!status.ok()) return Fail(command, status);
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, {{"default_router", name}});
  } else if (name.empty()) {
    *command.out << "no default router\n" << std::flush;
  } else {
    *command.out << "default router: " << name << "\n" << std::flush;
  }
  return kExitOk;
}

int RunHealth(const CommandContext& command, const std::string& service) {
  auto stub = grpc::health::v1::Health::NewStub(command.channel);
  grpc::ClientContext context;
  PrepareContext(command, context);
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) return Fail(command, status);
  const std::string name = ServingStatusName(response.status());
  if (command.format == OutputFormat::kJson) {
    PrintJson(command, {{"service", service}, {"status", name}});
  } else {
    *command.out << name << "\n" << std::flush;
  }
  return response.status() == grpc::health::v1::HealthCheckResponse::SERVING ? kExitOk
                                                                             : kExitNotServing;
}

}  // namespace moelora::cli
