#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <exception>
#include <limits>
#include <optional>
#include <set>
#include <tuple>
#include <unordered_set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moelora {
namespace {

using Json = nlohmann::json;

constexpr char kMetadataKey[] = "__metadata__";

// Names and JSON come from untrusted files: escape and bound them so messages stay printable
// and short even for a 100 MB header.
constexpr size_t kMaxQuotedBytes = 200;
constexpr size_t kMaxShapeDimsShown = 16;

std::string Quote(std::string_view std_text) {
  const absl::string_view text = ToAbsl(std_text);
  if (text.size() <= kMaxQuotedBytes) {
    return absl::StrCat("'", absl::CHexEscape(text), "'");
  }
  return absl::StrCat("'", absl::CHexEscape(text.substr(0, kMaxQuotedBytes)), "...' (", text.size(),
                      " bytes)");
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  if (shape.size() <= kMaxShapeDimsShown) {
    return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
  }
  return absl::StrCat("[", absl::StrJoin(shape.subspan(0, kMaxShapeDimsShown), ", "), ", ... (",
                      shape.size(), " dims)]");
}

std::string JsonSnippet(const Json& value) {
  std::string text = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (text.size() > kMaxQuotedBytes) {
    text.resize(kMaxQuotedBytes);
    text += "...";
  }
  return text;
}

// Product of the dimensions, or nullopt when negative or past int64 (torch's numel type). A
// zero dimension makes the product zero, but the other dimensions must still fit, so the check
// does not depend on dimension order.
std::optional<uint64_t> CheckedNumElements(absl::Span<const int64_t> shape) {
  uint64_t product = 1;
  bool has_zero = false;
  for (int64_t dim : shape) {
    if (dim < 0) return std::nullopt;
    if (dim == 0) {
      has_zero = true;
      continue;
    }
    if (__builtin_mul_overflow(product, static_cast<uint64_t>(dim), &product) ||
        product > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return std::nullopt;
    }
  }
  return has_zero ? 0 : product;
}

uint64_t ReadLittleEndian64(const uint8_t* bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | bytes[i];
  return value;
}

// nlohmann keeps the last of duplicate keys; a header that names a tensor twice is ambiguous,
// so the parse callback records the first duplicate at any depth.
absl::StatusOr<Json> ParseHeaderJson(std::string_view text, absl::string_view label) {
  std::vector<std::unordered_set<std::string>> open_objects;
  std::optional<std::string> duplicate;
  auto callback = [&](int /*depth*/, Json::parse_event_t event, Json& parsed) {
    switch (event) {
      case Json::parse_event_t::object_start:
        open_objects.emplace_back();
        break;
      case Json::parse_event_t::object_end:
        if (!open_objects.empty()) open_objects.pop_back();
        break;
      case Json::parse_event_t::key:
        if (!duplicate.has_value() && !open_objects.empty() && parsed.is_string() &&
            !open_objects.back().insert(parsed.get_ref<const std::string&>()).second) {
          duplicate = parsed.get_ref<const std::string&>();
        }
        break;
      default:
        break;
    }
    return true;
  };
  Json json;
  try {
    json = Json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true);
  } catch (const Json::exception& e) {
    // what() quotes the offending token, which may be long or binary.
    std::string_view what = e.what();
    std::string reason = absl::CHexEscape(ToAbsl(what.substr(0, kMaxQuotedBytes)));
    if (what.size() > kMaxQuotedBytes) reason += "...";
    return absl::InvalidArgumentError(absl::StrCat(label, ": header is not valid JSON: ", reason));
  } catch (const std::exception& e) {  // bad_alloc and friends: still a Status, never an abort.
    return absl::ResourceExhaustedError(
        absl::StrCat(label, ": cannot parse header JSON: ", e.what()));
  }
  if (duplicate.has_value()) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": header has duplicate key ", Quote(*duplicate)));
  }
  return json;
}

absl::StatusOr<std::map<std::string, std::string>> ParseMetadata(const Json& value,
                                                                 absl::string_view label) {
  if (!value.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label,
                                                   ": '__metadata__' must be an object of "
                                                   "strings, got ",
                                                   value.type_name()));
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(label, ": '__metadata__' value for key ",
                                                     Quote(key), " must be a string, got ",
                                                     item.type_name()));
    }
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

absl::StatusOr<SafetensorsEntry> ParseEntry(const std::string& name, const Json& value,
                                            uint64_t data_size, absl::string_view label) {
  const std::string where = absl::StrCat(label, ": tensor ", Quote(name));
  if (!value.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": entry must be an object, got ", value.type_name()));
  }
  SafetensorsEntry entry;
  entry.name = name;

  auto dtype_it = value.find("dtype");
  if (dtype_it == value.end() || !dtype_it->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": 'dtype' must be a string"));
  }
  absl::StatusOr<DType> dtype = ParseDType(dtype_it->get_ref<const std::string&>());
  if (!dtype.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", dtype.status().message()));
  }
  entry.dtype = *dtype;

  auto shape_it = value.find("shape");
  if (shape_it == value.end() || !shape_it->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": 'shape' must be an array of non-negative integers"));
  }
  entry.shape.reserve(shape_it->size());
  for (const Json& dim : *shape_it) {
    // is_number_unsigned excludes negatives; integers beyond uint64 parse as floats.
    if (!dim.is_number_unsigned() ||
        dim.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": shape ", JsonSnippet(*shape_it),
                       " must hold non-negative integers below 2^63, got ", JsonSnippet(dim)));
    }
    entry.shape.push_back(static_cast<int64_t>(dim.get<uint64_t>()));
  }

  auto offsets_it = value.find("data_offsets");
  if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
      !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned()) {
    return absl::InvalidArgumentError(absl::StrCat(
        where, ": 'data_offsets' must be [begin, end] of non-negative integers, got ",
        offsets_it == value.end() ? std::string("nothing") : JsonSnippet(*offsets_it)));
  }
  entry.begin = (*offsets_it)[0].get<uint64_t>();
  entry.end = (*offsets_it)[1].get<uint64_t>();
  const std::string offsets = absl::StrCat("data_offsets [", entry.begin, ", ", entry.end, "]");
  if (entry.end < entry.begin) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", offsets, ": end is before begin"));
  }
  if (entry.end > data_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": ", offsets, " run past the data buffer of ", data_size, " bytes"));
  }

  const std::string shape_and_dtype =
      absl::StrCat("shape ", ShapeString(entry.shape), ", ", ToAbsl(DTypeName(entry.dtype)));
  std::optional<uint64_t> numel = CheckedNumElements(entry.shape);
  uint64_t expected_bytes = 0;
  if (!numel.has_value() ||
      __builtin_mul_overflow(*numel, DTypeSize(entry.dtype), &expected_bytes)) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": ", shape_and_dtype, " has too many elements (overflows 64 bits)"));
  }
  if (entry.end - entry.begin != expected_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", offsets, " hold ",
                                                   entry.end - entry.begin, " bytes, expected ",
                                                   expected_bytes, " (", shape_and_dtype, ")"));
  }
  return entry;
}

// Sorted by begin, the entries must tile [0, data_size) exactly, as the reference validator
// requires: a gap or overlap means a corrupt or hand-edited file.
absl::Status CheckLayout(const std::vector<SafetensorsEntry>& entries, uint64_t data_size,
                         absl::string_view label) {
  uint64_t covered = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const SafetensorsEntry& entry : entries) {
    if (entry.begin != covered) {
      std::string problem =
          entry.begin < covered
              ? absl::StrCat("overlap tensor ", Quote(previous->name), ", which ends at ", covered)
              : absl::StrCat("leave a gap of ", entry.begin - covered, " bytes after ",
                             previous == nullptr ? std::string("the start of the data buffer")
                                                 : absl::StrCat("tensor ", Quote(previous->name),
                                                                ", which ends at ", covered));
      return absl::InvalidArgumentError(absl::StrCat(label, ": tensor ", Quote(entry.name),
                                                     ": data_offsets [", entry.begin, ", ",
                                                     entry.end, "] ", problem));
    }
    covered = entry.end;
    previous = &entry;
  }
  if (covered != data_size) {
    if (previous == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          label, ": header lists no tensors but the data buffer holds ", data_size, " bytes"));
    }
    return absl::InvalidArgumentError(absl::StrCat(label, ": data buffer holds ", data_size,
                                                   " bytes but the last tensor ",
                                                   Quote(previous->name), " ends at ", covered,
                                                   " (", data_size - covered, " trailing bytes)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<DType> ParseDType(std::string_view name) {
  static constexpr std::pair<std::string_view, DType> kNames[] = {
      {"BOOL", DType::kBool}, {"U8", DType::kU8},          {"I8", DType::kI8},
      {"I16", DType::kI16},   {"U16", DType::kU16},        {"I32", DType::kI32},
      {"U32", DType::kU32},   {"I64", DType::kI64},        {"U64", DType::kU64},
      {"F16", DType::kF16},   {"BF16", DType::kBF16},      {"F32", DType::kF32},
      {"F64", DType::kF64},   {"F8_E4M3", DType::kF8E4M3}, {"F8_E5M2", DType::kF8E5M2},
  };
  for (const auto& [text, dtype] : kNames) {
    if (text == name) return dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype ", Quote(name)));
}

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kBool:
      return "BOOL";
    case DType::kU8:
      return "U8";
    case DType::kI8:
      return "I8";
    case DType::kI16:
      return "I16";
    case DType::kU16:
      return "U16";
    case DType::kI32:
      return "I32";
    case DType::kU32:
      return "U32";
    case DType::kI64:
      return "I64";
    case DType::kU64:
      return "U64";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    case DType::kF32:
      return "F32";
    case DType::kF64:
      return "F64";
    case DType::kF8E4M3:
      return "F8_E4M3";
    case DType::kF8E5M2:
      return "F8_E5M2";
  }
  return "UNKNOWN";
}

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kBool:
    case DType::kU8:
    case DType::kI8:
    case DType::kF8E4M3:
    case DType::kF8E5M2:
      return 1;
    case DType::kI16:
    case DType::kU16:
    case DType::kF16:
    case DType::kBF16:
      return 2;
    case DType::kI32:
    case DType::kU32:
    case DType::kF32:
      return 4;
    case DType::kI64:
    case DType::kU64:
    case DType::kF64:
      return 8;
  }
  return 0;  // Out-of-range enum value; callers treat 0 as invalid.
}

int64_t SafetensorsEntry::NumElements() const {
  // -1 only for a shape that validation would reject (negative or overflowing).
  std::optional<uint64_t> numel = CheckedNumElements(shape);
  return numel.has_value() ? static_cast<int64_t>(*numel) : -1;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(std::string_view header_json,
                                                         uint64_t data_size,
                                                         std::string_view std_label) {
  const absl::string_view label = ToAbsl(std_label);
  ASSIGN_OR_RETURN(Json json, ParseHeaderJson(header_json, label));
  if (!json.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": header must be a JSON object, got ", json.type_name()));
  }
  SafetensorsHeader header;
  header.entries.reserve(json.size());
  for (const auto& [key, value] : json.items()) {
    if (key == kMetadataKey) {
      ASSIGN_OR_RETURN(header.metadata, ParseMetadata(value, label));
      continue;
    }
    ASSIGN_OR_RETURN(SafetensorsEntry entry, ParseEntry(key, value, data_size, label));
    header.entries.push_back(std::move(entry));
  }
  // The name breaks ties between zero-size tensors so the order is deterministic.
  std::sort(header.entries.begin(), header.entries.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
            });
  RETURN_IF_ERROR(CheckLayout(header.entries, data_size, label));
  return header;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsBuffer(absl::Span<const uint8_t> file,
                                                         std::string_view std_label,
                                                         uint64_t* data_offset) {
  const absl::string_view label = ToAbsl(std_label);
  if (file.size() < 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        label, ": file is ", file.size(), " bytes, too short for the 8-byte header length"));
  }
  const uint64_t header_size = ReadLittleEndian64(file.data());
  const uint64_t available = file.size() - 8;
  if (header_size > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": header length ", header_size,
                                                   " exceeds the limit of ",
                                                   kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (header_size > available) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": header length ", header_size, " exceeds the ", available,
                     " bytes after the length prefix (truncated file?)"));
  }
  std::string_view header_json(reinterpret_cast<const char*>(file.data()) + 8, header_size);
  ASSIGN_OR_RETURN(SafetensorsHeader header,
                   ParseSafetensorsHeader(header_json, available - header_size, std_label));
  if (data_offset != nullptr) *data_offset = 8 + header_size;
  return header;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open safetensors file"));
  }
  // The mapping keeps the file alive; the descriptor is not needed past mmap.
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};

  struct stat info;
  if (::fstat(fd, &info) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot stat safetensors file"));
  }
  if (!S_ISREG(info.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t file_size = static_cast<uint64_t>(info.st_size);
  if (file_size < 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": file is ", file_size, " bytes, too short for the 8-byte header length"));
  }
  if (file_size > std::numeric_limits<size_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": file too large to map"));
  }

  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  // Every tensor is read once, soon: fault a small file's pages (an adapter's) in with one call,
  // not one fault per page. Model shards of many GB are left to fault in as they are read.
  constexpr uint64_t kPopulateUpTo = uint64_t{1} << 30;
  const int populate = file_size <= kPopulateUpTo ? MAP_POPULATE : 0;
  void* mapping = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE | populate, fd, 0);
  if (mapping == MAP_FAILED) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot mmap ", file_size, " bytes"));
  }
  file->mapping_ = static_cast<const uint8_t*>(mapping);
  file->mapping_size_ = static_cast<size_t>(file_size);

  uint64_t data_offset = 0;
  ASSIGN_OR_RETURN(file->header_,
                   ParseSafetensorsBuffer(absl::MakeConstSpan(file->mapping_, file->mapping_size_),
                                          path, &data_offset));
  file->data_ = file->mapping_ + data_offset;
  for (size_t i = 0; i < file->header_.entries.size(); ++i) {
    file->index_by_name_.emplace(file->header_.entries[i].name, i);
  }
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) {
    ::munmap(const_cast<uint8_t*>(mapping_), mapping_size_);
  }
}

const SafetensorsEntry* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_by_name_.find(name);
  return it == index_by_name_.end() ? nullptr : &header_.entries[it->second];
}

absl::Span<const uint8_t> SafetensorsFile::Bytes(const SafetensorsEntry& entry) const {
  return absl::MakeConstSpan(data_ + entry.begin, entry.end - entry.begin);
}

namespace {

absl::Status WriteAll(int fd, std::string_view bytes, const std::string& path) {
  while (!bytes.empty()) {
    const ssize_t written = ::write(fd, bytes.data(), bytes.size());
    if (written < 0) {
      if (errno == EINTR) continue;
      return absl::ErrnoToStatus(errno, absl::StrCat(path, ": write failed"));
    }
    bytes.remove_prefix(static_cast<size_t>(written));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> BuildHeader(const std::string& path,
                                        const std::vector<SafetensorsTensorView>& tensors,
                                        const std::map<std::string, std::string>& metadata) {
  // Built by hand rather than as one ordered_json object, whose key lookup is linear per insert.
  std::string header = "{";
  try {
    if (!metadata.empty()) {
      Json metadata_json(metadata);
      absl::StrAppend(&header, "\"", kMetadataKey, "\":", metadata_json.dump());
    }
    std::set<std::string_view> seen;
    uint64_t offset = 0;
    for (const SafetensorsTensorView& tensor : tensors) {
      const std::string where = absl::StrCat(path, ": tensor ", Quote(tensor.name));
      if (tensor.name == kMetadataKey) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": the name is reserved"));
      }
      if (!seen.insert(tensor.name).second) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": duplicate tensor name"));
      }
      const size_t dtype_size = DTypeSize(tensor.dtype);
      if (dtype_size == 0) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": invalid dtype"));
      }
      std::optional<uint64_t> numel = CheckedNumElements(tensor.shape);
      uint64_t expected_bytes = 0;
      if (!numel.has_value() || __builtin_mul_overflow(*numel, dtype_size, &expected_bytes)) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": invalid shape ", ShapeString(tensor.shape)));
      }
      if (tensor.bytes.size() != expected_bytes) {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": ", tensor.bytes.size(), " bytes, expected ", expected_bytes, " (shape ",
            ShapeString(tensor.shape), ", ", ToAbsl(DTypeName(tensor.dtype)), ")"));
      }
      Json entry = Json::object();
      entry["dtype"] = std::string(DTypeName(tensor.dtype));
      entry["shape"] = tensor.shape;
      entry["data_offsets"] = Json::array({offset, offset + expected_bytes});
      offset += expected_bytes;
      if (header.size() > 1) header += ',';
      absl::StrAppend(&header, Json(tensor.name).dump(), ":", entry.dump());
    }
  } catch (const Json::exception& e) {  // Names or metadata that are not valid UTF-8.
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": cannot encode safetensors header: ", e.what()));
  }
  header += '}';
  // Spaces pad the header so the data buffer starts 8-byte aligned, as the reference does.
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header of ", header.size(),
                                                   " bytes exceeds the limit of ",
                                                   kMaxSafetensorsHeaderBytes));
  }
  return header;
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path,
                              const std::vector<SafetensorsTensorView>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  ASSIGN_OR_RETURN(const std::string header, BuildHeader(path, tensors, metadata));
  std::string prefix(8, '\0');
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);

  // Written next to the destination and renamed over it, so readers never see a partial file.
  std::string temp_path = path + ".tmp.XXXXXX";
  const int fd = ::mkstemp(temp_path.data());
  if (fd < 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot create temporary file"));
  }
  absl::Status status = [&]() -> absl::Status {
    if (::fchmod(fd, 0644) != 0) {
      return absl::ErrnoToStatus(errno, absl::StrCat(temp_path, ": chmod failed"));
    }
    RETURN_IF_ERROR(WriteAll(fd, prefix, temp_path));
    RETURN_IF_ERROR(WriteAll(fd, header, temp_path));
    for (const SafetensorsTensorView& tensor : tensors) {
      RETURN_IF_ERROR(WriteAll(
          fd,
          std::string_view(reinterpret_cast<const char*>(tensor.bytes.data()), tensor.bytes.size()),
          temp_path));
    }
    if (::fsync(fd) != 0) {
      return absl::ErrnoToStatus(errno, absl::StrCat(temp_path, ": fsync failed"));
    }
    return absl::OkStatus();
  }();
  if (::close(fd) != 0 && status.ok()) {
    status = absl::ErrnoToStatus(errno, absl::StrCat(temp_path, ": close failed"));
  }
  if (status.ok() && ::rename(temp_path.c_str(), path.c_str()) != 0) {
    status = absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot rename ", temp_path));
  }
  if (!status.ok()) ::unlink(temp_path.c_str());
  return status;
}

}  // namespace moelora
