#include "tests/testing/random_adapter.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/linear.h"
#include "nlohmann/json.hpp"

namespace moelora::testing_support {

absl::Status WriteRandomAdapter(const std::string& dir, const ModelConfig& base,
                                const RandomAdapterSpec& spec) {
  std::filesystem::create_directories(dir);
  nlohmann::json config = {
      {"peft_type", "LORA"},
      {"r", spec.r},
      {"lora_alpha", spec.lora_alpha},
      {"use_rslora", spec.use_rslora},
      {"target_modules", spec.target_modules},
      {"bias", "none"},
      {"task_type", "CAUSAL_LM"},
  };
  if (!spec.layers_to_transform.empty()) config["layers_to_transform"] = spec.layers_to_transform;
  std::ofstream(dir + "/adapter_config.json") << config.dump(2);

  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(spec.seed);
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (int64_t layer = 0; layer < base.num_hidden_layers; ++layer) {
    if (!spec.layers_to_transform.empty() &&
        std::find(spec.layers_to_transform.begin(), spec.layers_to_transform.end(), layer) ==
            spec.layers_to_transform.end()) {
      continue;
    }
    for (int k = 0; k < kNumProjectionKinds; ++k) {
      const ProjectionId id{layer, static_cast<ProjectionKind>(k)};
      if (std::find(spec.target_modules.begin(), spec.target_modules.end(),
                    std::string(ProjectionName(id.kind))) == spec.target_modules.end()) {
        continue;
      }
      const ProjectionShape shape = ShapeOf(base, id.kind);
      const std::string prefix = "base_model.model." + id.ModulePath();
      tensors.emplace_back(prefix + ".lora_A.weight",
                           at::normal(0.0, spec.std, {spec.r, shape.in_features}, generator));
      tensors.emplace_back(prefix + ".lora_B.weight",
                           at::normal(0.0, spec.std, {shape.out_features, spec.r}, generator));
    }
  }
  return WriteTensors(dir + "/adapter_model.safetensors", tensors);
}

}  // namespace moelora::testing_support
