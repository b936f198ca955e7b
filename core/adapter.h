#ifndef MOELORA_CORE_ADAPTER_H_
#define MOELORA_CORE_ADAPTER_H_

// A LoRA adapter as PEFT saves it: a directory with adapter_config.json and
// adapter_model.safetensors, read into per-projection A, B and scaling, validated against the
// base model's config. Whatever PEFT feature we do not implement is refused by name.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/linear.h"
#include "core/model_config.h"

namespace moelora {

// The adapter_config.json fields we read (PEFT's LoraConfig).
struct AdapterConfig {
  int64_t r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  // target_modules: a list (names matched exactly or as a dotted suffix), a regex string (full
  // match against the module name), or "all-linear".
  std::vector<std::string> target_module_list;
  std::optional<std::string> target_module_regex;
  bool all_linear = false;
  // exclude_modules: the same two forms (list or regex string); an excluded module is never
  // targeted, whatever target_modules says.
  std::vector<std::string> exclude_module_list;
  std::optional<std::string> exclude_module_regex;
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  // The pattern keys in adapter_config.json's order: PEFT takes the first key that matches, so
  // order matters when keys overlap (PEFT writes the file with sorted keys, and that is the order
  // a reloaded PeftModel uses). Keys missing here are tried after these, sorted.
  std::vector<std::string> rank_pattern_order;
  std::vector<std::string> alpha_pattern_order;
  std::vector<int64_t> layers_to_transform;  // empty = all layers
  std::vector<std::string> layers_pattern;   // empty = PEFT's defaults
  // Read and ignored: PEFT forces it to false for torch.nn.Linear targets (all of ours), and
  // lora_A / lora_B are stored [r, in] / [out, r] either way.
  bool fan_in_fan_out = false;

  // Parses and refuses unsupported features (use_dora, modules_to_save, lora_bias, bias other than
  // "none", pissa/olora/corda/loftq init, ...) with an InvalidArgument naming the field.
  static absl::StatusOr<AdapterConfig> FromJson(absl::string_view json_text,
                                                absl::string_view label);

  // PEFT's rules: is `module_path` ("model.layers.3.self_attn.q_proj") targeted, and its rank and
  // scaling (rank_pattern / alpha_pattern matched as PEFT matches them; alpha/r or alpha/sqrt(r)).
  // As in PEFT, layers_to_transform reads the layer index from `module_path` through
  // layers_pattern; `layer` is only the caller's index of the same module and is not consulted.
  bool Targets(absl::string_view module_path, int64_t layer) const;
  int64_t RankFor(absl::string_view module_path) const;
  double ScalingFor(absl::string_view module_path) const;
};

// One adapted projection.
struct AdapterModule {
  ProjectionId id;
  int64_t rank = 0;
  double scaling = 1.0;
  at::Tensor a;  // [rank, in_features], fp32, CPU
  at::Tensor b;  // [out_features, rank], fp32, CPU
};

class Adapter {
 public:
  // Loads `dir` for the base model described by `base`. Every tensor key must map to a projection
  // of the right shape ([r, in] for lora_A, [out, r] for lora_B, r from rank_pattern), every
  // module the config targets must have both tensors, and weights must be finite. Errors name the
  // adapter, the key or field and what was expected.
  static absl::StatusOr<Adapter> Load(const std::string& name, const std::string& dir,
                                      const ModelConfig& base);

  const std::string& name() const { return name_; }
  const std::string& source() const { return source_; }
  const AdapterConfig& config() const { return config_; }
  // Sorted by (layer, projection kind).
  const std::vector<AdapterModule>& modules() const { return modules_; }
  int64_t max_rank() const;
  // Bytes of A and B at `element_size` bytes per value (fp32 as loaded: 4).
  int64_t bytes(int64_t element_size = 4) const;

 private:
  std::string name_;
  std::string source_;
  AdapterConfig config_;
  std::vector<AdapterModule> modules_;
};

}  // namespace moelora

#endif  // MOELORA_CORE_ADAPTER_H_
