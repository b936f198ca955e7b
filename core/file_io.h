#ifndef MOELORA_CORE_FILE_IO_H_
#define MOELORA_CORE_FILE_IO_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moelora {

// A whole (small) file: NotFound "<path>: <what> not found" when it is not a regular file,
// DataLoss when reading fails.
absl::StatusOr<std::string> ReadFileToString(const std::string& path, absl::string_view what);

// Whether `path` is a regular file / a directory (following symlinks; false on any error).
bool IsRegularFile(const std::string& path);
bool IsDirectory(const std::string& path);

// The same status with `prefix` in front of its message.
absl::Status PrefixStatus(const absl::Status& status, absl::string_view prefix);

}  // namespace moelora

#endif  // MOELORA_CORE_FILE_IO_H_
