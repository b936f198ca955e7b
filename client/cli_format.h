#ifndef MOELORA_CLIENT_CLI_FORMAT_H_
#define MOELORA_CLIENT_CLI_FORMAT_H_

// moelora-cli's pure parts: parsing flag values into protocol messages, and printing responses
// for people or as JSON. No channels, no RPCs: all of it is testable without a server.

#include <cstdint>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/support/status.h"
#include "moelora/v1/admin.pb.h"
#include "moelora/v1/common.pb.h"
#include "moelora/v1/inference.pb.h"
#include "nlohmann/json.hpp"

namespace moelora::cli {

namespace v1 = ::moelora::v1;

// Process exit codes, one per class of failure, so scripts can tell them apart.
enum ExitCode : int {
  kExitOk = 0,
  kExitError = 1,         // anything else: INTERNAL, UNKNOWN, UNIMPLEMENTED, CANCELLED, ...
  kExitUsage = 2,         // bad flags or flag values; nothing was sent
  kExitUnavailable = 3,   // UNAVAILABLE: no server there, or it is shutting down
  kExitDeadline = 4,      // DEADLINE_EXCEEDED (--timeout)
  kExitRejected = 5,      // INVALID_ARGUMENT, OUT_OF_RANGE, FAILED_PRECONDITION
  kExitNotFound = 6,      // NOT_FOUND, ALREADY_EXISTS
  kExitUnauthorized = 7,  // UNAUTHENTICATED, PERMISSION_DENIED
  kExitOverloaded = 8,    // RESOURCE_EXHAUSTED
  kExitNotServing = 9,    // health: the server answered, but not SERVING
};

int ExitCodeFor(grpc::StatusCode code);
// "INVALID_ARGUMENT", "UNAVAILABLE", ...
std::string GrpcCodeName(grpc::StatusCode code);
// "error: <CODE NAME>: <message>"
std::string FormatError(const grpc::Status& status);
std::string FormatError(const absl::Status& status);

enum class OutputFormat { kHuman, kJson };

// ---- Parsing ----------------------------------------------------------------------------------

// "1,2,3" (spaces around the numbers allowed) -> {1, 2, 3}; "" -> {}. Token ids are >= 0.
// InvalidArgument naming the bad element otherwise.
absl::StatusOr<std::vector<int64_t>> ParseIds(absl::string_view text);
// "math:0.5,code:1" -> {{"math", 0.5}, {"code", 1}}; "" -> {}. Names are unique and non-empty,
// weights finite numbers (their range is the server's to check).
absl::StatusOr<std::map<std::string, double>> ParseWeights(absl::string_view text);
// "a,b" -> {"a", "b"}; "" -> {}. No empty or repeated names.
absl::StatusOr<std::vector<std::string>> ParseNames(absl::string_view text);

// Routing flags as given on the command line.
struct RoutingFlags {
  std::string router;                 // --router
  std::string weights;                // --weights name:w,...
  std::string pin;                    // --pin
  std::string mask;                   // --mask a,b
  std::optional<int64_t> top_k;       // --route_top_k
  std::optional<double> temperature;  // --route_temperature
  bool show_routing = false;          // --show_routing -> return_routing
};
absl::StatusOr<v1::RoutingControls> BuildRouting(const RoutingFlags& flags);

struct GenerateFlags {
  std::string request_id;
  std::string prompt_ids;  // --prompt_ids "1,2,3"
  std::string prompt;      // --prompt "text" (needs a server-side tokenizer)
  int64_t max_new_tokens = 0;
  double temperature = 0;
  int64_t top_k = 0;
  double top_p = 0;
  uint64_t seed = 0;
  std::string stop_ids;
  RoutingFlags routing;
};
// Exactly one of prompt_ids and prompt; numbers in their proto ranges.
absl::StatusOr<v1::GenerateRequest> BuildGenerateRequest(const GenerateFlags& flags);

struct ScoreFlags {
  std::string request_id;
  std::string ids;   // --ids
  std::string text;  // --prompt
  int64_t top_n = 0;
  RoutingFlags routing;
};
absl::StatusOr<v1::ScoreRequest> BuildScoreRequest(const ScoreFlags& flags);

// ---- Output -----------------------------------------------------------------------------------

// "length", "stop", "unspecified".
std::string FinishReasonName(v1::FinishReason reason);
// A float routing weight as the shortest decimal that reads back as the same float (0.71, not
// 0.7099999785423279).
double CleanFloat(float value);

// Prints a Generate stream as it arrives.
//   human: the token ids on one line as they come (or, with stream_text, the text), then
//          "text: ..." when the server sent text, then
//          "finish=length tokens=8 prompt=3 queue=0.1ms ttft=12.3ms total=40.1ms".
//          With show_routing one line per token instead: "token 42  math=0.71 code=0.29".
//   json:  one object per message ({"type":"message", token_ids, text, routing: [{expert:
//          weight}], and finish_reason + usage on the last}), then one
//          {"type":"summary", ...} object with every token, the whole text, finish and usage.
class GeneratePrinter {
 public:
  GeneratePrinter(std::ostream& out, OutputFormat format, bool show_routing, bool stream_text);

  void OnMessage(const v1::GenerateResponse& message);
  // The stream ended OK: prints the summary.
  void Finish();
  // The stream failed: ends an open output line so the error starts on its own.
  void Abort();

  const std::vector<int64_t>& tokens() const { return tokens_; }

 private:
  std::ostream& out_;
  OutputFormat format_;
  bool show_routing_;
  bool stream_text_;
  std::vector<std::string> experts_;
  std::vector<int64_t> tokens_;
  std::string text_;
  v1::FinishReason finish_reason_ = v1::FINISH_REASON_UNSPECIFIED;
  v1::Usage usage_;
  bool line_open_ = false;
};

// "math=0.71 code=0.29" (weights beyond the names are shown as "#2=0.10").
std::string FormatRoutingRow(const std::vector<std::string>& experts, const v1::TokenRouting& row);
// "finish=length tokens=8 prompt=3 queue=0.1ms ttft=12.3ms total=40.1ms"
std::string FormatUsage(v1::FinishReason reason, const v1::Usage& usage);

// JSON objects with the proto's field names; int64 as numbers, timestamps RFC 3339.
nlohmann::ordered_json ToJson(const v1::Usage& usage);
nlohmann::ordered_json ToJson(const v1::ExpertInfo& expert);
nlohmann::ordered_json ToJson(const v1::RouterInfo& router);
nlohmann::ordered_json ToJson(const v1::Limits& limits);
nlohmann::ordered_json ToJson(const v1::ModelInfo& info);
nlohmann::ordered_json ToJson(const v1::ScoreResponse& response);
nlohmann::ordered_json ToJson(const v1::ListExpertsResponse& response);
nlohmann::ordered_json ToJson(const v1::ListRoutersResponse& response);
// [{name: weight, ...}, ...], one object per row, in the experts' order.
nlohmann::ordered_json RoutingToJson(
    const std::vector<std::string>& experts,
    const google::protobuf::RepeatedPtrField<v1::TokenRouting>& rows);

// Human-readable blocks; each ends with a newline.
std::string FormatScore(const v1::ScoreRequest& request, const v1::ScoreResponse& response,
                        bool show_routing);
std::string FormatModelInfo(const v1::ModelInfo& info);
std::string FormatExperts(const google::protobuf::RepeatedPtrField<v1::ExpertInfo>& experts);
std::string FormatExpert(const v1::ExpertInfo& expert);
std::string FormatListExperts(const v1::ListExpertsResponse& response);
std::string FormatRouters(const google::protobuf::RepeatedPtrField<v1::RouterInfo>& routers);
std::string FormatRouter(const v1::RouterInfo& router);
std::string FormatListRouters(const v1::ListRoutersResponse& response);
// 1536 -> "1.5 KiB"
std::string FormatBytes(int64_t bytes);

}  // namespace moelora::cli

#endif  // MOELORA_CLIENT_CLI_FORMAT_H_
