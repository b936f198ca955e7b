#include "core/model_config.h"

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/file_io.h"
#include "core/json_fields.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace moelora {
namespace {

using Json = nlohmann::json;
using json_fields::FieldError;

// bos/eos may be an int, a list of ints (first wins: generation stops on any, later issue) or null.
int64_t TokenIdField(const Json& json, const char* field) {
  auto it = json.find(field);
  if (it == json.end()) return -1;
  if (it->is_number_integer()) return it->get<int64_t>();
  if (it->is_array() && !it->empty() && (*it)[0].is_number_integer()) {
    return (*it)[0].get<int64_t>();
  }
  return -1;
}

absl::StatusOr<ModelType> ParseModelType(const Json& json, absl::string_view label) {
  auto it = json.find("model_type");
  if (it == json.end() || !it->is_string()) return FieldError(label, "model_type", "is required");
  const std::string name = it->get<std::string>();
  if (name == "llama") return ModelType::kLlama;
  if (name == "mistral") return ModelType::kMistral;
  if (name == "qwen2") return ModelType::kQwen2;
  if (name == "gemma") return ModelType::kGemma;
  return absl::InvalidArgumentError(absl::StrCat(label, ": unsupported model_type '", name,
                                                 "' (supported: llama, mistral, qwen2, gemma)"));
}

absl::StatusOr<Activation> ParseActivationName(absl::string_view name, absl::string_view label,
                                               absl::string_view field) {
  if (name == "silu" || name == "swish") return Activation::kSilu;
  if (name == "gelu_pytorch_tanh" || name == "gelu_new") return Activation::kGeluTanh;
  if (name == "gelu") return Activation::kGeluExact;
  return FieldError(label, field,
                    absl::StrCat("names unsupported activation '", name,
                                 "' (supported: silu, gelu_pytorch_tanh, gelu_new, gelu)"));
}

absl::StatusOr<Activation> ParseActivation(const Json& json, ModelType type,
                                           absl::string_view label) {
  // Gemma too: transformers 5 builds GemmaMLP from hidden_act alone (a Gemma-1 file's "gelu" is
  // the erf GELU there, and hidden_activation is ignored), and its fixtures are our oracle.
  // transformers 4.38-4.x differed: it preferred hidden_activation, tanh GELU when null.
  auto it = json.find("hidden_act");
  if (it == json.end() || it->is_null()) {
    return type == ModelType::kGemma ? Activation::kGeluTanh : Activation::kSilu;
  }
  if (!it->is_string()) return FieldError(label, "hidden_act", "must be a string");
  return ParseActivationName(it->get<std::string>(), label, "hidden_act");
}

// rope_theta lives at the top level (transformers 4) or in rope_parameters (transformers 5);
// scaling in rope_scaling (4) or rope_parameters (5), with the type under rope_type or type.
absl::Status ParseRope(const Json& json, absl::string_view label, ModelConfig& config) {
  const Json* rope = nullptr;
  const char* rope_field = "rope_parameters";
  if (auto it = json.find("rope_parameters"); it != json.end() && !it->is_null()) {
    rope = &*it;
  } else if (auto it2 = json.find("rope_scaling"); it2 != json.end() && !it2->is_null()) {
    rope = &*it2;
    rope_field = "rope_scaling";
  }
  ASSIGN_OR_RETURN(config.rope_theta, json_fields::Number(json, label, "rope_theta", 10000.0));
  if (rope == nullptr) return absl::OkStatus();
  if (!rope->is_object()) return FieldError(label, rope_field, "must be an object");
  const std::string scope = absl::StrCat(label, ": ", rope_field);
  ASSIGN_OR_RETURN(config.rope_theta,
                   json_fields::Number(*rope, scope, "rope_theta", config.rope_theta));
  std::string rope_type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (auto it = rope->find(key); it != rope->end() && it->is_string()) {
      rope_type = it->get<std::string>();
      break;
    }
  }
  if (rope_type == "default") return absl::OkStatus();
  if (rope_type == "llama3") {
    Llama3RopeScaling scaling;
    ASSIGN_OR_RETURN(scaling.factor, json_fields::Number(*rope, scope, "factor", scaling.factor));
    ASSIGN_OR_RETURN(scaling.low_freq_factor,
                     json_fields::Number(*rope, scope, "low_freq_factor", scaling.low_freq_factor));
    ASSIGN_OR_RETURN(scaling.high_freq_factor, json_fields::Number(*rope, scope, "high_freq_factor",
                                                                   scaling.high_freq_factor));
    ASSIGN_OR_RETURN(scaling.original_max_position_embeddings,
                     json_fields::Int(*rope, scope, "original_max_position_embeddings",
                                      scaling.original_max_position_embeddings));
    if (!(scaling.factor > 0) || !(scaling.low_freq_factor > 0) ||
        !(scaling.high_freq_factor > scaling.low_freq_factor) ||
        scaling.original_max_position_embeddings <= 0) {
      return FieldError(label, rope_field,
                        "llama3 scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor "
                        "and original_max_position_embeddings > 0");
    }
    config.llama3_rope_scaling = scaling;
    return absl::OkStatus();
  }
  return FieldError(
      label, rope_field,
      absl::StrCat("has unsupported rope_type '", rope_type, "' (supported: default, llama3)"));
}

absl::Status Validate(const ModelConfig& c, absl::string_view label) {
  const std::pair<const char*, int64_t> positive[] = {
      {"vocab_size", c.vocab_size},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
  };
  for (const auto& [field, value] : positive) {
    if (value <= 0) return FieldError(label, field, absl::StrCat("must be positive, got ", value));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return FieldError(
        label, "num_key_value_heads",
        absl::StrCat("(", c.num_key_value_heads, ") must divide num_attention_heads (",
                     c.num_attention_heads, ")"));
  }
  if (c.head_dim % 2 != 0) {
    return FieldError(label, "head_dim", absl::StrCat("must be even for RoPE, got ", c.head_dim));
  }
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps)) {
    return FieldError(label, "rms_norm_eps", "must be a positive number");
  }
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    return FieldError(label, "rope_theta", "must be a positive number");
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view ModelTypeName(ModelType type) {
  switch (type) {
    case ModelType::kLlama:
      return "llama";
    case ModelType::kMistral:
      return "mistral";
    case ModelType::kQwen2:
      return "qwen2";
    case ModelType::kGemma:
      return "gemma";
  }
  return "unknown";
}

absl::string_view ActivationName(Activation activation) {
  switch (activation) {
    case Activation::kSilu:
      return "silu";
    case Activation::kGeluTanh:
      return "gelu_pytorch_tanh";
    case Activation::kGeluExact:
      return "gelu";
  }
  return "unknown";
}

absl::StatusOr<ModelConfig> ModelConfig::FromJson(absl::string_view json_text,
                                                  absl::string_view label) {
  Json json = Json::parse(json_text.begin(), json_text.end(), /*cb=*/nullptr,
                          /*allow_exceptions=*/false);
  if (json.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(label, ": not valid JSON"));
  if (!json.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": expected a JSON object"));
  }
  // Multimodal wrappers keep the decoder's fields under text_config.
  if (auto it = json.find("text_config");
      it != json.end() && it->is_object() && !json.contains("num_hidden_layers")) {
    json = *it;
  }
  ModelConfig c;
  ASSIGN_OR_RETURN(c.model_type, ParseModelType(json, label));
  const bool gemma = c.model_type == ModelType::kGemma;
  ASSIGN_OR_RETURN(c.vocab_size, json_fields::Int(json, label, "vocab_size"));
  ASSIGN_OR_RETURN(c.hidden_size, json_fields::Int(json, label, "hidden_size"));
  ASSIGN_OR_RETURN(c.intermediate_size, json_fields::Int(json, label, "intermediate_size"));
  ASSIGN_OR_RETURN(c.num_hidden_layers, json_fields::Int(json, label, "num_hidden_layers"));
  ASSIGN_OR_RETURN(c.num_attention_heads, json_fields::Int(json, label, "num_attention_heads"));
  ASSIGN_OR_RETURN(c.num_key_value_heads,
                   json_fields::Int(json, label, "num_key_value_heads", c.num_attention_heads));
  if (c.num_attention_heads <= 0) {
    return FieldError(label, "num_attention_heads", "must be positive");
  }
  // Gemma's head_dim is its own field (256 by default), not hidden / heads.
  const int64_t default_head_dim = gemma ? 256 : c.hidden_size / c.num_attention_heads;
  ASSIGN_OR_RETURN(c.head_dim, json_fields::Int(json, label, "head_dim", default_head_dim));
  ASSIGN_OR_RETURN(c.max_position_embeddings,
                   json_fields::Int(json, label, "max_position_embeddings", int64_t{4096}));
  ASSIGN_OR_RETURN(c.rms_norm_eps, json_fields::Number(json, label, "rms_norm_eps", 1e-6));
  RETURN_IF_ERROR(ParseRope(json, label, c));
  ASSIGN_OR_RETURN(c.activation, ParseActivation(json, c.model_type, label));
  ASSIGN_OR_RETURN(c.tie_word_embeddings,
                   json_fields::Bool(json, label, "tie_word_embeddings", gemma));
  ASSIGN_OR_RETURN(c.attention_bias, json_fields::Bool(json, label, "attention_bias", false));
  ASSIGN_OR_RETURN(c.mlp_bias, json_fields::Bool(json, label, "mlp_bias", false));
  c.qkv_bias = c.model_type == ModelType::kQwen2;
  if (c.model_type == ModelType::kMistral) {
    ASSIGN_OR_RETURN(c.sliding_window, json_fields::Int(json, label, "sliding_window", int64_t{0}));
  } else if (c.model_type == ModelType::kQwen2) {
    ASSIGN_OR_RETURN(bool use_sliding, json_fields::Bool(json, label, "use_sliding_window", false));
    if (use_sliding) {
      return FieldError(label, "use_sliding_window",
                        "is true: qwen2's per-layer sliding window is not supported");
    }
  }
  c.scale_embeddings = gemma;
  c.norm_weight_plus_one = gemma;
  c.bos_token_id = TokenIdField(json, "bos_token_id");
  c.eos_token_id = TokenIdField(json, "eos_token_id");
  RETURN_IF_ERROR(Validate(c, label));
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::FromFile(const std::string& path) {
  ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path, "model config"));
  return FromJson(text, path);
}

std::string ModelConfig::ToJson() const {
  Json json = {
      {"model_type", std::string(ModelTypeName(model_type))},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"max_position_embeddings", max_position_embeddings},
      {"rms_norm_eps", rms_norm_eps},
      {"rope_theta", rope_theta},
      {"tie_word_embeddings", tie_word_embeddings},
      {"attention_bias", attention_bias},
      {"mlp_bias", mlp_bias},
      {"torch_dtype", "float32"},
  };
  json["hidden_act"] = std::string(ActivationName(activation));
  if (llama3_rope_scaling.has_value()) {
    json["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", llama3_rope_scaling->factor},
        {"low_freq_factor", llama3_rope_scaling->low_freq_factor},
        {"high_freq_factor", llama3_rope_scaling->high_freq_factor},
        {"original_max_position_embeddings", llama3_rope_scaling->original_max_position_embeddings},
    };
  }
  if (model_type == ModelType::kMistral) json["sliding_window"] = sliding_window;
  if (bos_token_id >= 0) json["bos_token_id"] = bos_token_id;
  if (eos_token_id >= 0) json["eos_token_id"] = eos_token_id;
  return json.dump(2);
}

}  // namespace moelora
