#ifndef MOELORA_TESTS_TESTING_RANDOM_ADAPTER_H_
#define MOELORA_TESTS_TESTING_RANDOM_ADAPTER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/model_config.h"

namespace moelora::testing_support {

struct RandomAdapterSpec {
  int64_t r = 4;
  double lora_alpha = 8;
  bool use_rslora = false;
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};
  std::vector<int64_t> layers_to_transform;  // empty: every layer
  uint64_t seed = 0;
  double std = 0.1;
};

// Writes a PEFT-format LoRA adapter (adapter_config.json + adapter_model.safetensors with keys
// as PEFT saves them) with random A and B for `base`.
absl::Status WriteRandomAdapter(const std::string& dir, const ModelConfig& base,
                                const RandomAdapterSpec& spec);

}  // namespace moelora::testing_support

#endif  // MOELORA_TESTS_TESTING_RANDOM_ADAPTER_H_
