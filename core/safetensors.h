#ifndef MOELORA_CORE_SAFETENSORS_H_
#define MOELORA_CORE_SAFETENSORS_H_

// The safetensors format (https://github.com/huggingface/safetensors), read through mmap and
// validated per its spec. Torch-free: core/checkpoint.h turns entries into tensors.
//
// File layout: 8-byte little-endian header length N, N bytes of JSON header, then the data
// buffer. The header maps tensor names to {dtype, shape, data_offsets: [begin, end]} (offsets
// relative to the data buffer) plus an optional "__metadata__" map of strings.

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace moelora {

// Debian's Abseil has its own string_view type, which std::string_view does not convert to.
inline absl::string_view ToAbsl(std::string_view text) {
  return absl::string_view(text.data(), text.size());
}

// Element types a safetensors file may hold.
enum class DType {
  kBool,
  kU8,
  kI8,
  kI16,
  kU16,
  kI32,
  kU32,
  kI64,
  kU64,
  kF16,
  kBF16,
  kF32,
  kF64,
  kF8E4M3,
  kF8E5M2,
};

// "F32" -> DType::kF32 etc. Unknown names give InvalidArgument.
absl::StatusOr<DType> ParseDType(std::string_view name);
std::string_view DTypeName(DType dtype);
size_t DTypeSize(DType dtype);

struct SafetensorsEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  // Byte range [begin, end) relative to the start of the data buffer.
  uint64_t begin = 0;
  uint64_t end = 0;

  int64_t NumElements() const;
};

struct SafetensorsHeader {
  // Sorted by begin offset.
  std::vector<SafetensorsEntry> entries;
  std::map<std::string, std::string> metadata;
};

// The spec's limit on the JSON header.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// Parses and validates a header against a data buffer of `data_size` bytes: valid JSON object,
// known dtypes, non-negative shapes, end - begin == numel * dtype size, offsets inside the buffer,
// contiguous (no gaps, no overlaps) and covering the buffer exactly. `label` (usually the file
// path) prefixes every error message. Exposed for the fuzz test.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header_json,
                                                         uint64_t data_size,
                                                         std::string_view label);

// Validates a whole file held in memory: the 8-byte length prefix (header at most
// kMaxSafetensorsHeaderBytes and inside the file), then the header against the rest as data
// buffer. `data_offset`, when non-null, receives where the data buffer starts. SafetensorsFile
// uses it on its mapping; the fuzzers call it directly.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsBuffer(absl::Span<const uint8_t> file,
                                                         std::string_view label,
                                                         uint64_t* data_offset = nullptr);

// A read-only, memory-mapped safetensors file. Tensor bytes are views into the mapping and stay
// valid for the object's lifetime.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return header_.entries; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }

  // nullptr when absent.
  const SafetensorsEntry* Find(std::string_view name) const;
  // The entry's bytes inside the mapping (little-endian, row-major).
  absl::Span<const uint8_t> Bytes(const SafetensorsEntry& entry) const;

 private:
  SafetensorsFile() = default;

  std::string path_;
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> index_by_name_;
  const uint8_t* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  const uint8_t* data_ = nullptr;  // mapping_ + 8 + header length
};

// One tensor to write: raw little-endian bytes of numel * DTypeSize(dtype).
struct SafetensorsTensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  absl::Span<const uint8_t> bytes;
};

// Writes a safetensors file (tensors laid out in the given order, header padded with spaces to
// an 8-byte boundary as the reference implementation does). Fails on duplicate names or a byte
// count that disagrees with the shape.
absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsTensorView>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace moelora

#endif  // MOELORA_CORE_SAFETENSORS_H_
