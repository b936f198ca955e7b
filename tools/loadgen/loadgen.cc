#include "tools/loadgen/loadgen.h"

#include <algorithm>
#include <cmath>
#include <latch>
#include <limits>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/cli_format.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/client_context.h"
#include "moelora/v1/admin.grpc.pb.h"
#include "moelora/v1/inference.grpc.pb.h"

namespace moelora::loadgen {
namespace {

using ::nlohmann::ordered_json;

double Milliseconds(Clock::duration duration) {
  return std::chrono::duration<double, std::milli>(duration).count();
}

// One Generate stream as the client saw it.
struct RequestRecord {
  bool ok = false;
  grpc::StatusCode code = grpc::StatusCode::OK;
  Clock::time_point sent;
  Clock::time_point done;
  // Messages that carried tokens: when each arrived and how many tokens it had.
  std::vector<Clock::time_point> message_times;
  std::vector<int> message_tokens;
  int64_t tokens = 0;
  int64_t prompt_tokens = 0;
};

RequestRecord RunRequest(v1::Inference::Stub& stub, const cli::CommandContext& command,
                         const LoadOptions& options, int64_t vocab_size, std::mt19937_64& rng,
                         const std::string& request_id) {
  v1::GenerateRequest request;
  request.set_request_id(request_id);
  std::uniform_int_distribution<int64_t> token(0, vocab_size - 1);
  for (int64_t i = 0; i < options.prompt_tokens; ++i) request.add_prompt_token_ids(token(rng));
  request.mutable_sampling()->set_max_new_tokens(static_cast<uint32_t>(options.max_tokens));
  request.mutable_sampling()->set_temperature(0);
  *request.mutable_routing() = options.routing;

  RequestRecord record;
  record.prompt_tokens = options.prompt_tokens;
  grpc::ClientContext context;
  cli::PrepareContext(command, context);
  record.sent = Clock::now();
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub.Generate(&context, request);
  v1::GenerateResponse message;
  while (reader->Read(&message)) {
    const Clock::time_point now = Clock::now();
    if (message.token_ids_size() == 0) continue;
    record.message_times.push_back(now);
    record.message_tokens.push_back(message.token_ids_size());
    record.tokens += message.token_ids_size();
  }
  const grpc::Status status = reader->Finish();
  record.done = Clock::now();
  record.ok = status.ok();
  record.code = status.error_code();
  return record;
}

// What one client thread did.
struct ClientResult {
  std::vector<RequestRecord> measured;
  int64_t warmup_total = 0;
  int64_t warmup_failed = 0;
};

// What the attach thread did.
struct AttachResult {
  std::vector<TimeWindow> windows;
  std::vector<double> attach_ms;
  std::vector<double> detach_ms;
  int64_t rank = 0;
  int64_t cycles = 0;
  int64_t attach_failed = 0;
  int64_t detach_failed = 0;
  std::map<std::string, int64_t> errors_by_code;
};

AttachResult RunAttachCycles(const cli::CommandContext& command, const LoadOptions& options) {
  AttachResult result;
  auto stub = v1::Admin::NewStub(command.channel);
  // Unique per run, so that a run interrupted before its detach does not make the next collide.
  const std::string prefix = absl::StrCat("loadgen-", absl::ToUnixMillis(absl::Now()) % 100000000);
  for (int64_t cycle = 0; cycle < options.attach_cycles; ++cycle) {
    absl::SleepFor(options.attach_interval);
    ++result.cycles;
    const std::string name = absl::StrCat(prefix, "-", cycle);
    TimeWindow window;
    {
      grpc::ClientContext context;
      cli::PrepareContext(command, context);
      v1::AttachExpertRequest request;
      request.set_name(name);
      request.set_path(options.attach_dir);
      v1::ExpertInfo expert;
      window.start = Clock::now();
      const grpc::Status status = stub->AttachExpert(&context, request, &expert);
      window.end = Clock::now();
      if (!status.ok()) {
        ++result.attach_failed;
        ++result.errors_by_code[cli::GrpcCodeName(status.error_code())];
        result.windows.push_back(window);
        continue;
      }
      result.attach_ms.push_back(Milliseconds(window.end - window.start));
      result.rank = expert.rank();
    }
    {
      grpc::ClientContext context;
      cli::PrepareContext(command, context);
      v1::DetachExpertRequest request;
      request.set_name(name);
      request.set_force(true);
      v1::DetachExpertResponse response;
      const Clock::time_point sent = Clock::now();
      const grpc::Status status = stub->DetachExpert(&context, request, &response);
      window.end = Clock::now();
      if (status.ok()) {
        result.detach_ms.push_back(Milliseconds(window.end - sent));
      } else {
        ++result.detach_failed;
        ++result.errors_by_code[cli::GrpcCodeName(status.error_code())];
      }
    }
    result.windows.push_back(window);
  }
  return result;
}

absl::Status Validate(const LoadOptions& options) {
  if (options.clients < 1) return absl::InvalidArgumentError("clients must be >= 1");
  if (options.duration < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the duration must be >= 0");
  }
  if (options.duration == absl::ZeroDuration() && options.requests_per_client < 1) {
    return absl::InvalidArgumentError("requests per client must be >= 1 (or give a duration)");
  }
  if (options.warmup_requests < 0) {
    return absl::InvalidArgumentError("warm-up requests must be >= 0");
  }
  if (options.prompt_tokens < 1) return absl::InvalidArgumentError("prompt tokens must be >= 1");
  if (options.max_tokens < 1 || options.max_tokens > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError("max tokens must be in [1, 2^32)");
  }
  if (options.timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the timeout must be > 0 (infinite for none)");
  }
  if (options.attach_cycles < 0) return absl::InvalidArgumentError("attach cycles must be >= 0");
  if (options.attach_cycles > 0 && options.attach_dir.empty()) {
    return absl::InvalidArgumentError("attach cycles need an adapter directory");
  }
  if (options.attach_interval < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the attach interval must be >= 0");
  }
  return absl::OkStatus();
}

absl::Status FromGrpc(const grpc::Status& status, absl::string_view what) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      absl::StrCat(what, ": ", status.error_message()));
}

ordered_json ToJson(const Distribution& d) {
  return {{"count", d.count}, {"mean", d.mean}, {"p50", d.p50},
          {"p90", d.p90},     {"p99", d.p99},   {"max", d.max}};
}

std::string FormatDistribution(const Distribution& d) {
  if (d.count == 0) return "no samples";
  return absl::StrFormat("p50 %.2f  p90 %.2f  p99 %.2f  max %.2f ms  (n=%d)", d.p50, d.p90, d.p99,
                         d.max, d.count);
}

std::string FormatCodes(const std::map<std::string, int64_t>& codes) {
  std::string text;
  for (const auto& [code, count] : codes) absl::StrAppend(&text, " ", code, "=", count);
  return text;
}

}  // namespace

double Percentile(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(sorted.size() - 1);
  const size_t below = static_cast<size_t>(std::floor(rank));
  const size_t above = std::min(below + 1, sorted.size() - 1);
  const double fraction = rank - static_cast<double>(below);
  return sorted[below] + (sorted[above] - sorted[below]) * fraction;
}

Distribution Summarize(std::vector<double> samples) {
  Distribution d;
  if (samples.empty()) return d;
  std::sort(samples.begin(), samples.end());
  d.count = static_cast<int64_t>(samples.size());
  double sum = 0;
  for (double sample : samples) sum += sample;
  d.mean = sum / static_cast<double>(samples.size());
  d.p50 = Percentile(samples, 50);
  d.p90 = Percentile(samples, 90);
  d.p99 = Percentile(samples, 99);
  d.max = samples.back();
  return d;
}

bool OverlapsAny(const std::vector<TimeWindow>& windows, Clock::time_point from,
                 Clock::time_point to) {
  // The last window that starts before `to`; any earlier one ends before it starts.
  auto after = std::upper_bound(
      windows.begin(), windows.end(), to,
      [](Clock::time_point t, const TimeWindow& window) { return t <= window.start; });
  if (after == windows.begin()) return false;
  return std::prev(after)->end > from;
}

absl::StatusOr<LoadReport> RunLoad(const LoadOptions& options) {
  if (absl::Status status = Validate(options); !status.ok()) return status;
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel =
      cli::MakeChannel(options.address, options.tls);
  if (!channel.ok()) return channel.status();
  const cli::CommandContext inference{.channel = *channel, .timeout = options.timeout};
  cli::CommandContext admin;
  if (options.attach_cycles > 0) {
    absl::StatusOr<std::shared_ptr<grpc::Channel>> admin_channel =
        cli::MakeChannel(options.admin_address, options.tls);
    if (!admin_channel.ok()) return admin_channel.status();
    admin = {
        .channel = *admin_channel, .bearer_token = options.admin_token, .timeout = options.timeout};
  }

  LoadReport report;
  report.options = options;
  auto stub = v1::Inference::NewStub(*channel);
  {
    grpc::ClientContext context;
    cli::PrepareContext(inference, context);
    v1::ModelInfo info;
    const grpc::Status status = stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
    if (!status.ok()) return FromGrpc(status, absl::StrCat("GetModelInfo on ", options.address));
    report.model_type = info.model_type();
    report.device = info.device();
    report.dtype = info.dtype();
    report.vocab_size = info.vocab_size();
    report.max_running_requests = info.limits().max_running_requests();
    report.max_seq_len = info.limits().max_seq_len();
    if (report.vocab_size < 1) return absl::FailedPreconditionError("the server has no vocabulary");
    if (options.prompt_tokens + options.max_tokens > report.max_seq_len) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt tokens + max tokens = ", options.prompt_tokens + options.max_tokens,
                       " exceeds the server's max_seq_len ", report.max_seq_len));
    }
    if (info.limits().max_batch_tokens() > 0 &&
        options.prompt_tokens > info.limits().max_batch_tokens()) {
      return absl::InvalidArgumentError(absl::StrCat("prompt tokens ", options.prompt_tokens,
                                                     " exceeds the server's max_batch_tokens ",
                                                     info.limits().max_batch_tokens()));
    }
  }

  // Clients warm up, the window starts once all of them have, then they and the attach thread go.
  std::latch warmed(options.clients);
  std::latch go(1);
  Clock::time_point start;
  std::vector<ClientResult> results(options.clients);
  std::vector<std::thread> clients;
  for (int c = 0; c < options.clients; ++c) {
    clients.emplace_back([&, c] {
      ClientResult& result = results[c];
      std::mt19937_64 rng(options.seed * 1000003 + static_cast<uint64_t>(c));
      for (int64_t i = 0; i < options.warmup_requests; ++i) {
        const RequestRecord record = RunRequest(*stub, inference, options, report.vocab_size, rng,
                                                absl::StrCat("loadgen-c", c, "-w", i));
        ++result.warmup_total;
        if (!record.ok) ++result.warmup_failed;
      }
      warmed.count_down();
      go.wait();
      const Clock::time_point end = start + std::chrono::duration_cast<Clock::duration>(
                                                absl::ToChronoNanoseconds(options.duration));
      for (int64_t i = 0;; ++i) {
        if (options.duration > absl::ZeroDuration() ? Clock::now() >= end
                                                    : i >= options.requests_per_client) {
          break;
        }
        result.measured.push_back(RunRequest(*stub, inference, options, report.vocab_size, rng,
                                             absl::StrCat("loadgen-c", c, "-r", i)));
      }
    });
  }
  warmed.wait();
  start = Clock::now();
  go.count_down();
  AttachResult attach;
  std::thread attacher;
  if (options.attach_cycles > 0) {
    attacher = std::thread([&] { attach = RunAttachCycles(admin, options); });
  }
  for (std::thread& client : clients) client.join();
  const Clock::time_point end = Clock::now();
  if (attacher.joinable()) attacher.join();

  std::vector<double> ttft, tpot, e2e, gaps_during, gaps_outside;
  for (const ClientResult& result : results) {
    report.warmup_total += result.warmup_total;
    report.warmup_failed += result.warmup_failed;
    for (const RequestRecord& record : result.measured) {
      ++report.requests_total;
      report.generated_tokens += record.tokens;
      report.prompt_tokens += record.prompt_tokens;
      for (size_t m = 1; m < record.message_times.size(); ++m) {
        const Clock::time_point from = record.message_times[m - 1];
        const Clock::time_point to = record.message_times[m];
        (OverlapsAny(attach.windows, from, to) ? gaps_during : gaps_outside)
            .push_back(Milliseconds(to - from));
      }
      if (!record.ok) {
        ++report.requests_failed;
        ++report.errors_by_code[cli::GrpcCodeName(record.code)];
        continue;
      }
      ++report.requests_ok;
      e2e.push_back(Milliseconds(record.done - record.sent));
      if (!record.message_times.empty()) {
        ttft.push_back(Milliseconds(record.message_times[0] - record.sent));
      }
      for (size_t m = 1; m < record.message_times.size(); ++m) {
        const double per_token =
            Milliseconds(record.message_times[m] - record.message_times[m - 1]) /
            record.message_tokens[m];
        for (int t = 0; t < record.message_tokens[m]; ++t) tpot.push_back(per_token);
      }
    }
  }
  report.wall_seconds = std::chrono::duration<double>(end - start).count();
  if (report.wall_seconds > 0) {
    report.output_tokens_per_second =
        static_cast<double>(report.generated_tokens) / report.wall_seconds;
    report.requests_per_second = static_cast<double>(report.requests_total) / report.wall_seconds;
  }
  report.ttft_ms = Summarize(std::move(ttft));
  report.tpot_ms = Summarize(std::move(tpot));
  report.e2e_ms = Summarize(std::move(e2e));
  report.gaps_during_attach_ms = Summarize(std::move(gaps_during));
  report.gaps_outside_attach_ms = Summarize(std::move(gaps_outside));
  report.attach_cycles = attach.cycles;
  report.attach_rank = attach.rank;
  report.attach_failed = attach.attach_failed;
  report.detach_failed = attach.detach_failed;
  report.attach_errors_by_code = attach.errors_by_code;
  report.attach_ms_samples = attach.attach_ms;
  report.attach_ms = Summarize(attach.attach_ms);
  report.detach_ms = Summarize(std::move(attach.detach_ms));
  return report;
}

ordered_json ToJson(const LoadReport& report) {
  const LoadOptions& options = report.options;
  std::string routing_text;
  ordered_json routing = ordered_json::object();
  google::protobuf::util::JsonPrintOptions print_options;
  print_options.preserve_proto_field_names = true;
  if (google::protobuf::util::MessageToJsonString(options.routing, &routing_text, print_options)
          .ok()) {
    routing = ordered_json::parse(routing_text, nullptr, /*allow_exceptions=*/false);
    if (routing.is_discarded()) routing = ordered_json::object();
  }
  const bool timed = options.duration > absl::ZeroDuration();
  ordered_json errors = ordered_json::object();
  for (const auto& [code, count] : report.errors_by_code) errors[code] = count;
  ordered_json attach_errors = ordered_json::object();
  for (const auto& [code, count] : report.attach_errors_by_code) attach_errors[code] = count;
  return {
      {"config",
       {{"address", options.address},
        {"clients", options.clients},
        {"requests_per_client", timed ? 0 : options.requests_per_client},
        {"duration_s", absl::ToDoubleSeconds(options.duration)},
        {"warmup_requests", options.warmup_requests},
        {"prompt_tokens", options.prompt_tokens},
        {"max_tokens", options.max_tokens},
        {"seed", options.seed},
        {"routing", routing},
        {"attach_dir", options.attach_dir},
        {"attach_cycles", options.attach_cycles},
        {"attach_interval_ms", absl::ToDoubleMilliseconds(options.attach_interval)}}},
      {"server",
       {{"model_type", report.model_type},
        {"device", report.device},
        {"dtype", report.dtype},
        {"vocab_size", report.vocab_size},
        {"max_running_requests", report.max_running_requests},
        {"max_seq_len", report.max_seq_len}}},
      {"requests",
       {{"total", report.requests_total},
        {"ok", report.requests_ok},
        {"failed", report.requests_failed},
        {"errors_by_code", errors},
        {"warmup_total", report.warmup_total},
        {"warmup_failed", report.warmup_failed}}},
      {"tokens", {{"generated", report.generated_tokens}, {"prompt", report.prompt_tokens}}},
      {"wall_s", report.wall_seconds},
      {"output_tokens_per_s", report.output_tokens_per_second},
      {"requests_per_s", report.requests_per_second},
      {"ttft_ms", ToJson(report.ttft_ms)},
      {"tpot_ms", ToJson(report.tpot_ms)},
      {"e2e_ms", ToJson(report.e2e_ms)},
      {"gaps",
       {{"during_attach_ms", ToJson(report.gaps_during_attach_ms)},
        {"outside_attach_ms", ToJson(report.gaps_outside_attach_ms)}}},
      {"attach",
       {{"cycles", report.attach_cycles},
        {"rank", report.attach_rank},
        {"attach_failed", report.attach_failed},
        {"detach_failed", report.detach_failed},
        {"errors_by_code", attach_errors},
        {"attach_ms", ToJson(report.attach_ms)},
        {"detach_ms", ToJson(report.detach_ms)},
        {"attach_ms_samples", report.attach_ms_samples}}},
  };
}

std::string FormatSummary(const LoadReport& report) {
  const LoadOptions& options = report.options;
  std::string text;
  absl::StrAppend(
      &text, absl::StrFormat("server    %s: %s on %s (%s), vocab %d, %d running requests at most\n",
                             options.address, report.model_type, report.device, report.dtype,
                             report.vocab_size, report.max_running_requests));
  const std::string load = options.duration > absl::ZeroDuration()
                               ? absl::StrCat("for ", absl::FormatDuration(options.duration))
                               : absl::StrCat("x ", options.requests_per_client, " requests");
  absl::StrAppend(&text, absl::StrFormat("load      %d clients %s, prompt %d tokens, %d new tokens "
                                         "each (greedy), warm-up %d per client\n",
                                         options.clients, load, options.prompt_tokens,
                                         options.max_tokens, options.warmup_requests));
  absl::StrAppend(&text, absl::StrFormat("requests  %d ok, %d failed in %.3f s: %.2f requests/s",
                                         report.requests_ok, report.requests_failed,
                                         report.wall_seconds, report.requests_per_second));
  if (!report.errors_by_code.empty()) {
    absl::StrAppend(&text, "  errors:", FormatCodes(report.errors_by_code));
  }
  if (report.warmup_failed > 0) {
    absl::StrAppend(&text, absl::StrFormat("  (%d of %d warm-up requests failed)",
                                           report.warmup_failed, report.warmup_total));
  }
  absl::StrAppend(&text, "\n");
  absl::StrAppend(&text, absl::StrFormat("tokens    %d generated: %.1f tokens/s\n",
                                         report.generated_tokens, report.output_tokens_per_second));
  absl::StrAppend(&text, "ttft      ", FormatDistribution(report.ttft_ms), "\n");
  absl::StrAppend(&text, "tpot      ", FormatDistribution(report.tpot_ms), "\n");
  absl::StrAppend(&text, "e2e       ", FormatDistribution(report.e2e_ms), "\n");
  if (report.attach_cycles > 0) {
    absl::StrAppend(&text, absl::StrFormat("attach    %d attach/detach cycles of %s",
                                           report.attach_cycles, options.attach_dir));
    if (report.attach_rank > 0) absl::StrAppend(&text, " (r=", report.attach_rank, ")");
    if (report.attach_failed + report.detach_failed > 0) {
      absl::StrAppend(
          &text, absl::StrFormat(", %d attach and %d detach calls failed:%s", report.attach_failed,
                                 report.detach_failed, FormatCodes(report.attach_errors_by_code)));
    }
    absl::StrAppend(&text, "\n");
    absl::StrAppend(&text, "  attach  ", FormatDistribution(report.attach_ms), "\n");
    absl::StrAppend(&text, "  detach  ", FormatDistribution(report.detach_ms), "\n");
    absl::StrAppend(&text, "token gaps (between stream messages)\n");
    absl::StrAppend(&text, "  during attach/detach   ",
                    FormatDistribution(report.gaps_during_attach_ms), "\n");
    absl::StrAppend(&text, "  otherwise              ",
                    FormatDistribution(report.gaps_outside_attach_ms), "\n");
  }
  return text;
}

}  // namespace moelora::loadgen
