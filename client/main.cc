// moelora-cli: the command-line client of the moelora daemon. See client/README.md.

#include <cstdint>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "client/cli_commands.h"
#include "client/cli_format.h"

// Connection.
ABSL_FLAG(std::string, address, "localhost:50051", "Inference service address (host:port)");
ABSL_FLAG(std::string, admin_address, "localhost:50052", "Admin service address (host:port)");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the admin bearer token; sent as 'authorization: Bearer <token>' on "
          "Admin calls");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA certificates to verify the server with; enables TLS (any --tls_* flag does, "
          "with the system roots when this one is empty)");
ABSL_FLAG(std::string, tls_cert_file, "", "PEM client certificate chain for mutual TLS");
ABSL_FLAG(std::string, tls_key_file, "", "PEM client private key for mutual TLS");
ABSL_FLAG(absl::Duration, timeout, absl::InfiniteDuration(),
          "Deadline per call, e.g. 5s or 500ms (a Generate stream as a whole); inf = none");
ABSL_FLAG(bool, json, false,
          "Machine-readable output: one JSON object per line (generate: one per streamed "
          "message, then a summary)");

// generate / score.
ABSL_FLAG(std::string, request_id, "", "Request id for the server's logs (generate, score)");
ABSL_FLAG(std::string, prompt_ids, "", "generate: the prompt as token ids, e.g. 1,2,3");
ABSL_FLAG(std::string, prompt, "",
          "generate, score: the prompt as text (the server needs a tokenizer)");
ABSL_FLAG(int64_t, max_new_tokens, 16, "generate: tokens to generate at most (0: server's 16)");
ABSL_FLAG(double, temperature, 0, "generate: sampling temperature; 0 = greedy");
ABSL_FLAG(int64_t, top_k, 0, "generate: keep the k most likely tokens; 0 = off");
ABSL_FLAG(double, top_p, 0, "generate: nucleus sampling threshold; 0 or 1 = off");
ABSL_FLAG(uint64_t, seed, 0, "generate: sampling seed");
ABSL_FLAG(std::string, stop_ids, "", "generate: stop after emitting one of these ids, e.g. 2,7");
ABSL_FLAG(bool, stream_text, false,
          "generate: stream the text (server-side tokenizer) instead of the token ids");
ABSL_FLAG(std::string, ids, "", "score: token ids to score, e.g. 1,2,3 (at least two)");
ABSL_FLAG(int64_t, top_n, 0, "score: also show the top_n most likely tokens at each position");

// Routing controls (generate, score).
ABSL_FLAG(std::string, router, "", "Router by name; empty: the server's default router");
ABSL_FLAG(std::string, weights, "", "Explicit routing weights, e.g. math:0.3,code:0.7");
ABSL_FLAG(std::string, pin, "", "Pin one expert at weight 1 for every token");
ABSL_FLAG(std::string, mask, "", "Experts not to use, e.g. math,code");
ABSL_FLAG(std::optional<int64_t>, route_top_k, std::nullopt,
          "Router override: 0 = dense, k = keep the k largest logits");
ABSL_FLAG(std::optional<double>, route_temperature, std::nullopt,
          "Router override: softmax temperature (> 0)");
ABSL_FLAG(bool, show_routing, false, "Ask for and print the routing weights of each token");

// Admin.
ABSL_FLAG(std::string, name, "", "experts attach|detach, routers detach|default: the name");
ABSL_FLAG(std::string, path, "",
          "experts attach, routers attach: the directory on the server to load");
ABSL_FLAG(bool, force, false,
          "experts detach: even when a router names it; routers attach: even when some of its "
          "experts are not attached");
ABSL_FLAG(bool, clear, false, "routers default: unset the default router");

// Health.
ABSL_FLAG(std::string, service, "",
          "health: service to check, e.g. moelora.v1.Inference; empty = the whole server");

namespace moelora::cli {
namespace {

constexpr char kUsage[] = R"(the moelora daemon's command-line client.

usage: moelora-cli <command> [flags]

  generate             --prompt_ids=1,2,3 | --prompt=TEXT  [--max_new_tokens --temperature
                       --top_k --top_p --seed --stop_ids --stream_text] [routing] [--show_routing]
  score                --ids=1,2,3 | --prompt=TEXT  [--top_n] [routing] [--show_routing]
  info                 the model, its limits, the experts and routers
  experts list
  experts attach       --name=NAME --path=SERVER_DIR
  experts detach       --name=NAME [--force]
  routers list
  routers attach       --path=SERVER_DIR [--force]
  routers detach       --name=NAME
  routers default      --name=NAME | --clear
  health [admin]       grpc.health.v1 Check on --address (or --admin_address) [--service]

routing: --router=NAME --weights=a:0.5,b:1 --pin=NAME --mask=a,b --route_top_k=K
         --route_temperature=T
global:  --address --admin_address --admin_token_file --tls_ca_file --tls_cert_file
         --tls_key_file --timeout=5s --json

exit codes: 0 ok, 1 other error, 2 usage, 3 unavailable, 4 deadline exceeded, 5 request
rejected (invalid argument, out of range, failed precondition), 6 not found / already exists,
7 unauthenticated / permission denied, 8 resource exhausted, 9 health not SERVING)";

bool IsOurFlagFile(absl::string_view file) { return absl::EndsWith(file, "client/main.cc"); }

int UsageError(absl::string_view message) {
  std::cerr << "error: " << message << "\n"
            << "run 'moelora-cli --help' for usage\n";
  return kExitUsage;
}

int LocalError(const absl::Status& status) {
  std::cerr << FormatError(status) << "\n";
  return status.code() == absl::StatusCode::kInvalidArgument ? kExitUsage : kExitError;
}

RoutingFlags RoutingFromFlags() {
  return RoutingFlags{
      .router = absl::GetFlag(FLAGS_router),
      .weights = absl::GetFlag(FLAGS_weights),
      .pin = absl::GetFlag(FLAGS_pin),
      .mask = absl::GetFlag(FLAGS_mask),
      .top_k = absl::GetFlag(FLAGS_route_top_k),
      .temperature = absl::GetFlag(FLAGS_route_temperature),
      .show_routing = absl::GetFlag(FLAGS_show_routing),
  };
}

// A context on the inference (admin = false) or admin channel. The admin token goes with
// admin calls only.
absl::StatusOr<CommandContext> MakeCommandContext(bool admin) {
  const TlsFiles tls{.ca_file = absl::GetFlag(FLAGS_tls_ca_file),
                     .cert_file = absl::GetFlag(FLAGS_tls_cert_file),
                     .key_file = absl::GetFlag(FLAGS_tls_key_file)};
  const std::string address =
      admin ? absl::GetFlag(FLAGS_admin_address) : absl::GetFlag(FLAGS_address);
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(address, tls);
  if (!channel.ok()) return channel.status();
  CommandContext context{
      .channel = *std::move(channel),
      .timeout = absl::GetFlag(FLAGS_timeout),
      .format = absl::GetFlag(FLAGS_json) ? OutputFormat::kJson : OutputFormat::kHuman,
      .out = &std::cout,
      .err = &std::cerr,
  };
  if (context.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--timeout must be > 0 (inf for none)");
  }
  const std::string token_file = absl::GetFlag(FLAGS_admin_token_file);
  if (admin && !token_file.empty()) {
    absl::StatusOr<std::string> token = ReadTokenFile(token_file);
    if (!token.ok()) return token.status();
    context.bearer_token = *std::move(token);
  }
  return context;
}

int Generate() {
  const GenerateFlags flags{
      .request_id = absl::GetFlag(FLAGS_request_id),
      .prompt_ids = absl::GetFlag(FLAGS_prompt_ids),
      .prompt = absl::GetFlag(FLAGS_prompt),
      .max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens),
      .temperature = absl::GetFlag(FLAGS_temperature),
      .top_k = absl::GetFlag(FLAGS_top_k),
      .top_p = absl::GetFlag(FLAGS_top_p),
      .seed = absl::GetFlag(FLAGS_seed),
      .stop_ids = absl::GetFlag(FLAGS_stop_ids),
      .routing = RoutingFromFlags(),
  };
  absl::StatusOr<v1::GenerateRequest> request = BuildGenerateRequest(flags);
  if (!request.ok()) return LocalError(request.status());
  absl::StatusOr<CommandContext> context = MakeCommandContext(/*admin=*/false);
  if (!context.ok()) return LocalError(context.status());
  return RunGenerate(*context, *request, absl::GetFlag(FLAGS_stream_text));
}

int Score() {
  const ScoreFlags flags{
      .request_id = absl::GetFlag(FLAGS_request_id),
      .ids = absl::GetFlag(FLAGS_ids),
      .text = absl::GetFlag(FLAGS_prompt),
      .top_n = absl::GetFlag(FLAGS_top_n),
      .routing = RoutingFromFlags(),
  };
  absl::StatusOr<v1::ScoreRequest> request = BuildScoreRequest(flags);
  if (!request.ok()) return LocalError(request.status());
  absl::StatusOr<CommandContext> context = MakeCommandContext(/*admin=*/false);
  if (!context.ok()) return LocalError(context.status());
  return RunScore(*context, *request);
}

int Experts(const std::vector<std::string>& args) {
  if (args.size() != 1) return UsageError("usage: moelora-cli experts list|attach|detach");
  const std::string& action = args[0];
  const std::string name = absl::GetFlag(FLAGS_name);
  if (action != "list" && action != "attach" && action != "detach") {
    return UsageError(
        absl::StrCat("unknown experts command '", action, "' (list, attach, detach)"));
  }
  if (action != "list" && name.empty()) {
    return UsageError(absl::StrCat("experts ", action, " needs --name"));
  }
  if (action == "attach" && absl::GetFlag(FLAGS_path).empty()) {
    return UsageError("experts attach needs --path (an adapter directory on the server)");
  }
  absl::StatusOr<CommandContext> context = MakeCommandContext(/*admin=*/true);
  if (!context.ok()) return LocalError(context.status());
  if (action == "list") return RunListExperts(*context);
  if (action == "attach") return RunAttachExpert(*context, name, absl::GetFlag(FLAGS_path));
  return RunDetachExpert(*context, name, absl::GetFlag(FLAGS_force));
}

int Routers(const std::vector<std::string>& args) {
  if (args.size() != 1) return UsageError("usage: moelora-cli routers list|attach|detach|default");
  const std::string& action = args[0];
  const std::string name = absl::GetFlag(FLAGS_name);
  const bool clear = absl::GetFlag(FLAGS_clear);
  if (action == "attach") {
    if (absl::GetFlag(FLAGS_path).empty()) {
      return UsageError("routers attach needs --path (a router directory on the server)");
    }
  } else if (action == "detach") {
    if (name.empty()) return UsageError("routers detach needs --name");
  } else if (action == "default") {
    if (name.empty() == !clear) {
      return UsageError("routers default needs --name=NAME, or --clear to unset it");
    }
  } else if (action != "list") {
    return UsageError(
        absl::StrCat("unknown routers command '", action, "' (list, attach, detach, default)"));
  }
  absl::StatusOr<CommandContext> context = MakeCommandContext(/*admin=*/true);
  if (!context.ok()) return LocalError(context.status());
  if (action == "list") return RunListRouters(*context);
  if (action == "attach") {
    return RunAttachRouter(*context, absl::GetFlag(FLAGS_path), absl::GetFlag(FLAGS_force));
  }
  if (action == "detach") return RunDetachRouter(*context, name);
  return RunSetDefaultRouter(*context, clear ? "" : name);
}

int Health(const std::vector<std::string>& args) {
  if (args.size() > 1 || (args.size() == 1 && args[0] != "admin")) {
    return UsageError("usage: moelora-cli health [admin]");
  }
  absl::StatusOr<CommandContext> context = MakeCommandContext(/*admin=*/!args.empty());
  if (!context.ok()) return LocalError(context.status());
  return RunHealth(*context, absl::GetFlag(FLAGS_service));
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  // --help lists this file's flags (absl's default looks for a file named after the binary).
  absl::SetFlagsUsageConfig(absl::FlagsUsageConfig{
      .contains_helpshort_flags = [](absl::string_view file) { return IsOurFlagFile(file); },
      .contains_help_flags = [](absl::string_view file) { return IsOurFlagFile(file); },
  });
  const std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() < 2) return UsageError("no command given");
  const std::string command = positional[1];
  const std::vector<std::string> args(positional.begin() + 2, positional.end());
  auto no_args = [&](auto run) {
    if (!args.empty()) {
      return UsageError(
          absl::StrCat("unexpected arguments after '", command, "': ", absl::StrJoin(args, " ")));
    }
    return run();
  };
  if (command == "generate") return no_args(Generate);
  if (command == "score") return no_args(Score);
  if (command == "info") {
    return no_args([] {
      absl::StatusOr<CommandContext> context = MakeCommandContext(/*admin=*/false);
      if (!context.ok()) return LocalError(context.status());
      return RunInfo(*context);
    });
  }
  if (command == "experts") return Experts(args);
  if (command == "routers") return Routers(args);
  if (command == "health") return Health(args);
  return UsageError(absl::StrCat("unknown command '", command, "'"));
}

}  // namespace
}  // namespace moelora::cli

int main(int argc, char** argv) { return moelora::cli::Main(argc, argv); }
