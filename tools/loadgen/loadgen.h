#ifndef MOELORA_TOOLS_LOADGEN_LOADGEN_H_
#define MOELORA_TOOLS_LOADGEN_LOADGEN_H_

// moelora-loadgen's logic: N concurrent clients streaming Generate against a running daemon, each
// request timed from the client's side (time to first token, the gaps between token messages,
// end to end), optionally while an Admin thread attaches and detaches an expert over and over,
// timing each attach and telling apart the token gaps that overlapped an attach from the rest.
// No torch and no moelora_core: it speaks to the daemon through the generated stubs only.
//
// JSON report (ToJson), stable keys; times in milliseconds unless the key says otherwise:
//   config:  address, clients, requests_per_client (0 with duration_s), duration_s (0 with
//            requests_per_client), warmup_requests (per client), prompt_tokens, max_tokens, seed,
//            routing (the RoutingControls sent, as proto3 JSON with the proto field names,
//            e.g. {"pinned_expert": "math"}; {} for none),
//            attach_dir ("" without attach), attach_cycles, attach_interval_ms
//   server:  model_type, device, dtype, vocab_size, max_running_requests, max_seq_len
//   requests:  measured requests: total, ok, failed, errors_by_code ({"UNAVAILABLE": 2, ...}),
//              warmup_total, warmup_failed
//   tokens:    generated (tokens received by the measured requests, failed ones included),
//              prompt (prompt tokens sent by the measured requests)
//   wall_s:                   the measured window: all warm-ups done -> the last request ended
//   output_tokens_per_s:      tokens.generated / wall_s
//   requests_per_s:           requests.total / wall_s
//   ttft_ms, tpot_ms, e2e_ms, gaps.during_attach_ms, gaps.outside_attach_ms,
//   attach.attach_ms, attach.detach_ms: distributions, each
//       {count, mean, p50, p90, p99, max} (all 0 when count is 0)
//     ttft_ms:  send -> first message with a token, successful requests
//     tpot_ms:  time per output token: each gap between consecutive token messages divided by the
//               tokens in the later message, one sample per token, successful requests
//     e2e_ms:   send -> the stream's status, successful requests
//     gaps.*:   raw gaps between consecutive token messages (not divided), all measured
//               requests, split by whether the gap overlaps an attach window (AttachExpert sent ->
//               DetachExpert answered); compare during_attach_ms.max with outside_attach_ms.p50
//               (about one engine step) to judge whether an attach delayed a step
//   attach:   cycles (attempted), rank (the server's ExpertInfo.rank of the adapter; 0 when no
//             attach succeeded), attach_failed, detach_failed, errors_by_code,
//             attach_ms (AttachExpert round trips, successful ones), detach_ms (likewise),
//             attach_ms_samples (every successful attach, in order)

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "client/cli_commands.h"
#include "moelora/v1/common.pb.h"
#include "nlohmann/json.hpp"

namespace moelora::loadgen {

struct LoadOptions {
  // Inference service, and the Admin service (only needed with attach_dir).
  std::string address = "localhost:50051";
  std::string admin_address = "localhost:50052";
  cli::TlsFiles tls;
  // Sent as "authorization: Bearer <token>" on Admin calls when not empty.
  std::string admin_token;

  // Concurrent streaming clients, one thread each.
  int clients = 1;
  // Requests each client sends in the measured window; ignored when duration > 0.
  int64_t requests_per_client = 10;
  // > 0: each client keeps sending requests until this much of the window has passed (a request
  // in flight then finishes).
  absl::Duration duration = absl::ZeroDuration();
  // Requests each client sends before the measured window (not measured).
  int64_t warmup_requests = 0;
  // Prompt length in random token ids in [0, vocab_size), seeded by `seed` and the client.
  int64_t prompt_tokens = 16;
  // New tokens asked for per request (greedy, no stop tokens: exactly this many).
  int64_t max_tokens = 32;
  uint64_t seed = 0;
  // Passed through on every request.
  v1::RoutingControls routing;
  // Deadline per request (the whole stream) and per Admin call; InfiniteDuration: none.
  absl::Duration timeout = absl::Minutes(5);

  // Attach while serving: with a (server-side) PEFT adapter directory and attach_cycles > 0, a
  // thread waits attach_interval, attaches the directory under a new name, detaches it, and
  // again, attach_cycles times, starting with the measured window.
  std::string attach_dir;
  int64_t attach_cycles = 0;
  absl::Duration attach_interval = absl::Milliseconds(200);
};

// Summary statistics of samples in milliseconds; all 0 when there are none.
struct Distribution {
  int64_t count = 0;
  double mean = 0;
  double p50 = 0;
  double p90 = 0;
  double p99 = 0;
  double max = 0;
};

// The p-th percentile (p in [0, 100]) of sorted samples, interpolating linearly between the
// closest ranks (numpy's default); 0 for no samples.
double Percentile(const std::vector<double>& sorted, double p);
// Sorts a copy of `samples` and summarises it.
Distribution Summarize(std::vector<double> samples);

struct LoadReport {
  LoadOptions options;

  // From GetModelInfo.
  std::string model_type;
  std::string device;
  std::string dtype;
  int64_t vocab_size = 0;
  int64_t max_running_requests = 0;
  int64_t max_seq_len = 0;

  int64_t requests_total = 0;
  int64_t requests_ok = 0;
  int64_t requests_failed = 0;
  // gRPC code name ("UNAVAILABLE") -> measured requests that ended with it.
  std::map<std::string, int64_t> errors_by_code;
  int64_t warmup_total = 0;
  int64_t warmup_failed = 0;

  int64_t generated_tokens = 0;
  int64_t prompt_tokens = 0;
  double wall_seconds = 0;
  double output_tokens_per_second = 0;
  double requests_per_second = 0;

  Distribution ttft_ms;
  Distribution tpot_ms;
  Distribution e2e_ms;
  Distribution gaps_during_attach_ms;
  Distribution gaps_outside_attach_ms;

  int64_t attach_cycles = 0;
  // ExpertInfo.rank of the attached adapter (0 when no attach succeeded).
  int64_t attach_rank = 0;
  int64_t attach_failed = 0;
  int64_t detach_failed = 0;
  std::map<std::string, int64_t> attach_errors_by_code;
  Distribution attach_ms;
  Distribution detach_ms;
  std::vector<double> attach_ms_samples;

  // Failed requests (warm-up included) and failed Admin calls.
  int64_t failures() const {
    return requests_failed + warmup_failed + attach_failed + detach_failed;
  }
};

// Asks the server for its model (vocabulary, limits), runs the warm-ups, then the measured window
// with the attach thread alongside. Errors: InvalidArgument for bad options or a prompt that
// cannot fit the server's max_seq_len; the GetModelInfo status when the server does not answer.
// Failed requests are counted in the report, not returned as errors.
absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options);

// Windows [start, end] during which an attach cycle ran, and gaps [from, to] between token
// messages: whether a gap overlaps a window. Exposed for tests.
using Clock = std::chrono::steady_clock;
struct TimeWindow {
  Clock::time_point start;
  Clock::time_point end;
};
// `windows` sorted by start and not overlapping.
bool OverlapsAny(const std::vector<TimeWindow>& windows, Clock::time_point from,
                 Clock::time_point to);

// The report as JSON (the keys above), and as a few lines for people.
nlohmann::ordered_json ToJson(const LoadReport& report);
std::string FormatSummary(const LoadReport& report);

}  // namespace moelora::loadgen

#endif  // MOELORA_TOOLS_LOADGEN_LOADGEN_H_
