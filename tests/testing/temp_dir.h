#ifndef MOELORA_TESTS_TESTING_TEMP_DIR_H_
#define MOELORA_TESTS_TESTING_TEMP_DIR_H_

#include <string>

#include "absl/strings/string_view.h"

namespace moelora::testing_support {

// Deletes a directory tree (nftw). Not std::filesystem::remove_all: PyTorch's libtorch.so exports
// its own copy of that symbol, which wins at load time on the GPU machine and crashes.
void RemoveTree(const std::string& path);

// A new directory under testing::TempDir(), unique per process and per call (ctest runs the
// tests of one binary in parallel processes); removed with its contents when destroyed.
class ScopedTempDir {
 public:
  explicit ScopedTempDir(absl::string_view prefix = "moelora");
  ~ScopedTempDir();
  ScopedTempDir(const ScopedTempDir&) = delete;
  ScopedTempDir& operator=(const ScopedTempDir&) = delete;

  const std::string& path() const { return path_; }
  // path()/name
  std::string Join(absl::string_view name) const;

 private:
  std::string path_;
};

}  // namespace moelora::testing_support

#endif  // MOELORA_TESTS_TESTING_TEMP_DIR_H_
