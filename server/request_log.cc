#include "server/request_log.h"

#include <cstdio>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace moelora::server {
namespace {

std::string Milliseconds(absl::Duration duration) {
  return absl::StrFormat("%.1f", absl::ToDoubleMilliseconds(duration));
}

}  // namespace

void LogLine(char level, absl::string_view message) {
  const std::string line =
      absl::StrCat(absl::FormatTime("%Y-%m-%dT%H:%M:%E3SZ", absl::Now(), absl::UTCTimeZone()), " ",
                   std::string(1, level), " ", message, "\n");
  // One fwrite per line: lines from different threads do not interleave.
  std::fwrite(line.data(), 1, line.size(), stderr);
}

std::string FormatRequestRecord(const RequestRecord& record) {
  std::string line = absl::StrCat("request id=", record.id.empty() ? "-" : record.id,
                                  " rpc=", record.rpc, " prompt_tokens=", record.prompt_tokens,
                                  " generated_tokens=", record.generated_tokens,
                                  " latency_ms=", Milliseconds(record.latency),
                                  " ttft_ms=", Milliseconds(record.time_to_first_token),
                                  " router=", record.router.empty() ? "-" : record.router,
                                  " status=", absl::StatusCodeToString(record.status.code()));
  if (!record.status.ok()) {
    absl::StrAppend(&line, " message=\"", absl::CHexEscape(record.status.message()), "\"");
  }
  return line;
}

void LogRequest(const RequestRecord& record) { LogLine('I', FormatRequestRecord(record)); }

}  // namespace moelora::server
