#ifndef MOELORA_CORE_RANDOM_MODEL_H_
#define MOELORA_CORE_RANDOM_MODEL_H_

// Deterministic random checkpoints in Hugging Face layout: the demo's built-in default model and
// the raw material of tests that need a model to corrupt or to adapt.

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/model_config.h"

namespace moelora {

// A tiny config of the given family (a few hundred KB of fp32 weights).
ModelConfig TinyModelConfig(ModelType type);

struct RandomModelOptions {
  uint64_t seed = 0;
  // Split the weights over this many shards with a model.safetensors.index.json (1 = one file).
  int num_shards = 1;
  // Standard deviation of projection and embedding weights.
  double weight_std = 0.15;
  // On-disk dtype (bf16 halves what large benchmark checkpoints take to write and read).
  at::ScalarType dtype = at::kFloat;
};

// Writes `dir`/config.json and the weights (created with the directory if needed).
absl::Status WriteRandomModel(const std::string& dir, const ModelConfig& config,
                              const RandomModelOptions& options = {});

struct RandomAdapterOptions {
  int64_t r = 4;
  double lora_alpha = 8;
  bool use_rslora = false;
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};
  std::vector<int64_t> layers_to_transform;  // empty: every layer
  uint64_t seed = 0;
  double std = 0.1;
};

// Writes a PEFT-format LoRA adapter for `base` (adapter_config.json + adapter_model.safetensors
// with keys as PEFT saves them) with random A and B.
absl::Status WriteRandomAdapter(const std::string& dir, const ModelConfig& base,
                                const RandomAdapterOptions& options);

}  // namespace moelora

#endif  // MOELORA_CORE_RANDOM_MODEL_H_
