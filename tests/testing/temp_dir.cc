#include "tests/testing/temp_dir.h"

#include <ftw.h>
#include <gtest/gtest.h>
#include <stdio.h>
#include <stdlib.h>

#include "absl/strings/str_cat.h"

namespace moelora::testing_support {
namespace {

int RemoveEntry(const char* path, const struct stat*, int, struct FTW*) { return ::remove(path); }

}  // namespace

void RemoveTree(const std::string& path) {
  // Depth first (FTW_DEPTH) so directories are empty when removed; no symlinks followed.
  ::nftw(path.c_str(), RemoveEntry, 16, FTW_DEPTH | FTW_PHYS);
}

ScopedTempDir::ScopedTempDir(absl::string_view prefix) {
  std::string pattern = absl::StrCat(::testing::TempDir(), "/", prefix, ".XXXXXX");
  if (::mkdtemp(pattern.data()) == nullptr) {
    ADD_FAILURE() << "mkdtemp failed for " << pattern;
  }
  path_ = pattern;
}

ScopedTempDir::~ScopedTempDir() { RemoveTree(path_); }

std::string ScopedTempDir::Join(absl::string_view name) const {
  return absl::StrCat(path_, "/", name);
}

}  // namespace moelora::testing_support
