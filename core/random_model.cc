#include "core/random_model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/linear.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moelora {

ModelConfig TinyModelConfig(ModelType type) {
  ModelConfig c;
  c.model_type = type;
  c.vocab_size = 128;
  c.hidden_size = 64;
  c.intermediate_size = 128;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 256;
  c.rms_norm_eps = 1e-5;
  switch (type) {
    case ModelType::kLlama:
      c.llama3_rope_scaling = Llama3RopeScaling{8.0, 1.0, 4.0, 64};
      break;
    case ModelType::kMistral:
      c.sliding_window = 6;
      break;
    case ModelType::kQwen2:
      c.qkv_bias = true;
      c.tie_word_embeddings = true;
      c.rope_theta = 1e6;
      break;
    case ModelType::kGemma:
      c.head_dim = 32;
      c.num_key_value_heads = 1;
      c.activation = Activation::kGeluTanh;
      c.tie_word_embeddings = true;
      c.scale_embeddings = true;
      c.norm_weight_plus_one = true;
      break;
  }
  return c;
}

absl::Status WriteRandomModel(const std::string& dir, const ModelConfig& c,
                              const RandomModelOptions& options) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) return absl::InternalError(absl::StrCat("creating ", dir, ": ", error.message()));
  {
    std::ofstream config_file(dir + "/config.json");
    config_file << c.ToJson();
    if (!config_file) return absl::InternalError(absl::StrCat("writing ", dir, "/config.json"));
  }
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  try {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
    auto normal = [&](std::vector<int64_t> shape) {
      return at::normal(0.0, options.weight_std, shape, generator).to(options.dtype);
    };
    // Norm weights near their neutral value: 1 for w, 0 for Gemma's (1 + w).
    auto norm = [&]() {
      const double center = c.norm_weight_plus_one ? 0.0 : 1.0;
      return at::normal(center, 0.1, {c.hidden_size}, generator).to(options.dtype);
    };
    tensors.emplace_back("model.embed_tokens.weight", normal({c.vocab_size, c.hidden_size}));
    for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
      const std::string prefix = absl::StrCat("model.layers.", i, ".");
      tensors.emplace_back(prefix + "input_layernorm.weight", norm());
      tensors.emplace_back(prefix + "post_attention_layernorm.weight", norm());
      for (int k = 0; k < kNumProjectionKinds; ++k) {
        const auto kind = static_cast<ProjectionKind>(k);
        const auto [out, in, has_bias] = ShapeOf(c, kind);
        const std::string path = ProjectionId{i, kind}.ModulePath();
        tensors.emplace_back(path + ".weight", normal({out, in}));
        if (has_bias) tensors.emplace_back(path + ".bias", normal({out}));
      }
    }
    tensors.emplace_back("model.norm.weight", norm());
    if (!c.tie_word_embeddings) {
      tensors.emplace_back("lm_head.weight", normal({c.vocab_size, c.hidden_size}));
    }
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("random weights: ", e.what_without_backtrace()));
  }

  const int num_shards = std::max(1, options.num_shards);
  if (num_shards == 1) return WriteTensors(dir + "/model.safetensors", tensors);
  // Split in order, as save_pretrained does, and write the index that maps names to shards.
  nlohmann::json weight_map = nlohmann::json::object();
  const size_t per_shard = (tensors.size() + num_shards - 1) / num_shards;
  for (int s = 0; s < num_shards; ++s) {
    const std::string file = absl::StrCat("model-", absl::Dec(s + 1, absl::kZeroPad5), "-of-",
                                          absl::Dec(num_shards, absl::kZeroPad5), ".safetensors");
    const size_t begin = std::min(tensors.size(), s * per_shard);
    const size_t end = std::min(tensors.size(), begin + per_shard);
    std::vector<std::pair<std::string, at::Tensor>> shard(tensors.begin() + begin,
                                                          tensors.begin() + end);
    for (const auto& [name, tensor] : shard) weight_map[name] = file;
    RETURN_IF_ERROR(WriteTensors(dir + "/" + file, shard));
  }
  std::ofstream index(dir + "/model.safetensors.index.json");
  index << nlohmann::json{{"metadata", nlohmann::json::object()}, {"weight_map", weight_map}}.dump(
      2);
  if (!index)
    return absl::InternalError(absl::StrCat("writing ", dir, "/model.safetensors.index.json"));
  return absl::OkStatus();
}

absl::Status WriteRandomAdapter(const std::string& dir, const ModelConfig& base,
                                const RandomAdapterOptions& spec) {
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) return absl::InternalError(absl::StrCat("creating ", dir, ": ", error.message()));
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

}  // namespace moelora
