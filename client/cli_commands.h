#ifndef MOELORA_CLIENT_CLI_COMMANDS_H_
#define MOELORA_CLIENT_CLI_COMMANDS_H_

// moelora-cli's commands: each makes one RPC (Generate streams) on a channel it is given, prints
// the answer to `out` in the chosen format, and returns the process exit code (cli_format.h).
// Errors go to `err` as "error: <CODE>: <message>".

#include <memory>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/cli_format.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"

namespace moelora::cli {

// The metadata key and value prefix the Admin service reads its token from.
inline constexpr char kAuthorizationKey[] = "authorization";
inline constexpr char kBearerPrefix[] = "Bearer ";

struct TlsFiles {
  std::string ca_file;    // PEM roots to verify the server with; empty: the system's roots
  std::string cert_file;  // client certificate chain (mTLS), with key_file
  std::string key_file;
  // TLS at all: any of the three files given.
  bool enabled() const { return !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
};

// A channel to `address`: plaintext without TLS files; TLS with --tls_ca_file; mutual TLS with
// --tls_cert_file and --tls_key_file too. Reads the files now (NotFound, InvalidArgument).
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const std::string& address,
                                                           const TlsFiles& tls);

// The token in `path`, surrounding whitespace stripped; InvalidArgument when empty.
absl::StatusOr<std::string> ReadTokenFile(const std::string& path);

// What every command needs.
struct CommandContext {
  std::shared_ptr<grpc::Channel> channel;
  // Sent as "authorization: Bearer <token>" when not empty.
  std::string bearer_token;
  // Per RPC (for Generate: the whole stream); InfiniteDuration: none.
  absl::Duration timeout = absl::InfiniteDuration();
  OutputFormat format = OutputFormat::kHuman;
  std::ostream* out = nullptr;
  std::ostream* err = nullptr;
};

// Sets the deadline and the authorization metadata.
void PrepareContext(const CommandContext& command, grpc::ClientContext& context);

// Inference service.
int RunGenerate(const CommandContext& command, const v1::GenerateRequest& request,
                bool stream_text);
int RunScore(const CommandContext& command, const v1::ScoreRequest& request);
int RunInfo(const CommandContext& command);

// Admin service.
int RunListExperts(const CommandContext& command);
int RunAttachExpert(const CommandContext& command, const std::string& name,
                    const std::string& path);
int RunDetachExpert(const CommandContext& command, const std::string& name, bool force);
int RunListRouters(const CommandContext& command);
int RunAttachRouter(const CommandContext& command, const std::string& path, bool force);
int RunDetachRouter(const CommandContext& command, const std::string& name);
// Empty name: no default router.
int RunSetDefaultRouter(const CommandContext& command, const std::string& name);

// grpc.health.v1.Health/Check; empty service: the server as a whole. Prints the serving status;
// kExitNotServing unless SERVING.
int RunHealth(const CommandContext& command, const std::string& service);

}  // namespace moelora::cli

#endif  // MOELORA_CLIENT_CLI_COMMANDS_H_
