// moelora-loadgen: concurrent streaming Generate clients against a running moelora-server, with
// optional expert attach/detach cycles while they run. Prints a summary; --json_out writes every
// number (keys documented in tools/loadgen/loadgen.h). Exit code: 0, 1 when any request or
// Admin call failed (unless --allow_errors), 2 for bad flags, 3 when the run could not start
// (no server, a prompt that cannot fit, ...).

#include <cstdint>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "client/cli_commands.h"
#include "client/cli_format.h"
#include "tools/loadgen/loadgen.h"

// Connection, as moelora-cli takes it.
ABSL_FLAG(std::string, address, "localhost:50051", "Inference service address (host:port)");
ABSL_FLAG(std::string, admin_address, "localhost:50052",
          "Admin service address (host:port); used with --attach_dir");
ABSL_FLAG(std::string, admin_token_file, "",
          "File holding the admin bearer token; sent as 'authorization: Bearer <token>' on "
          "Admin calls");
ABSL_FLAG(std::string, tls_ca_file, "",
          "PEM CA certificates to verify the server with; enables TLS (any --tls_* flag does)");
ABSL_FLAG(std::string, tls_cert_file, "", "PEM client certificate chain for mutual TLS");
ABSL_FLAG(std::string, tls_key_file, "", "PEM client private key for mutual TLS");
ABSL_FLAG(absl::Duration, timeout, absl::Minutes(5),
          "Deadline per request (the whole stream) and per Admin call; inf = none");

// Load.
ABSL_FLAG(int32_t, clients, 4, "Concurrent streaming Generate clients (one thread each)");
ABSL_FLAG(int64_t, requests, 10, "Requests per client in the measured window");
ABSL_FLAG(double, duration_s, 0,
          "> 0: each client sends requests for this many seconds instead of --requests");
ABSL_FLAG(int64_t, warmup_requests, 0,
          "Requests per client before the measured window (not measured)");
ABSL_FLAG(int64_t, prompt_tokens, 16,
          "Prompt length: random token ids below the model's vocabulary (seeded)");
ABSL_FLAG(int64_t, max_tokens, 32,
          "New tokens per request (greedy, no stop tokens: exactly this many)");
ABSL_FLAG(uint64_t, seed, 0, "Seed of the random prompts");

// Routing controls, passed through on every request (moelora-cli's names).
ABSL_FLAG(std::string, router, "", "Router by name; empty: the server's default router");
ABSL_FLAG(std::string, weights, "", "Explicit routing weights, e.g. math:0.3,code:0.7");
ABSL_FLAG(std::string, pin, "", "Pin one expert at weight 1 for every token");
ABSL_FLAG(std::string, mask, "", "Experts not to use, e.g. math,code");

// Attach while serving.
ABSL_FLAG(std::string, attach_dir, "",
          "PEFT adapter directory on the server to attach and detach while the clients run");
ABSL_FLAG(int64_t, attach_cycles, 1, "Attach/detach cycles (with --attach_dir)");
ABSL_FLAG(int64_t, attach_interval_ms, 200, "Pause before each attach cycle, in milliseconds");

// Output.
ABSL_FLAG(std::string, json_out, "", "Also write every number as JSON to this file");
ABSL_FLAG(bool, allow_errors, false, "Exit 0 even when requests or Admin calls failed");

namespace moelora::loadgen {
namespace {

constexpr char kUsage[] = R"(load generator for a running moelora-server.

usage: moelora-loadgen [--address=HOST:PORT] [--clients=N] [--requests=N | --duration_s=S]
                       [--prompt_tokens=N] [--max_tokens=N] [--warmup_requests=N]
                       [--router --weights --pin --mask]
                       [--attach_dir=SERVER_DIR --attach_cycles=N --attach_interval_ms=MS
                        --admin_address --admin_token_file]
                       [--json_out=FILE] [--allow_errors]

exit codes: 0 ok, 1 some requests or Admin calls failed, 2 bad flags, 3 the run could not
start (no server, a prompt that cannot fit, ...))";

constexpr int kExitFailures = 1;
constexpr int kExitUsage = 2;
constexpr int kExitNotStarted = 3;

bool IsOurFlagFile(absl::string_view file) { return absl::EndsWith(file, "loadgen/main.cc"); }

int UsageError(const absl::Status& status) {
  std::cerr << "error: " << status.message() << "\nrun 'moelora-loadgen --help' for usage\n";
  return kExitUsage;
}

absl::StatusOr<LoadOptions> OptionsFromFlags() {
  LoadOptions options;
  options.address = absl::GetFlag(FLAGS_address);
  options.admin_address = absl::GetFlag(FLAGS_admin_address);
  options.tls = {.ca_file = absl::GetFlag(FLAGS_tls_ca_file),
                 .cert_file = absl::GetFlag(FLAGS_tls_cert_file),
                 .key_file = absl::GetFlag(FLAGS_tls_key_file)};
  options.timeout = absl::GetFlag(FLAGS_timeout);
  options.clients = absl::GetFlag(FLAGS_clients);
  options.requests_per_client = absl::GetFlag(FLAGS_requests);
  const double duration_s = absl::GetFlag(FLAGS_duration_s);
  if (!(duration_s >= 0) || duration_s > 1e7) {
    return absl::InvalidArgumentError("--duration_s must be in [0, 1e7]");
  }
  options.duration = absl::Seconds(duration_s);
  options.warmup_requests = absl::GetFlag(FLAGS_warmup_requests);
  options.prompt_tokens = absl::GetFlag(FLAGS_prompt_tokens);
  options.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  options.seed = absl::GetFlag(FLAGS_seed);
  absl::StatusOr<v1::RoutingControls> routing = cli::BuildRouting({
      .router = absl::GetFlag(FLAGS_router),
      .weights = absl::GetFlag(FLAGS_weights),
      .pin = absl::GetFlag(FLAGS_pin),
      .mask = absl::GetFlag(FLAGS_mask),
  });
  if (!routing.ok()) return routing.status();
  options.routing = *std::move(routing);
  options.attach_dir = absl::GetFlag(FLAGS_attach_dir);
  options.attach_cycles = options.attach_dir.empty() ? 0 : absl::GetFlag(FLAGS_attach_cycles);
  options.attach_interval = absl::Milliseconds(absl::GetFlag(FLAGS_attach_interval_ms));
  const std::string token_file = absl::GetFlag(FLAGS_admin_token_file);
  if (!token_file.empty()) {
    absl::StatusOr<std::string> token = cli::ReadTokenFile(token_file);
    if (!token.ok()) return token.status();
    options.admin_token = *std::move(token);
  }
  return options;
}

int Main(int argc, char** argv) {
  absl::SetProgramUsageMessage(kUsage);
  absl::SetFlagsUsageConfig(absl::FlagsUsageConfig{
      .contains_helpshort_flags = [](absl::string_view file) { return IsOurFlagFile(file); },
      .contains_help_flags = [](absl::string_view file) { return IsOurFlagFile(file); },
  });
  const std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() > 1) {
    return UsageError(absl::InvalidArgumentError(
        absl::StrCat("unexpected argument '", args[1], "' (flags only)")));
  }
  absl::StatusOr<LoadOptions> options = OptionsFromFlags();
  if (!options.ok()) return UsageError(options.status());

  absl::StatusOr<LoadReport> report = RunLoad(*options);
  if (!report.ok()) {
    std::cerr << cli::FormatError(report.status()) << "\n";
    return report.status().code() == absl::StatusCode::kInvalidArgument ? kExitUsage
                                                                        : kExitNotStarted;
  }
  std::cout << FormatSummary(*report) << std::flush;

  const std::string json_out = absl::GetFlag(FLAGS_json_out);
  if (!json_out.empty()) {
    std::ofstream out(json_out);
    out << ToJson(*report).dump(2) << "\n";
    out.close();
    if (!out) {
      std::cerr << "error: cannot write " << json_out << "\n";
      return kExitNotStarted;
    }
  }
  if (report->failures() > 0) {
    std::cerr << "error: " << report->failures() << " requests or Admin calls failed";
    if (!report->errors_by_code.empty()) {
      std::cerr << "; requests:";
      for (const auto& [code, count] : report->errors_by_code)
        std::cerr << " " << code << "=" << count;
    }
    if (report->warmup_failed > 0) std::cerr << "; warm-up requests: " << report->warmup_failed;
    if (!report->attach_errors_by_code.empty()) {
      std::cerr << "; admin calls:";
      for (const auto& [code, count] : report->attach_errors_by_code) {
        std::cerr << " " << code << "=" << count;
      }
    }
    std::cerr << "\n";
    if (!absl::GetFlag(FLAGS_allow_errors)) return kExitFailures;
  }
  return 0;
}

}  // namespace
}  // namespace moelora::loadgen

int main(int argc, char** argv) { return moelora::loadgen::Main(argc, argv); }
