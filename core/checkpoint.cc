#include "core/checkpoint.h"

#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <bit>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/file_io.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moelora {
namespace {

constexpr char kIndexFile[] = "model.safetensors.index.json";
constexpr char kSingleFile[] = "model.safetensors";

// safetensors stores little-endian bytes and tensors are filled by memcpy.
constexpr bool kLittleEndianHost = std::endian::native == std::endian::little;

std::string JoinPath(const std::string& dir, std::string_view file) {
  return (std::filesystem::path(dir) / file).string();
}

// A shard must be a plain file name in the checkpoint directory: an index must not make us
// read files elsewhere.
bool IsPlainFileName(std::string_view name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string_view::npos &&
         name.find('\0') == std::string_view::npos;
}

// Parses the index into tensor name -> shard file name.
absl::StatusOr<std::map<std::string, std::string>> ParseIndex(const std::string& index_path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFileToString(index_path, "checkpoint index"));
  nlohmann::json index;
  try {
    index = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": not valid JSON: ", e.what()));
  }
  if (!index.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": must be a JSON object, got ", index.type_name()));
  }
  auto weight_map = index.find("weight_map");
  if (weight_map == index.end() || !weight_map->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(index_path, ": 'weight_map' must be an object of tensor -> shard file"));
  }
  if (weight_map->empty()) {
    return absl::InvalidArgumentError(absl::StrCat(index_path, ": 'weight_map' is empty"));
  }
  std::map<std::string, std::string> shards;
  for (const auto& [tensor, shard] : weight_map->items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          index_path, ": tensor '", tensor, "': shard must be a string, got ", shard.type_name()));
    }
    const std::string& file = shard.get_ref<const std::string&>();
    if (!IsPlainFileName(file)) {
      return absl::InvalidArgumentError(
          absl::StrCat(index_path, ": tensor '", tensor, "': shard '", file,
                       "' must be a plain file name inside the checkpoint directory"));
    }
    shards.emplace(tensor, file);
  }
  return shards;
}

}  // namespace

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::StatusOr<at::ScalarType> ToScalarType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return at::kFloat;
    case DType::kF16:
      return at::kHalf;
    case DType::kBF16:
      return at::kBFloat16;
    case DType::kF64:
      return at::kDouble;
    case DType::kI64:
      return at::kLong;
    case DType::kI32:
      return at::kInt;
    case DType::kI16:
      return at::kShort;
    case DType::kI8:
      return at::kChar;
    case DType::kU8:
      return at::kByte;
    case DType::kBool:
      return at::kBool;
    default:
      return absl::UnimplementedError(absl::StrCat("safetensors dtype ", ToAbsl(DTypeName(dtype)),
                                                   " has no torch equivalent here"));
  }
}

absl::StatusOr<DType> FromScalarType(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::kF32;
    case at::kHalf:
      return DType::kF16;
    case at::kBFloat16:
      return DType::kBF16;
    case at::kDouble:
      return DType::kF64;
    case at::kLong:
      return DType::kI64;
    case at::kInt:
      return DType::kI32;
    case at::kShort:
      return DType::kI16;
    case at::kChar:
      return DType::kI8;
    case at::kByte:
      return DType::kU8;
    case at::kBool:
      return DType::kBool;
    default:
      return absl::UnimplementedError(
          absl::StrCat("torch dtype ", c10::toString(type), " has no safetensors equivalent"));
  }
}

absl::StatusOr<at::Tensor> ReadTensor(const SafetensorsFile& file, const SafetensorsEntry& entry) {
  const std::string where = absl::StrCat(file.path(), ": tensor '", entry.name, "'");
  if constexpr (!kLittleEndianHost) {
    return absl::UnimplementedError(absl::StrCat(where, ": big-endian hosts are not supported"));
  }
  absl::StatusOr<at::ScalarType> type = ToScalarType(entry.dtype);
  if (!type.ok()) return PrefixStatus(type.status(), absl::StrCat(where, ": "));
  const absl::Span<const uint8_t> bytes = file.Bytes(entry);
  if (entry.dtype == DType::kBool) {
    // Torch assumes bool bytes are 0 or 1; anything else is undefined behaviour in kernels.
    for (uint8_t byte : bytes) {
      if (byte > 1) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": BOOL data holds byte ", byte, ", expected 0 or 1"));
      }
    }
  }
  try {
    at::Tensor tensor = at::empty(entry.shape, at::TensorOptions().dtype(*type));
    if (tensor.nbytes() != bytes.size()) {
      return absl::InternalError(absl::StrCat(where, ": tensor has ", tensor.nbytes(),
                                              " bytes, file holds ", bytes.size()));
    }
    if (!bytes.empty()) std::memcpy(tensor.data_ptr(), bytes.data(), bytes.size());
    return tensor;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(where, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(absl::StrCat(where, ": ", e.what()));
  }
}

absl::Status WriteTensors(const std::string& path,
                          const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                          const std::map<std::string, std::string>& metadata) {
  if constexpr (!kLittleEndianHost) {
    return absl::UnimplementedError(absl::StrCat(path, ": big-endian hosts are not supported"));
  }
  // Holds the contiguous CPU copies alive while the views point into them.
  std::vector<at::Tensor> host;
  std::vector<SafetensorsTensorView> views;
  host.reserve(tensors.size());
  views.reserve(tensors.size());
  try {
    for (const auto& [name, tensor] : tensors) {
      const std::string where = absl::StrCat(path, ": tensor '", name, "'");
      if (!tensor.defined()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": undefined tensor"));
      }
      absl::StatusOr<DType> dtype = FromScalarType(tensor.scalar_type());
      if (!dtype.ok()) return PrefixStatus(dtype.status(), absl::StrCat(where, ": "));
      at::Tensor cpu = tensor.to(at::kCPU).contiguous();
      host.push_back(cpu);
      views.push_back(SafetensorsTensorView{
          .name = name,
          .dtype = *dtype,
          .shape = cpu.sizes().vec(),
          .bytes = absl::MakeConstSpan(static_cast<const uint8_t*>(cpu.data_ptr()), cpu.nbytes()),
      });
    }
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(absl::StrCat(path, ": ", e.what()));
  }
  return WriteSafetensors(path, views, metadata);
}

absl::StatusOr<Checkpoint> Checkpoint::OpenDirectory(const std::string& dir) {
  const std::string index_path = JoinPath(dir, kIndexFile);
  const std::string single_path = JoinPath(dir, kSingleFile);
  std::error_code error;
  if (!std::filesystem::is_regular_file(index_path, error)) {
    if (std::filesystem::is_regular_file(single_path, error)) {
      ASSIGN_OR_RETURN(Checkpoint checkpoint, OpenFile(single_path));
      checkpoint.source_ = dir;
      return checkpoint;
    }
    return absl::NotFoundError(absl::StrCat("checkpoint directory ", dir, " has neither ",
                                            kIndexFile, " nor ", kSingleFile));
  }

  ASSIGN_OR_RETURN(const auto weight_map, ParseIndex(index_path));
  Checkpoint checkpoint;
  checkpoint.source_ = dir;
  std::map<std::string, size_t> file_by_shard;
  for (const auto& [tensor, shard] : weight_map) {
    auto [it, inserted] = file_by_shard.emplace(shard, checkpoint.files_.size());
    if (inserted) {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> file =
          SafetensorsFile::Open(JoinPath(dir, shard));
      if (!file.ok()) {
        return PrefixStatus(file.status(), absl::StrCat(index_path, ": shard '", shard,
                                                        "' (for tensor '", tensor, "'): "));
      }
      checkpoint.files_.push_back(std::move(*file));
    }
    const SafetensorsFile& file = *checkpoint.files_[it->second];
    const SafetensorsEntry* entry = file.Find(tensor);
    if (entry == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor '", tensor,
                                                     "' is mapped to ", file.path(),
                                                     ", which does not contain it"));
    }
    checkpoint.index_.emplace(tensor, std::make_pair(it->second, entry));
  }
  return checkpoint;
}

absl::StatusOr<Checkpoint> Checkpoint::OpenFile(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(path));
  Checkpoint checkpoint;
  checkpoint.source_ = path;
  for (const SafetensorsEntry& entry : file->entries()) {
    checkpoint.index_.emplace(entry.name, std::make_pair(size_t{0}, &entry));
  }
  checkpoint.files_.push_back(std::move(file));
  return checkpoint;
}

bool Checkpoint::Has(std::string_view name) const { return index_.find(name) != index_.end(); }

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, location] : index_) names.push_back(name);
  return names;
}

absl::StatusOr<at::Tensor> Checkpoint::Get(std::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor '", ToAbsl(name), "' not found in ", source_));
  }
  const auto& [file_index, entry] = it->second;
  return ReadTensor(*files_[file_index], *entry);
}

absl::StatusOr<at::Tensor> Checkpoint::Get(std::string_view name,
                                           at::IntArrayRef expected_shape) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor '", ToAbsl(name), "' not found in ", source_));
  }
  const auto& [file_index, entry] = it->second;
  // Checked before copying so a wrong-shape multi-GB tensor costs nothing.
  if (at::IntArrayRef(entry->shape) != expected_shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor '", ToAbsl(name), "' in ", files_[file_index]->path(), ": shape ",
                     ShapeString(entry->shape), ", expected ", ShapeString(expected_shape)));
  }
  return ReadTensor(*files_[file_index], *entry);
}

std::string Checkpoint::Location(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? source_ : files_[it->second.first]->path();
}

}  // namespace moelora
