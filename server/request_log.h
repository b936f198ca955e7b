#ifndef MOELORA_SERVER_REQUEST_LOG_H_
#define MOELORA_SERVER_REQUEST_LOG_H_

// The server's log lines on stderr: a UTC timestamp, a level letter, then the message. One
// line per finished request, in key=value form:
//
//   2025-01-01T12:00:00.123Z I request id=7 rpc=Generate prompt_tokens=5 generated_tokens=16
//     latency_ms=41.2 ttft_ms=6.0 router=default status=OK
//
// (one line; a failed request adds message="..." with the error, C-escaped).

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"

namespace moelora::server {

// `level`: 'I' info, 'W' warning, 'E' error.
void LogLine(char level, absl::string_view message);

struct RequestRecord {
  std::string id;
  absl::string_view rpc;  // "Generate", "Score"
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  absl::Duration latency;
  absl::Duration time_to_first_token;
  std::string router;
  absl::Status status;
};

std::string FormatRequestRecord(const RequestRecord& record);
void LogRequest(const RequestRecord& record);

}  // namespace moelora::server

#endif  // MOELORA_SERVER_REQUEST_LOG_H_
