#include "client/cli_format.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "google/protobuf/util/time_util.h"

namespace moelora::cli {
namespace {

using ::nlohmann::ordered_json;

// Splits on commas; "" or only whitespace -> no elements. Elements are whitespace-stripped.
std::vector<std::string> SplitList(absl::string_view text) {
  std::vector<std::string> out;
  if (absl::StripAsciiWhitespace(text).empty()) return out;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    out.emplace_back(absl::StripAsciiWhitespace(part));
  }
  return out;
}

// Left-aligned columns two spaces apart, each row indented.
std::string Table(const std::vector<std::vector<std::string>>& rows, absl::string_view indent) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    if (widths.size() < row.size()) widths.resize(row.size(), 0);
    for (size_t i = 0; i < row.size(); ++i) widths[i] = std::max(widths[i], row[i].size());
  }
  std::string out;
  for (const auto& row : rows) {
    std::string line(indent);
    for (size_t i = 0; i < row.size(); ++i) {
      absl::StrAppend(&line, row[i]);
      if (i + 1 < row.size()) line.append(widths[i] - row[i].size() + 2, ' ');
    }
    absl::StrAppend(&out, line, "\n");
  }
  return out;
}

std::string Millis(double seconds) { return absl::StrFormat("%.1fms", seconds * 1e3); }

std::string FormatLogprob(double logprob) { return absl::StrFormat("%.4f", logprob); }

std::string TimestampString(const google::protobuf::Timestamp& timestamp) {
  return google::protobuf::util::TimeUtil::ToString(timestamp);
}

// To the second, for tables.
std::string ShortTimestampString(google::protobuf::Timestamp timestamp) {
  timestamp.set_nanos(0);
  return google::protobuf::util::TimeUtil::ToString(timestamp);
}

template <typename T>
ordered_json JsonArray(const google::protobuf::RepeatedField<T>& values) {
  ordered_json out = ordered_json::array();
  for (const T& value : values) out.push_back(value);
  return out;
}

ordered_json JsonArray(const google::protobuf::RepeatedPtrField<std::string>& values) {
  ordered_json out = ordered_json::array();
  for (const std::string& value : values) out.push_back(value);
  return out;
}

// One line of JSON; invalid UTF-8 (never expected from a proto3 string) becomes U+FFFD instead
// of an exception.
std::string DumpLine(const ordered_json& json) {
  return json.dump(-1, ' ', false, ordered_json::error_handler_t::replace);
}

}  // namespace

int ExitCodeFor(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return kExitOk;
    case grpc::StatusCode::UNAVAILABLE:
      return kExitUnavailable;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return kExitDeadline;
    case grpc::StatusCode::INVALID_ARGUMENT:
    case grpc::StatusCode::OUT_OF_RANGE:
    case grpc::StatusCode::FAILED_PRECONDITION:
      return kExitRejected;
    case grpc::StatusCode::NOT_FOUND:
    case grpc::StatusCode::ALREADY_EXISTS:
      return kExitNotFound;
    case grpc::StatusCode::UNAUTHENTICATED:
    case grpc::StatusCode::PERMISSION_DENIED:
      return kExitUnauthorized;
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return kExitOverloaded;
    default:
      return kExitError;
  }
}

std::string GrpcCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return absl::StrCat("CODE_", static_cast<int>(code));
  }
}

std::string FormatError(const grpc::Status& status) {
  return absl::StrCat("error: ", GrpcCodeName(status.error_code()), ": ", status.error_message());
}

std::string FormatError(const absl::Status& status) {
  return absl::StrCat("error: ", absl::StatusCodeToString(status.code()), ": ", status.message());
}

// ---- Parsing ----------------------------------------------------------------------------------

absl::StatusOr<std::vector<int64_t>> ParseIds(absl::string_view text) {
  std::vector<int64_t> ids;
  const std::vector<std::string> parts = SplitList(text);
  for (size_t i = 0; i < parts.size(); ++i) {
    int64_t id = 0;
    if (parts[i].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ids \"", text, "\": element ", i, " is empty"));
    }
    if (!absl::SimpleAtoi(parts[i], &id)) {
      return absl::InvalidArgumentError(absl::StrCat("token ids \"", text, "\": element ", i,
                                                     " (\"", parts[i], "\") is not an integer"));
    }
    if (id < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ids \"", text, "\": element ", i, " (", id, ") is negative"));
    }
    ids.push_back(id);
  }
  return ids;
}

absl::StatusOr<std::map<std::string, double>> ParseWeights(absl::string_view text) {
  std::map<std::string, double> weights;
  for (const std::string& part : SplitList(text)) {
    const size_t colon = part.find(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(
          absl::StrCat("weights \"", text, "\": \"", part, "\" is not name:weight"));
    }
    const std::string name(absl::StripAsciiWhitespace(absl::string_view(part).substr(0, colon)));
    const std::string value(absl::StripAsciiWhitespace(absl::string_view(part).substr(colon + 1)));
    if (name.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("weights \"", text, "\": \"", part, "\" has no expert name"));
    }
    double weight = 0;
    if (!absl::SimpleAtod(value, &weight) || !std::isfinite(weight)) {
      return absl::InvalidArgumentError(absl::StrCat("weights \"", text, "\": weight of '", name,
                                                     "' (\"", value, "\") is not a finite number"));
    }
    if (!weights.emplace(name, weight).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("weights \"", text, "\": expert '", name, "' given twice"));
    }
  }
  return weights;
}

absl::StatusOr<std::vector<std::string>> ParseNames(absl::string_view text) {
  std::vector<std::string> names = SplitList(text);
  std::set<std::string> seen;
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i].empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("names \"", text, "\": element ", i, " is empty"));
    }
    if (!seen.insert(names[i]).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("names \"", text, "\": '", names[i], "' given twice"));
    }
  }
  return names;
}

absl::StatusOr<v1::RoutingControls> BuildRouting(const RoutingFlags& flags) {
  v1::RoutingControls routing;
  routing.set_router(flags.router);
  routing.set_pinned_expert(flags.pin);
  absl::StatusOr<std::map<std::string, double>> weights = ParseWeights(flags.weights);
  if (!weights.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--weights: ", weights.status().message()));
  }
  for (const auto& [name, weight] : *weights) (*routing.mutable_expert_weights())[name] = weight;
  absl::StatusOr<std::vector<std::string>> masked = ParseNames(flags.mask);
  if (!masked.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--mask: ", masked.status().message()));
  }
  for (const std::string& name : *masked) routing.add_masked_experts(name);
  if (flags.top_k.has_value()) {
    if (*flags.top_k < 0 || *flags.top_k > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--route_top_k: ", *flags.top_k, " is not in [0, 2^32)"));
    }
    routing.set_top_k(static_cast<uint32_t>(*flags.top_k));
  }
  if (flags.temperature.has_value()) routing.set_temperature(*flags.temperature);
  return routing;
}

absl::StatusOr<v1::GenerateRequest> BuildGenerateRequest(const GenerateFlags& flags) {
  v1::GenerateRequest request;
  request.set_request_id(flags.request_id);
  const bool has_ids = !absl::StripAsciiWhitespace(flags.prompt_ids).empty();
  const bool has_text = !flags.prompt.empty();
  if (has_ids == has_text) {
    return absl::InvalidArgumentError(has_ids ? "give --prompt_ids or --prompt, not both"
                                              : "one of --prompt_ids or --prompt is required");
  }
  if (has_ids) {
    absl::StatusOr<std::vector<int64_t>> ids = ParseIds(flags.prompt_ids);
    if (!ids.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--prompt_ids: ", ids.status().message()));
    }
    request.mutable_prompt_token_ids()->Add(ids->begin(), ids->end());
  } else {
    request.set_prompt_text(flags.prompt);
  }
  constexpr int64_t kMaxU32 = std::numeric_limits<uint32_t>::max();
  if (flags.max_new_tokens < 0 || flags.max_new_tokens > kMaxU32) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max_new_tokens: ", flags.max_new_tokens, " is not in [0, 2^32)"));
  }
  if (flags.top_k < 0 || flags.top_k > kMaxU32) {
    return absl::InvalidArgumentError(
        absl::StrCat("--top_k: ", flags.top_k, " is not in [0, 2^32)"));
  }
  v1::SamplingParams& sampling = *request.mutable_sampling();
  sampling.set_max_new_tokens(static_cast<uint32_t>(flags.max_new_tokens));
  sampling.set_temperature(flags.temperature);
  sampling.set_top_k(static_cast<uint32_t>(flags.top_k));
  sampling.set_top_p(flags.top_p);
  sampling.set_seed(flags.seed);
  absl::StatusOr<std::vector<int64_t>> stop = ParseIds(flags.stop_ids);
  if (!stop.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--stop_ids: ", stop.status().message()));
  }
  sampling.mutable_stop_token_ids()->Add(stop->begin(), stop->end());
  absl::StatusOr<v1::RoutingControls> routing = BuildRouting(flags.routing);
  if (!routing.ok()) return routing.status();
  *request.mutable_routing() = *std::move(routing);
  request.set_return_routing(flags.routing.show_routing);
  return request;
}

absl::StatusOr<v1::ScoreRequest> BuildScoreRequest(const ScoreFlags& flags) {
  v1::ScoreRequest request;
  request.set_request_id(flags.request_id);
  const bool has_ids = !absl::StripAsciiWhitespace(flags.ids).empty();
  const bool has_text = !flags.text.empty();
  if (has_ids == has_text) {
    return absl::InvalidArgumentError(has_ids ? "give --ids or --prompt, not both"
                                              : "one of --ids or --prompt is required");
  }
  if (has_ids) {
    absl::StatusOr<std::vector<int64_t>> ids = ParseIds(flags.ids);
    if (!ids.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--ids: ", ids.status().message()));
    }
    request.mutable_token_ids()->Add(ids->begin(), ids->end());
  } else {
    request.set_text(flags.text);
  }
  if (flags.top_n < 0 || flags.top_n > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--top_n: ", flags.top_n, " is not in [0, 2^32)"));
  }
  request.set_top_n(static_cast<uint32_t>(flags.top_n));
  absl::StatusOr<v1::RoutingControls> routing = BuildRouting(flags.routing);
  if (!routing.ok()) return routing.status();
  *request.mutable_routing() = *std::move(routing);
  request.set_return_routing(flags.routing.show_routing);
  return request;
}

// ---- Output -----------------------------------------------------------------------------------

std::string FinishReasonName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_LENGTH:
      return "length";
    case v1::FINISH_REASON_STOP:
      return "stop";
    default:
      return "unspecified";
  }
}

double CleanFloat(float value) {
  if (!std::isfinite(value)) return value;
  // 9 significant digits always read back as the same float; fewer often do.
  for (int digits = 6; digits <= 9; ++digits) {
    const std::string text = absl::StrFormat("%.*g", digits, value);
    const double parsed = std::strtod(text.c_str(), nullptr);
    if (static_cast<float>(parsed) == value) return parsed;
  }
  return value;
}

std::string FormatRoutingRow(const std::vector<std::string>& experts, const v1::TokenRouting& row) {
  std::vector<std::string> cells;
  for (int i = 0; i < row.weights_size(); ++i) {
    const std::string name =
        i < static_cast<int>(experts.size()) ? experts[i] : absl::StrCat("#", i);
    cells.push_back(absl::StrFormat("%s=%.2f", name, row.weights(i)));
  }
  return absl::StrJoin(cells, " ");
}

std::string FormatUsage(v1::FinishReason reason, const v1::Usage& usage) {
  return absl::StrCat("finish=", FinishReasonName(reason), " tokens=", usage.generated_tokens(),
                      " prompt=", usage.prompt_tokens(), " queue=", Millis(usage.queue_seconds()),
                      " ttft=", Millis(usage.time_to_first_token_seconds()),
                      " total=", Millis(usage.total_seconds()));
}

ordered_json RoutingToJson(const std::vector<std::string>& experts,
                           const google::protobuf::RepeatedPtrField<v1::TokenRouting>& rows) {
  ordered_json out = ordered_json::array();
  for (const v1::TokenRouting& row : rows) {
    ordered_json weights = ordered_json::object();
    for (int i = 0; i < row.weights_size(); ++i) {
      const std::string name =
          i < static_cast<int>(experts.size()) ? experts[i] : absl::StrCat("#", i);
      weights[name] = CleanFloat(row.weights(i));
    }
    out.push_back(std::move(weights));
  }
  return out;
}

GeneratePrinter::GeneratePrinter(std::ostream& out, OutputFormat format, bool show_routing,
                                 bool stream_text)
    : out_(out), format_(format), show_routing_(show_routing), stream_text_(stream_text) {}

void GeneratePrinter::OnMessage(const v1::GenerateResponse& message) {
  if (message.routing_experts_size() > 0) {
    experts_.assign(message.routing_experts().begin(), message.routing_experts().end());
  }
  tokens_.insert(tokens_.end(), message.token_ids().begin(), message.token_ids().end());
  text_ += message.text();
  const bool last = message.finish_reason() != v1::FINISH_REASON_UNSPECIFIED;
  if (last) {
    finish_reason_ = message.finish_reason();
    usage_ = message.usage();
  }

  if (format_ == OutputFormat::kJson) {
    ordered_json line;
    line["type"] = "message";
    line["token_ids"] = JsonArray(message.token_ids());
    if (!message.text().empty()) line["text"] = message.text();
    if (message.routing_experts_size() > 0) {
      line["routing_experts"] = JsonArray(message.routing_experts());
    }
    if (message.routing_size() > 0) line["routing"] = RoutingToJson(experts_, message.routing());
    if (last) {
      line["finish_reason"] = FinishReasonName(message.finish_reason());
      line["usage"] = ToJson(message.usage());
    }
    out_ << DumpLine(line) << "\n" << std::flush;
    return;
  }

  if (show_routing_) {
    for (int i = 0; i < message.token_ids_size(); ++i) {
      std::string line = absl::StrCat("token ", message.token_ids(i));
      if (i < message.routing_size()) {
        absl::StrAppend(&line, "  ", FormatRoutingRow(experts_, message.routing(i)));
      }
      if (i + 1 == message.token_ids_size() && !message.text().empty()) {
        absl::StrAppend(&line, "  ", DumpLine(ordered_json(message.text())));
      }
      out_ << line << "\n";
    }
    out_ << std::flush;
    return;
  }
  if (stream_text_) {
    if (!message.text().empty()) {
      out_ << message.text() << std::flush;
      line_open_ = text_.back() != '\n';
    }
    return;
  }
  for (const int64_t id : message.token_ids()) {
    if (line_open_) out_ << ' ';
    out_ << id;
    line_open_ = true;
  }
  out_ << std::flush;
}

void GeneratePrinter::Finish() {
  if (format_ == OutputFormat::kJson) {
    ordered_json line;
    line["type"] = "summary";
    line["token_ids"] = tokens_;
    if (!text_.empty()) line["text"] = text_;
    line["finish_reason"] = FinishReasonName(finish_reason_);
    line["usage"] = ToJson(usage_);
    out_ << DumpLine(line) << "\n" << std::flush;
    return;
  }
  if (line_open_) out_ << "\n";
  line_open_ = false;
  if (!stream_text_ && !text_.empty()) out_ << "text: " << text_ << "\n";
  out_ << FormatUsage(finish_reason_, usage_) << "\n" << std::flush;
}

void GeneratePrinter::Abort() {
  if (line_open_) out_ << "\n" << std::flush;
  line_open_ = false;
}

ordered_json ToJson(const v1::Usage& usage) {
  ordered_json out;
  out["prompt_tokens"] = usage.prompt_tokens();
  out["generated_tokens"] = usage.generated_tokens();
  out["queue_seconds"] = usage.queue_seconds();
  out["time_to_first_token_seconds"] = usage.time_to_first_token_seconds();
  out["total_seconds"] = usage.total_seconds();
  return out;
}

ordered_json ToJson(const v1::ExpertInfo& expert) {
  ordered_json out;
  out["name"] = expert.name();
  out["source"] = expert.source();
  out["slot"] = expert.slot();
  out["rank"] = expert.rank();
  out["num_modules"] = expert.num_modules();
  out["target_modules"] = JsonArray(expert.target_modules());
  out["device_bytes"] = expert.device_bytes();
  out["reserved_bytes"] = expert.reserved_bytes();
  out["attach_time"] =
      expert.has_attach_time() ? ordered_json(TimestampString(expert.attach_time())) : nullptr;
  out["requests_served"] = expert.requests_served();
  return out;
}

ordered_json ToJson(const v1::RouterInfo& router) {
  ordered_json out;
  out["name"] = router.name();
  out["experts"] = JsonArray(router.experts());
  out["input"] = router.input();
  out["granularity"] = router.granularity();
  out["top_k"] = router.top_k();
  out["temperature"] = router.temperature();
  out["is_default"] = router.is_default();
  out["missing_experts"] = JsonArray(router.missing_experts());
  return out;
}

ordered_json ToJson(const v1::Limits& limits) {
  ordered_json out;
  out["max_running_requests"] = limits.max_running_requests();
  out["max_seq_len"] = limits.max_seq_len();
  out["kv_cache_tokens"] = limits.kv_cache_tokens();
  out["kv_cache_bytes"] = limits.kv_cache_bytes();
  out["max_batch_tokens"] = limits.max_batch_tokens();
  out["max_queued_requests"] = limits.max_queued_requests();
  out["expert_pool_capacity"] = limits.expert_pool_capacity();
  out["expert_max_rank"] = limits.expert_max_rank();
  out["max_message_bytes"] = limits.max_message_bytes();
  return out;
}

ordered_json ToJson(const v1::ModelInfo& info) {
  ordered_json out;
  out["model_type"] = info.model_type();
  out["model_dir"] = info.model_dir();
  out["vocab_size"] = info.vocab_size();
  out["hidden_size"] = info.hidden_size();
  out["num_layers"] = info.num_layers();
  out["max_position_embeddings"] = info.max_position_embeddings();
  out["dtype"] = info.dtype();
  out["device"] = info.device();
  out["has_tokenizer"] = info.has_tokenizer();
  out["limits"] = ToJson(info.limits());
  out["experts"] = ordered_json::array();
  for (const v1::ExpertInfo& expert : info.experts()) out["experts"].push_back(ToJson(expert));
  out["routers"] = ordered_json::array();
  for (const v1::RouterInfo& router : info.routers()) out["routers"].push_back(ToJson(router));
  return out;
}

ordered_json ToJson(const v1::ScoreResponse& response) {
  ordered_json out;
  out["tokens"] = ordered_json::array();
  for (const v1::ScoredToken& token : response.tokens()) {
    ordered_json scored;
    scored["token_id"] = token.token_id();
    scored["logprob"] = token.logprob();
    if (token.top_size() > 0) {
      scored["top"] = ordered_json::array();
      for (const v1::TokenLogprob& top : token.top()) {
        scored["top"].push_back({{"token_id", top.token_id()}, {"logprob", top.logprob()}});
      }
    }
    out["tokens"].push_back(std::move(scored));
  }
  out["total_logprob"] = response.total_logprob();
  if (response.routing_experts_size() > 0 || response.routing_size() > 0) {
    const std::vector<std::string> experts(response.routing_experts().begin(),
                                           response.routing_experts().end());
    out["routing_experts"] = JsonArray(response.routing_experts());
    out["routing"] = RoutingToJson(experts, response.routing());
  }
  return out;
}

ordered_json ToJson(const v1::ListExpertsResponse& response) {
  ordered_json out;
  out["experts"] = ordered_json::array();
  for (const v1::ExpertInfo& expert : response.experts()) out["experts"].push_back(ToJson(expert));
  out["free_slots"] = response.free_slots();
  return out;
}

ordered_json ToJson(const v1::ListRoutersResponse& response) {
  ordered_json out;
  out["routers"] = ordered_json::array();
  for (const v1::RouterInfo& router : response.routers()) out["routers"].push_back(ToJson(router));
  out["default_router"] = response.default_router();
  return out;
}

std::string FormatBytes(int64_t bytes) {
  constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double value = static_cast<double>(bytes);
  int unit = -1;
  while (value >= 1024 && unit < 3) {
    value /= 1024;
    ++unit;
  }
  return absl::StrFormat("%.1f %s", value, kUnits[unit]);
}

std::string FormatScore(const v1::ScoreRequest& request, const v1::ScoreResponse& response,
                        bool show_routing) {
  // Position 0 is context only; position i scores token i given 0..i-1.
  auto input_token = [&](int position) -> std::string {
    if (position < request.token_ids_size()) return absl::StrCat(request.token_ids(position));
    if (position >= 1 && position - 1 < response.tokens_size()) {
      return absl::StrCat(response.tokens(position - 1).token_id());
    }
    return "?";
  };
  std::vector<std::vector<std::string>> rows = {{"pos", "token", "logprob"}};
  const bool any_top = std::any_of(response.tokens().begin(), response.tokens().end(),
                                   [](const v1::ScoredToken& t) { return t.top_size() > 0; });
  if (any_top) rows[0].push_back("top");
  rows.push_back({"0", input_token(0), "-"});
  for (int i = 0; i < response.tokens_size(); ++i) {
    const v1::ScoredToken& token = response.tokens(i);
    std::vector<std::string> row = {absl::StrCat(i + 1), absl::StrCat(token.token_id()),
                                    FormatLogprob(token.logprob())};
    if (any_top) {
      std::vector<std::string> top;
      for (const v1::TokenLogprob& t : token.top()) {
        top.push_back(absl::StrCat(t.token_id(), ":", FormatLogprob(t.logprob())));
      }
      row.push_back(absl::StrJoin(top, " "));
    }
    rows.push_back(std::move(row));
  }
  std::string out = Table(rows, "");
  absl::StrAppend(&out, "total_logprob=", FormatLogprob(response.total_logprob()),
                  " scored=", response.tokens_size(), "\n");
  if (show_routing && response.routing_size() > 0) {
    const std::vector<std::string> experts(response.routing_experts().begin(),
                                           response.routing_experts().end());
    for (int i = 0; i < response.routing_size(); ++i) {
      absl::StrAppend(&out, "token ", input_token(i), "  ",
                      FormatRoutingRow(experts, response.routing(i)), "\n");
    }
  }
  return out;
}

std::string FormatExperts(const google::protobuf::RepeatedPtrField<v1::ExpertInfo>& experts) {
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "SLOT", "RANK", "MODULES", "DEVICE", "RESERVED", "SERVED", "ATTACHED", "SOURCE"}};
  for (const v1::ExpertInfo& expert : experts) {
    rows.push_back(
        {expert.name(), absl::StrCat(expert.slot()), absl::StrCat(expert.rank()),
         absl::StrCat(expert.num_modules(), " (", absl::StrJoin(expert.target_modules(), ","), ")"),
         FormatBytes(expert.device_bytes()), FormatBytes(expert.reserved_bytes()),
         absl::StrCat(expert.requests_served()),
         expert.has_attach_time() ? ShortTimestampString(expert.attach_time()) : "-",
         expert.source()});
  }
  return Table(rows, "  ");
}

std::string FormatExpert(const v1::ExpertInfo& expert) {
  return absl::StrCat("expert ", expert.name(), ": slot ", expert.slot(), ", rank ", expert.rank(),
                      ", ", expert.num_modules(), " modules (",
                      absl::StrJoin(expert.target_modules(), ","), "), ",
                      FormatBytes(expert.device_bytes()), " on the device (slot reserves ",
                      FormatBytes(expert.reserved_bytes()), "), from ", expert.source(), "\n");
}

std::string FormatListExperts(const v1::ListExpertsResponse& response) {
  std::string out;
  if (response.experts_size() == 0) {
    out = "no experts attached\n";
  } else {
    out = FormatExperts(response.experts());
  }
  absl::StrAppend(&out, "free slots: ", response.free_slots(), "\n");
  return out;
}

namespace {

std::string RouterTopK(const v1::RouterInfo& router) {
  return router.top_k() == 0 ? "dense" : absl::StrCat(router.top_k());
}

}  // namespace

std::string FormatRouters(const google::protobuf::RepeatedPtrField<v1::RouterInfo>& routers) {
  std::vector<std::vector<std::string>> rows = {
      {"NAME", "DEFAULT", "EXPERTS", "INPUT", "GRANULARITY", "TOP_K", "TEMPERATURE", "MISSING"}};
  for (const v1::RouterInfo& router : routers) {
    rows.push_back(
        {router.name(), router.is_default() ? "yes" : "", absl::StrJoin(router.experts(), ","),
         router.input(), router.granularity(), RouterTopK(router),
         absl::StrFormat("%g", router.temperature()),
         router.missing_experts_size() > 0 ? absl::StrJoin(router.missing_experts(), ",") : "-"});
  }
  return Table(rows, "  ");
}

std::string FormatRouter(const v1::RouterInfo& router) {
  std::string out = absl::StrCat(
      "router ", router.name(), ": experts ", absl::StrJoin(router.experts(), ","), ", input ",
      router.input(), ", granularity ", router.granularity(), ", top_k ", RouterTopK(router),
      ", temperature ", absl::StrFormat("%g", router.temperature()));
  if (router.is_default()) absl::StrAppend(&out, ", default");
  if (router.missing_experts_size() > 0) {
    absl::StrAppend(&out, "; not attached: ", absl::StrJoin(router.missing_experts(), ","));
  }
  absl::StrAppend(&out, "\n");
  return out;
}

std::string FormatListRouters(const v1::ListRoutersResponse& response) {
  std::string out;
  if (response.routers_size() == 0) {
    out = "no routers attached\n";
  } else {
    out = FormatRouters(response.routers());
  }
  absl::StrAppend(&out, "default router: ",
                  response.default_router().empty() ? "none" : response.default_router(), "\n");
  return out;
}

std::string FormatModelInfo(const v1::ModelInfo& info) {
  const v1::Limits& limits = info.limits();
  std::string out = Table(
      {
          {"model", absl::StrCat(info.model_type(), " (", info.model_dir(), ")")},
          {"dtype", absl::StrCat(info.dtype(), " on ", info.device())},
          {"vocab_size", absl::StrCat(info.vocab_size())},
          {"hidden_size", absl::StrCat(info.hidden_size())},
          {"num_layers", absl::StrCat(info.num_layers())},
          {"max_position_embeddings", absl::StrCat(info.max_position_embeddings())},
          {"tokenizer", info.has_tokenizer() ? "yes" : "no"},
          {"max_running_requests", absl::StrCat(limits.max_running_requests())},
          {"max_seq_len", absl::StrCat(limits.max_seq_len())},
          {"kv_cache", absl::StrCat(limits.kv_cache_tokens(), " tokens, ",
                                    FormatBytes(limits.kv_cache_bytes()))},
          {"max_batch_tokens", absl::StrCat(limits.max_batch_tokens())},
          {"max_queued_requests", absl::StrCat(limits.max_queued_requests())},
          {"expert_pool", absl::StrCat(limits.expert_pool_capacity(),
                                       " slots, rank <= ", limits.expert_max_rank())},
          {"max_message_bytes", absl::StrCat(limits.max_message_bytes())},
      },
      "");
  absl::StrAppend(&out, "experts: ", info.experts_size(), "\n");
  if (info.experts_size() > 0) absl::StrAppend(&out, FormatExperts(info.experts()));
  absl::StrAppend(&out, "routers: ", info.routers_size(), "\n");
  if (info.routers_size() > 0) absl::StrAppend(&out, FormatRouters(info.routers()));
  return out;
}

}  // namespace moelora::cli
