#ifndef MOELORA_CORE_ROUTER_H_
#define MOELORA_CORE_ROUTER_H_

// A learned router in the style of DyLoRA-MoE's DynamicHybridRouter: a gate Linear(hidden -> K)
// with bias whose logits become expert weights, densely (softmax(logits / T)) or sparsely (keep
// the top-k logits, softmax over them, zeros elsewhere).
//
// On disk: a directory with router_config.json
//   {"name": "...", "experts": ["math", "code", ...], "input": "embeddings" | "base_hidden",
//    "granularity": "token" | "sequence", "top_k": 0 (dense) | k, "temperature": 1.0}
// and router.safetensors with gate.weight [K, hidden] and gate.bias [K].

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moelora {

enum class RouterInput { kEmbeddings, kBaseHidden };
enum class RoutingGranularity { kToken, kSequence };

struct RouterConfig {
  std::string name;
  std::vector<std::string> experts;  // K names, in gate row order
  RouterInput input = RouterInput::kEmbeddings;
  RoutingGranularity granularity = RoutingGranularity::kToken;
  int64_t top_k = 0;  // 0 = dense
  double temperature = 1.0;

  static absl::StatusOr<RouterConfig> FromJson(absl::string_view json_text,
                                               absl::string_view label);
  std::string ToJson() const;
};

// How logits become weights; per-request overrides arrive through these fields.
struct RoutingNormalization {
  int64_t top_k = 0;  // 0 = dense
  double temperature = 1.0;
  // [K] bool, true = expert allowed; undefined = all allowed. Masked experts get weight 0 and
  // take no top-k place.
  at::Tensor allowed;
};

// Validates a normalization for K experts: temperature finite and > 0, 0 <= top_k <= K, mask of
// K entries with at least one allowed. InvalidArgument with a clear message otherwise.
absl::Status ValidateNormalization(const RoutingNormalization& normalization, int64_t num_experts);

// logits [n, K] (any float dtype) -> weights [n, K] fp32, rows summing to 1. Differentiable with
// respect to logits (autograd) in both modes.
at::Tensor NormalizeRouting(const at::Tensor& logits, const RoutingNormalization& normalization);

class Router {
 public:
  // Loads a router directory; gate shapes are checked against `hidden_size` and K = experts.size().
  static absl::StatusOr<std::shared_ptr<const Router>> Load(const std::string& dir,
                                                            int64_t hidden_size);
  // From tensors (tests, training): weight [K, hidden], bias [K].
  static absl::StatusOr<std::shared_ptr<const Router>> Create(RouterConfig config,
                                                              at::Tensor gate_weight,
                                                              at::Tensor gate_bias);

  const RouterConfig& config() const { return config_; }
  int64_t num_experts() const { return static_cast<int64_t>(config_.experts.size()); }
  const at::Tensor& gate_weight() const { return gate_weight_; }
  const at::Tensor& gate_bias() const { return gate_bias_; }

  // features [n, hidden] -> logits [n, K] in fp32 (the gate runs in fp32 whatever the model's
  // dtype; the gate is copied to the features' device when they differ: routers are small).
  // Differentiable with respect to the features and to the gate tensors (Create shares their
  // storage, so a trainer can pass tensors that require grad and step them in place).
  at::Tensor Logits(const at::Tensor& features) const;

  // Writes router_config.json and router.safetensors into `dir` (created if needed).
  absl::Status Save(const std::string& dir) const;

 private:
  RouterConfig config_;
  at::Tensor gate_weight_;  // fp32 [K, hidden]
  at::Tensor gate_bias_;    // fp32 [K]
};

}  // namespace moelora

#endif  // MOELORA_CORE_ROUTER_H_
