#ifndef MOELORA_CORE_MODEL_CONFIG_H_
#define MOELORA_CORE_MODEL_CONFIG_H_

// The architecture facts of a Hugging Face `config.json` that the decoder needs, for the
// llama, mistral, qwen2 and gemma model types (all one decoder shape with small switches).

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moelora {

enum class ModelType { kLlama, kMistral, kQwen2, kGemma };
absl::string_view ModelTypeName(ModelType type);

enum class Activation {
  kSilu,       // SwiGLU
  kGeluTanh,   // GeGLU with the tanh approximation (gelu_pytorch_tanh, gelu_new)
  kGeluExact,  // GeGLU with the erf form
};
absl::string_view ActivationName(Activation activation);

// rope_scaling / rope_parameters of type "llama3" (Llama 3.1+): long wavelengths are divided by
// `factor`, short ones kept, and the band between is interpolated.
struct Llama3RopeScaling {
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  ModelType model_type = ModelType::kLlama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // GQA; equals num_attention_heads when absent
  int64_t head_dim = 0;             // hidden_size / heads unless the file says otherwise
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<Llama3RopeScaling> llama3_rope_scaling;
  Activation activation = Activation::kSilu;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // bias on q, k, v and o
  bool qkv_bias = false;        // bias on q, k and v only (qwen2)
  bool mlp_bias = false;
  // Mistral's sliding attention window; 0 = full attention.
  int64_t sliding_window = 0;
  // Gemma: embeddings scaled by sqrt(hidden_size), RMSNorm weight applied as (1 + w).
  bool scale_embeddings = false;
  bool norm_weight_plus_one = false;
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;

  // Parses config.json text; `label` (the path) prefixes errors. Unknown model_type, missing or
  // non-positive sizes, heads that do not divide, an unsupported activation or rope type give
  // InvalidArgument naming the field.
  static absl::StatusOr<ModelConfig> FromJson(absl::string_view json_text, absl::string_view label);
  static absl::StatusOr<ModelConfig> FromFile(const std::string& path);

  int64_t q_size() const { return num_attention_heads * head_dim; }
  int64_t kv_size() const { return num_key_value_heads * head_dim; }
  // Serialises back to HF config.json form (used to write tiny models).
  std::string ToJson() const;
};

}  // namespace moelora

#endif  // MOELORA_CORE_MODEL_CONFIG_H_
