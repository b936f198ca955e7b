#include "core/adapter.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <fstream>
#include <memory>
#include <regex>
#include <sstream>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/checkpoint.h"
#include "core/file_io.h"
#include "core/json_fields.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moelora {
namespace {

using json_fields::FieldError;

// ordered_json keeps the file's key order: rank_pattern / alpha_pattern are first-match-wins.
using Json = nlohmann::ordered_json;

constexpr char kConfigFile[] = "adapter_config.json";
constexpr char kWeightsFile[] = "adapter_model.safetensors";
// PEFT saves LoRA weights under the PeftModel's attribute path, adapter name stripped:
// base_model.model.<module path>.lora_A.weight.
constexpr absl::string_view kKeyPrefix = "base_model.model.";

bool IsUnset(const Json& json, const char* field) {
  auto it = json.find(field);
  return it == json.end() || it->is_null();
}

// Null, absent, false, 0, "", [] and {} are all "not used" (PEFT tests these fields by truth).
bool IsEmptyValue(const Json& value) {
  if (value.is_null()) return true;
  if (value.is_boolean()) return !value.get<bool>();
  if (value.is_string()) return value.get<std::string>().empty();
  if (value.is_array() || value.is_object()) return value.empty();
  if (value.is_number()) return value.get<double>() == 0.0;
  return false;
}

// Compiles `pattern` (ECMAScript, close to Python's re for these patterns) or says why not.
absl::StatusOr<std::shared_ptr<const std::regex>> CompileRegex(const std::string& pattern) {
  try {
    return std::make_shared<const std::regex>(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    return absl::InvalidArgumentError(e.what());
  }
}

absl::Status CheckRegex(absl::string_view label, absl::string_view field,
                        const std::string& pattern, const std::string& as_used) {
  absl::StatusOr<std::shared_ptr<const std::regex>> compiled = CompileRegex(as_used);
  if (!compiled.ok()) {
    return FieldError(label, field,
                      absl::StrCat("has '", pattern, "', which is not a regular expression we can ",
                                   "use (", compiled.status().message(), ")"));
  }
  return absl::OkStatus();
}

// re.fullmatch(pattern, text)
bool FullMatch(const std::string& pattern, const std::string& text) {
  absl::StatusOr<std::shared_ptr<const std::regex>> re = CompileRegex(pattern);
  if (!re.ok()) return false;
  try {
    return std::regex_match(text, **re);
  } catch (const std::regex_error&) {
    return false;
  }
}

// re.match(pattern, text): anchored at the start only. Fills `group1` when asked.
bool MatchAtStart(const std::string& pattern, const std::string& text,
                  std::string* group1 = nullptr) {
  absl::StatusOr<std::shared_ptr<const std::regex>> re = CompileRegex(pattern);
  if (!re.ok()) return false;
  try {
    std::smatch match;
    if (!std::regex_search(text, match, **re, std::regex_constants::match_continuous)) {
      return false;
    }
    if (group1 != nullptr) *group1 = match.size() > 1 ? match[1].str() : "";
    return true;
  } catch (const std::regex_error&) {
    return false;
  }
}

// PEFT's get_pattern_key (utils/other.py, 0.21): re.match(rf"(.*\.)?({key})$", module_path).
// Older releases used rf".*\.{key}$", which cannot match a key naming the whole path.
std::string PatternKeyRegex(const std::string& key) { return absl::StrCat("(.*\\.)?(", key, ")$"); }

bool PatternKeyMatches(const std::string& key, const std::string& module_path) {
  return MatchAtStart(PatternKeyRegex(key), module_path);
}

// A list of module names matches as PEFT's check_target_module_exists does: equal to an entry, or
// ending with "." + entry.
bool ListMatches(const std::vector<std::string>& names, const std::string& key) {
  for (const std::string& name : names) {
    if (key == name || absl::EndsWith(key, absl::StrCat(".", name))) return true;
  }
  return false;
}

// Keys in file order first, then any the order list lacks (a hand-built config), sorted.
template <typename T>
std::vector<std::string> PatternKeys(const std::vector<std::string>& order,
                                     const std::map<std::string, T>& pattern) {
  std::vector<std::string> keys;
  for (const std::string& key : order) {
    if (pattern.count(key) > 0) keys.push_back(key);
  }
  for (const auto& [key, value] : pattern) {
    if (std::find(order.begin(), order.end(), key) == order.end()) keys.push_back(key);
  }
  return keys;
}

// The rank_pattern / alpha_pattern key PEFT would pick for `module_path`, if any.
template <typename T>
std::optional<std::string> FindPatternKey(const std::vector<std::string>& order,
                                          const std::map<std::string, T>& pattern,
                                          const std::string& module_path) {
  for (const std::string& key : PatternKeys(order, pattern)) {
    if (PatternKeyMatches(key, module_path)) return key;
  }
  return std::nullopt;
}

// "model.layers.3.self_attn.q_proj" -> {3, kQ}; anything else (lm_head, embed_tokens, a wrong
// parent such as model.layers.0.mlp.q_proj) -> nullopt.
std::optional<ProjectionId> ParseProjectionPath(absl::string_view path) {
  std::vector<absl::string_view> parts = absl::StrSplit(path, '.');
  if (parts.size() != 5 || parts[0] != "model" || parts[1] != "layers") return std::nullopt;
  if (parts[2].empty() || !std::all_of(parts[2].begin(), parts[2].end(), absl::ascii_isdigit)) {
    return std::nullopt;
  }
  int64_t layer = 0;
  if (!absl::SimpleAtoi(parts[2], &layer) || absl::StrCat(layer) != parts[2]) return std::nullopt;
  std::optional<ProjectionKind> kind = ProjectionFromName(parts[4]);
  if (!kind.has_value() || ProjectionParent(*kind) != parts[3]) return std::nullopt;
  return ProjectionId{layer, *kind};
}

// ---- adapter_config.json -------------------------------------------------------------------

absl::Status RefuseFeatures(const Json& json, absl::string_view label) {
  if (auto it = json.find("peft_type"); it != json.end() && !it->is_null()) {
    if (!it->is_string() || it->get<std::string>() != "LORA") {
      return FieldError(label, "peft_type",
                        absl::StrCat("is ", it->dump(), ": only \"LORA\" adapters are supported"));
    }
  }
  // Boolean switches for LoRA variants whose forward differs from x·Aᵀ·Bᵀ·scaling.
  const std::pair<const char*, const char*> switches[] = {
      {"use_dora", "DoRA (weight-decomposed LoRA) is not supported"},
      {"lora_bias", "a bias on lora_B is not supported"},
      {"use_qalora", "QALoRA is not supported"},
  };
  for (const auto& [field, why] : switches) {
    ASSIGN_OR_RETURN(bool on, json_fields::Bool(json, label, field, false));
    if (on) return FieldError(label, field, absl::StrCat("is true: ", why));
  }
  if (auto it = json.find("bias"); it != json.end() && !it->is_null()) {
    if (!it->is_string() || it->get<std::string>() != "none") {
      return FieldError(label, "bias",
                        absl::StrCat("is ", it->dump(),
                                     ": only \"none\" is supported (\"all\" and \"lora_only\" "
                                     "train the base model's biases)"));
    }
  }
  // Features that are in use whenever the field holds something.
  const std::pair<const char*, const char*> in_use[] = {
      {"modules_to_save", "fully trained extra modules (modules_to_save) are not supported"},
      {"layer_replication", "layer replication is not supported"},
      {"target_parameters", "LoRA on parameters (target_parameters) is not supported"},
      {"trainable_token_indices", "trainable token embeddings are not supported"},
      {"alora_invocation_tokens", "activated LoRA (aLoRA) is not supported"},
      {"megatron_config", "Megatron parallel layers are not supported"},
      {"use_bdlora", "block-diagonal LoRA (BD-LoRA) is not supported"},
      {"arrow_config", "Arrow routing is not supported"},
      {"monteclora_config", "MonteCLoRA is not supported"},
      {"kasa_config", "KaSA is not supported"},
  };
  for (const auto& [field, why] : in_use) {
    auto it = json.find(field);
    if (it != json.end() && !IsEmptyValue(*it)) {
      return FieldError(label, field, absl::StrCat("is ", it->dump(), ": ", why));
    }
  }
  if (auto it = json.find("init_lora_weights"); it != json.end() && !it->is_null()) {
    if (it->is_string()) {
      const std::string init = absl::AsciiStrToLower(it->get<std::string>());
      const bool changes_base = absl::StartsWith(init, "pissa") || init == "olora" ||
                                init == "corda" || init == "loftq" || init == "lora_ga";
      if (changes_base || init == "eva") {
        return FieldError(
            label, "init_lora_weights",
            absl::StrCat("is \"", it->get<std::string>(), "\": ",
                         changes_base ? "this initialisation changes the base model's weights, "
                                        "so the adapter does not apply to the original base; "
                                      : "",
                         "supported: true, false, \"gaussian\", \"orthogonal\", \"mica\""));
      }
      if (init != "gaussian" && init != "orthogonal" && init != "mica") {
        return FieldError(label, "init_lora_weights",
                          absl::StrCat("is \"", it->get<std::string>(),
                                       "\", which we do not know (supported: true, false, "
                                       "\"gaussian\", \"orthogonal\", \"mica\")"));
      }
    } else if (!it->is_boolean()) {
      return FieldError(label, "init_lora_weights", "must be true, false or a string");
    }
  }
  return absl::OkStatus();
}

// target_modules / exclude_modules: a list of names or a regex string.
absl::Status ParseModuleSelector(const Json& value, absl::string_view label, const char* field,
                                 std::vector<std::string>& list,
                                 std::optional<std::string>& regex) {
  if (value.is_string()) {
    regex = value.get<std::string>();
    return CheckRegex(label, field, *regex, *regex);
  }
  if (!value.is_array()) {
    return FieldError(label, field, "must be a list of module names or a regex string");
  }
  for (const Json& name : value) {
    if (!name.is_string()) {
      return FieldError(label, field,
                        absl::StrCat("must hold module names (strings), not ", name.dump()));
    }
    list.push_back(name.get<std::string>());
  }
  return absl::OkStatus();
}

absl::Status ParseLayers(const Json& json, absl::string_view label, AdapterConfig& config) {
  if (auto it = json.find("layers_to_transform"); it != json.end() && !it->is_null()) {
    if (it->is_number_integer()) {
      config.layers_to_transform.push_back(it->get<int64_t>());
    } else if (it->is_array()) {
      for (const Json& layer : *it) {
        if (!layer.is_number_integer()) {
          return FieldError(label, "layers_to_transform",
                            absl::StrCat("must hold layer indices (integers), not ", layer.dump()));
        }
        config.layers_to_transform.push_back(layer.get<int64_t>());
      }
    } else {
      return FieldError(label, "layers_to_transform", "must be an integer or a list of integers");
    }
  }
  if (auto it = json.find("layers_pattern"); it != json.end() && !it->is_null()) {
    std::vector<std::string> patterns;
    if (it->is_string()) {
      if (!it->get<std::string>().empty()) patterns.push_back(it->get<std::string>());
    } else if (it->is_array()) {
      for (const Json& pattern : *it) {
        if (!pattern.is_string()) {
          return FieldError(label, "layers_pattern",
                            absl::StrCat("must hold strings, not ", pattern.dump()));
        }
        patterns.push_back(pattern.get<std::string>());
      }
    } else {
      return FieldError(label, "layers_pattern", "must be a string or a list of strings");
    }
    for (const std::string& pattern : patterns) {
      RETURN_IF_ERROR(CheckRegex(label, "layers_pattern", pattern,
                                 absl::StrCat(".*\\.", pattern, "\\.(\\d+)\\.")));
    }
    config.layers_pattern = std::move(patterns);
  }
  // LoraConfig.__post_init__ refuses these combinations; so do we.
  const bool string_targets = config.all_linear || config.target_module_regex.has_value();
  if (string_targets && !config.layers_to_transform.empty()) {
    return FieldError(label, "layers_to_transform",
                      "cannot be used when target_modules is a string (regex or \"all-linear\")");
  }
  if (string_targets && !config.layers_pattern.empty()) {
    return FieldError(label, "layers_pattern",
                      "cannot be used when target_modules is a string (regex or \"all-linear\")");
  }
  if (!config.layers_pattern.empty() && config.layers_to_transform.empty()) {
    return FieldError(label, "layers_pattern", "is set but layers_to_transform is not");
  }
  return absl::OkStatus();
}

absl::Status ParsePatterns(const Json& json, absl::string_view label, AdapterConfig& config) {
  if (auto it = json.find("rank_pattern"); it != json.end() && !it->is_null()) {
    if (!it->is_object()) return FieldError(label, "rank_pattern", "must be an object");
    for (const auto& [key, value] : it->items()) {
      if (!value.is_number_integer() || value.get<int64_t>() <= 0) {
        return FieldError(label, "rank_pattern",
                          absl::StrCat("maps '", key, "' to ", value.dump(),
                                       "; ranks must be positive integers"));
      }
      RETURN_IF_ERROR(CheckRegex(label, "rank_pattern", key, PatternKeyRegex(key)));
      config.rank_pattern[key] = value.get<int64_t>();
      config.rank_pattern_order.push_back(key);
    }
  }
  if (auto it = json.find("alpha_pattern"); it != json.end() && !it->is_null()) {
    if (!it->is_object()) return FieldError(label, "alpha_pattern", "must be an object");
    for (const auto& [key, value] : it->items()) {
      if (!value.is_number() || !std::isfinite(value.get<double>())) {
        return FieldError(
            label, "alpha_pattern",
            absl::StrCat("maps '", key, "' to ", value.dump(), "; alphas must be numbers"));
      }
      RETURN_IF_ERROR(CheckRegex(label, "alpha_pattern", key, PatternKeyRegex(key)));
      config.alpha_pattern[key] = value.get<double>();
      config.alpha_pattern_order.push_back(key);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterConfig> ParseConfig(absl::string_view json_text, absl::string_view label) {
  Json json = Json::parse(json_text.begin(), json_text.end(), /*cb=*/nullptr,
                          /*allow_exceptions=*/false);
  if (json.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": not valid JSON"));
  }
  if (!json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": must hold a JSON object"));
  }
  RETURN_IF_ERROR(RefuseFeatures(json, label));

  AdapterConfig config;
  if (auto it = json.find("r"); it != json.end() && !it->is_null()) {
    if (!it->is_number_integer() || it->get<int64_t>() <= 0) {
      return FieldError(label, "r",
                        absl::StrCat("is ", it->dump(), "; must be a positive integer"));
    }
    config.r = it->get<int64_t>();
  }
  if (auto it = json.find("lora_alpha"); it != json.end() && !it->is_null()) {
    if (!it->is_number() || !std::isfinite(it->get<double>())) {
      return FieldError(label, "lora_alpha", absl::StrCat("is ", it->dump(), "; must be a number"));
    }
    config.lora_alpha = it->get<double>();
  }
  ASSIGN_OR_RETURN(config.use_rslora, json_fields::Bool(json, label, "use_rslora", false));
  ASSIGN_OR_RETURN(config.fan_in_fan_out, json_fields::Bool(json, label, "fan_in_fan_out", false));

  if (IsUnset(json, "target_modules")) {
    return FieldError(label, "target_modules",
                      "is missing or null: a saved adapter must name the modules it adapts");
  }
  const Json& targets = json["target_modules"];
  if (targets.is_string() && absl::AsciiStrToLower(targets.get<std::string>()) == "all-linear") {
    config.all_linear = true;
  } else {
    RETURN_IF_ERROR(ParseModuleSelector(targets, label, "target_modules", config.target_module_list,
                                        config.target_module_regex));
  }
  if (auto it = json.find("exclude_modules"); it != json.end() && !IsEmptyValue(*it)) {
    RETURN_IF_ERROR(ParseModuleSelector(*it, label, "exclude_modules", config.exclude_module_list,
                                        config.exclude_module_regex));
  }
  RETURN_IF_ERROR(ParseLayers(json, label, config));
  RETURN_IF_ERROR(ParsePatterns(json, label, config));
  return config;
}

// ---- adapter_model.safetensors keys ---------------------------------------------------------

struct ModuleTensors {
  const SafetensorsEntry* a = nullptr;
  const SafetensorsEntry* b = nullptr;
};

struct ParsedKey {
  ProjectionId id;
  bool is_a = true;
};

absl::StatusOr<ParsedKey> ParseKey(const std::string& key, const ModelConfig& base,
                                   absl::string_view prefix) {
  auto error = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "key '", key, "' ", what));
  };
  if (absl::StrContains(key, "lora_embedding_A") || absl::StrContains(key, "lora_embedding_B")) {
    return error(
        "is an embedding LoRA weight (lora_embedding_A / lora_embedding_B): LoRA on "
        "embeddings is not supported");
  }
  if (absl::StrContains(key, "lora_magnitude_vector")) {
    return error("is a DoRA magnitude (lora_magnitude_vector): DoRA is not supported");
  }
  if (!absl::StartsWith(key, kKeyPrefix)) {
    return error(absl::StrCat("does not start with '", kKeyPrefix,
                              "' as the keys of a PEFT LoRA adapter do"));
  }
  absl::string_view rest = absl::string_view(key).substr(kKeyPrefix.size());
  bool is_a = true;
  absl::string_view module;
  if (absl::EndsWith(rest, ".lora_A.weight")) {
    module = rest.substr(0, rest.size() - std::string_view(".lora_A.weight").size());
  } else if (absl::EndsWith(rest, ".lora_B.weight")) {
    module = rest.substr(0, rest.size() - std::string_view(".lora_B.weight").size());
    is_a = false;
  } else if (absl::EndsWith(rest, ".lora_A.bias") || absl::EndsWith(rest, ".lora_B.bias")) {
    return error("is a LoRA bias (lora_bias): biases on LoRA layers are not supported");
  } else if (absl::StrContains(rest, ".lora_A.") || absl::StrContains(rest, ".lora_B.")) {
    return error(
        "has an adapter name between lora_A/lora_B and 'weight'; PEFT removes it when saving, "
        "so expected '<module>.lora_A.weight' / '<module>.lora_B.weight'");
  } else if (absl::EndsWith(rest, ".bias")) {
    return error(
        "is a bias of the base model (saved with bias \"all\" or \"lora_only\"): "
        "training base biases is not supported");
  } else {
    return error(
        "is not a LoRA weight (expected '<module>.lora_A.weight' or "
        "'<module>.lora_B.weight')");
  }
  std::optional<ProjectionId> id = ParseProjectionPath(module);
  if (!id.has_value()) {
    return error(absl::StrCat("is for module ", module,
                              ", which is not a decoder projection (model.layers.<i>.self_attn."
                              "{q,k,v,o}_proj or model.layers.<i>.mlp.{gate,up,down}_proj)"));
  }
  if (id->layer >= base.num_hidden_layers) {
    return error(absl::StrCat("is for layer ", id->layer, ", but the base model has ",
                              base.num_hidden_layers, " layers"));
  }
  return ParsedKey{*id, is_a};
}

std::string KeyFor(const ProjectionId& id, bool is_a) {
  return absl::StrCat(kKeyPrefix, id.ModulePath(), is_a ? ".lora_A.weight" : ".lora_B.weight");
}

// Why a module the file has is not one the config targets.
std::string NotTargetedReason(const AdapterConfig& config, const std::string& path) {
  if ((config.exclude_module_regex.has_value() && FullMatch(*config.exclude_module_regex, path)) ||
      ListMatches(config.exclude_module_list, path)) {
    return "which exclude_modules excludes";
  }
  if (!config.layers_to_transform.empty() && ListMatches(config.target_module_list, path)) {
    return "which layers_to_transform does not select";
  }
  return "which target_modules does not select";
}

absl::StatusOr<at::Tensor> ReadFactor(const SafetensorsFile& file, const SafetensorsEntry& entry,
                                      const std::string& what, absl::string_view prefix,
                                      const std::vector<int64_t>& expected,
                                      const std::string& rank_source) {
  absl::StatusOr<at::ScalarType> type = ToScalarType(entry.dtype);
  if (!type.ok() || !at::isFloatingType(*type)) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, what, " (key '", entry.name,
                                                   "') has dtype ", ToAbsl(DTypeName(entry.dtype)),
                                                   ", expected a floating-point type"));
  }
  if (entry.shape != expected) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, what, " has shape ",
                                                   ShapeString(entry.shape), ", expected ",
                                                   ShapeString(expected), " (", rank_source, ")"));
  }
  ASSIGN_OR_RETURN(at::Tensor tensor, ReadTensor(file, entry));
  tensor = tensor.to(at::kFloat).contiguous();
  // One pass, no temporary: a NaN or an infinity anywhere makes the (fp64) sum non-finite.
  if (!std::isfinite(tensor.sum(at::kDouble).item<double>())) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, what, " (key '", entry.name, "') has non-finite values (NaN or Inf)"));
  }
  return tensor;
}

}  // namespace

absl::StatusOr<AdapterConfig> AdapterConfig::FromJson(absl::string_view json_text,
                                                      absl::string_view label) {
  try {
    return ParseConfig(json_text, label);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", e.what()));
  }
}

bool AdapterConfig::Targets(absl::string_view module_path, int64_t /*layer*/) const {
  // tuners_utils.check_target_module_exists, in PEFT's order.
  const std::string key(module_path);
  if (exclude_module_regex.has_value() && FullMatch(*exclude_module_regex, key)) return false;
  if (ListMatches(exclude_module_list, key)) return false;
  // "all-linear": every nn.Linear but the output head, i.e. every decoder projection.
  if (all_linear) return ParseProjectionPath(key).has_value();
  if (target_module_regex.has_value()) return FullMatch(*target_module_regex, key);
  // A module named in full is targeted whatever layers_to_transform says.
  if (std::find(target_module_list.begin(), target_module_list.end(), key) !=
      target_module_list.end()) {
    return true;
  }
  if (!ListMatches(target_module_list, key)) return false;
  if (layers_to_transform.empty()) return true;
  std::string index_text;
  bool found = false;
  if (layers_pattern.empty()) {
    found = MatchAtStart(R"(.*\.[^.]*\.(\d+)\.)", key, &index_text);
  } else {
    for (const std::string& pattern : layers_pattern) {
      found = MatchAtStart(absl::StrCat(".*\\.", pattern, "\\.(\\d+)\\."), key, &index_text);
      if (found) break;
    }
  }
  int64_t index = 0;
  if (!found || !absl::SimpleAtoi(index_text, &index)) return false;
  return std::find(layers_to_transform.begin(), layers_to_transform.end(), index) !=
         layers_to_transform.end();
}

int64_t AdapterConfig::RankFor(absl::string_view module_path) const {
  std::optional<std::string> key =
      FindPatternKey(rank_pattern_order, rank_pattern, std::string(module_path));
  return key.has_value() ? rank_pattern.at(*key) : r;
}

double AdapterConfig::ScalingFor(absl::string_view module_path) const {
  std::optional<std::string> key =
      FindPatternKey(alpha_pattern_order, alpha_pattern, std::string(module_path));
  const double alpha = key.has_value() ? alpha_pattern.at(*key) : lora_alpha;
  const double rank = static_cast<double>(RankFor(module_path));
  return use_rslora ? alpha / std::sqrt(rank) : alpha / rank;
}

absl::StatusOr<Adapter> Adapter::Load(const std::string& name, const std::string& dir,
                                      const ModelConfig& base) {
  const std::string prefix = absl::StrCat("adapter '", name, "': ");
  try {
    const std::string config_path = absl::StrCat(dir, "/", kConfigFile);
    const std::string weights_path = absl::StrCat(dir, "/", kWeightsFile);
    if (!IsRegularFile(config_path)) {
      return absl::NotFoundError(absl::StrCat(prefix, config_path, " not found"));
    }
    if (!IsRegularFile(weights_path)) {
      const bool has_bin = IsRegularFile(absl::StrCat(dir, "/adapter_model.bin"));
      return absl::NotFoundError(absl::StrCat(
          prefix, weights_path, " not found",
          has_bin ? " (adapter_model.bin is there, but only safetensors is read; save with "
                    "safe_serialization=True)"
                  : ""));
    }
    ASSIGN_OR_RETURN(std::string config_text, ReadFileToString(config_path, "adapter config"));

    Adapter adapter;
    adapter.name_ = name;
    adapter.source_ = dir;
    ASSIGN_OR_RETURN(adapter.config_,
                     AdapterConfig::FromJson(config_text, absl::StrCat(prefix, config_path)));
    const AdapterConfig& config = adapter.config_;

    absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::Open(weights_path);
    if (!opened.ok()) {
      return absl::Status(opened.status().code(), absl::StrCat(prefix, opened.status().message()));
    }
    const SafetensorsFile& file = **opened;

    // (layer, kind) -> tensors; std::map sorts modules by (layer, projection kind).
    std::map<std::pair<int64_t, int>, ModuleTensors> found;
    for (const SafetensorsEntry& entry : file.entries()) {
      ASSIGN_OR_RETURN(ParsedKey parsed, ParseKey(entry.name, base, prefix));
      ModuleTensors& tensors = found[{parsed.id.layer, static_cast<int>(parsed.id.kind)}];
      (parsed.is_a ? tensors.a : tensors.b) = &entry;
    }
    if (found.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, weights_path, " holds no LoRA weights"));
    }

    for (const auto& [position, tensors] : found) {
      const ProjectionId id{position.first, static_cast<ProjectionKind>(position.second)};
      const std::string path = id.ModulePath();
      if (tensors.a == nullptr || tensors.b == nullptr) {
        const bool has_a = tensors.a != nullptr;
        return absl::InvalidArgumentError(absl::StrCat(
            prefix, path, " has ", has_a ? "lora_A" : "lora_B", " but no ",
            has_a ? "lora_B" : "lora_A", " (key '", KeyFor(id, !has_a), "' is missing)"));
      }
      if (!config.Targets(path, id.layer)) {
        return absl::InvalidArgumentError(absl::StrCat(prefix, "key '", tensors.a->name,
                                                       "' is for module ", path, ", ",
                                                       NotTargetedReason(config, path)));
      }
      const int64_t rank = config.RankFor(path);
      std::optional<std::string> rank_key =
          FindPatternKey(config.rank_pattern_order, config.rank_pattern, path);
      const std::string rank_source =
          rank_key.has_value()
              ? absl::StrCat("rank ", rank, " from rank_pattern key '", *rank_key, "'")
              : absl::StrCat("rank ", rank, " from r");
      const ProjectionShape shape = ShapeOf(base, id.kind);
      AdapterModule module;
      module.id = id;
      module.rank = rank;
      module.scaling = config.ScalingFor(path);
      ASSIGN_OR_RETURN(module.a, ReadFactor(file, *tensors.a, absl::StrCat("lora_A for ", path),
                                            prefix, {rank, shape.in_features}, rank_source));
      ASSIGN_OR_RETURN(module.b, ReadFactor(file, *tensors.b, absl::StrCat("lora_B for ", path),
                                            prefix, {shape.out_features, rank}, rank_source));
      adapter.modules_.push_back(std::move(module));
    }

    // Nothing the config targets may be silently skipped.
    for (int64_t layer = 0; layer < base.num_hidden_layers; ++layer) {
      for (int k = 0; k < kNumProjectionKinds; ++k) {
        const ProjectionId id{layer, static_cast<ProjectionKind>(k)};
        if (found.count({layer, k}) == 0 && config.Targets(id.ModulePath(), layer)) {
          return absl::InvalidArgumentError(
              absl::StrCat(prefix, "the config targets ", id.ModulePath(), ", but ", weights_path,
                           " has no LoRA weights for it (expected key '", KeyFor(id, true), "')"));
        }
      }
    }
    return adapter;
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat(prefix, "torch: ", e.what_without_backtrace()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(prefix, e.what()));
  }
}

int64_t Adapter::max_rank() const {
  int64_t result = 0;
  for (const AdapterModule& module : modules_) result = std::max(result, module.rank);
  return result;
}

int64_t Adapter::bytes(int64_t element_size) const {
  int64_t total = 0;
  for (const AdapterModule& module : modules_) {
    total += (module.a.numel() + module.b.numel()) * element_size;
  }
  return total;
}

}  // namespace moelora
