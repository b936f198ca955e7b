#ifndef MOELORA_CORE_CHECKPOINT_H_
#define MOELORA_CORE_CHECKPOINT_H_

// Tensors by name from a Hugging Face checkpoint directory: a single `model.safetensors`, or
// shards listed by `model.safetensors.index.json` ({"weight_map": {tensor: shard file}}).
// Also the bridge between safetensors bytes and at::Tensor in both directions.

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/safetensors.h"

namespace moelora {

// "[4, 64]": shapes as error messages print them.
std::string ShapeString(at::IntArrayRef shape);

// The at::ScalarType for a safetensors dtype; Unimplemented for types torch lacks in this build.
absl::StatusOr<at::ScalarType> ToScalarType(DType dtype);
absl::StatusOr<DType> FromScalarType(at::ScalarType type);

// Copies one entry into an owning, contiguous CPU tensor of the file's dtype.
absl::StatusOr<at::Tensor> ReadTensor(const SafetensorsFile& file, const SafetensorsEntry& entry);

// Writes CPU or device tensors (copied to contiguous CPU first) in the given order.
absl::Status WriteTensors(const std::string& path,
                          const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                          const std::map<std::string, std::string>& metadata = {});

class Checkpoint {
 public:
  // `dir` holds model.safetensors.index.json (sharded) or model.safetensors. Every shard is
  // opened and validated up front; a weight_map entry naming a tensor its shard lacks is an error.
  static absl::StatusOr<Checkpoint> OpenDirectory(const std::string& dir);
  // One safetensors file (adapters, routers, fixtures).
  static absl::StatusOr<Checkpoint> OpenFile(const std::string& path);

  bool Has(std::string_view name) const;
  std::vector<std::string> Names() const;  // sorted

  // The tensor as stored (CPU, file dtype). NotFound names the tensor and the checkpoint.
  absl::StatusOr<at::Tensor> Get(std::string_view name) const;
  // Like Get, and checks the shape: InvalidArgument "tensor 'x' in <file>: shape [a, b], expected
  // [c, d]" when it disagrees.
  absl::StatusOr<at::Tensor> Get(std::string_view name, at::IntArrayRef expected_shape) const;

  // The file a tensor lives in (for messages); the directory or file for an unknown name.
  std::string Location(std::string_view name) const;
  const std::string& source() const { return source_; }

 private:
  std::string source_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  // tensor name -> (file index, entry pointer into that file's entries)
  std::map<std::string, std::pair<size_t, const SafetensorsEntry*>, std::less<>> index_;
};

}  // namespace moelora

#endif  // MOELORA_CORE_CHECKPOINT_H_
