// Coverage-guided fuzzer for the safetensors validator. Not part of the CMake build (it needs
// clang's libFuzzer); tests/core/safetensors_fuzz_test.cc is the deterministic version CI runs.
//
// Build and run from the repository root:
//   clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -I. \
//     tests/core/safetensors_fuzzer.cc core/safetensors.cc \
//     -labsl_status -labsl_statusor -labsl_strings -labsl_throw_delegate \
//     -o /tmp/safetensors_fuzzer
//   mkdir -p /tmp/safetensors_corpus && /tmp/safetensors_fuzzer /tmp/safetensors_corpus \
//     -max_len=4096 -max_total_time=60
//
// Each input is a whole file (length prefix, header, data). It must never crash, and whatever
// is accepted must tile the data buffer with entries whose sizes match their shapes.

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/types/span.h"
#include "core/safetensors.h"

namespace {

bool Consistent(const moelora::SafetensorsHeader& header, uint64_t data_size) {
  uint64_t covered = 0;
  for (const moelora::SafetensorsEntry& entry : header.entries) {
    if (entry.begin != covered || entry.end < entry.begin || entry.end > data_size) return false;
    const int64_t numel = entry.NumElements();
    const size_t dtype_size = moelora::DTypeSize(entry.dtype);
    if (numel < 0 || dtype_size == 0) return false;
    if ((entry.end - entry.begin) % dtype_size != 0 ||
        (entry.end - entry.begin) / dtype_size != static_cast<uint64_t>(numel)) {
      return false;
    }
    covered = entry.end;
  }
  return covered == data_size;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  uint64_t data_offset = 0;
  auto header =
      moelora::ParseSafetensorsBuffer(absl::MakeConstSpan(data, size), "fuzz", &data_offset);
  if (header.ok() && (data_offset > size || !Consistent(*header, size - data_offset))) {
    __builtin_trap();
  }

  // The same bytes as a bare header, so mutations reach the JSON checks without a valid prefix.
  const std::string_view json(reinterpret_cast<const char*>(data), size);
  for (uint64_t data_size : {uint64_t{0}, uint64_t{size}}) {
    auto bare = moelora::ParseSafetensorsHeader(json, data_size, "fuzz");
    if (bare.ok() && !Consistent(*bare, data_size)) __builtin_trap();
  }
  return 0;
}
