#ifndef MOELORA_CORE_GENERATION_H_
#define MOELORA_CORE_GENERATION_H_

// Greedy generation over a batch of prompts: one batched prefill, then one batched decode step
// per new token, all through the KV cache. The serving engine (continuous batching, sampling)
// builds on the forwards directly; this is for the demo, tools and tests.

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/mixture.h"
#include "core/model.h"

namespace moelora {

// Returns `max_new_tokens` greedy tokens for each prompt (no stop at EOS: callers compare fixed
// lengths). `delta` is passed to every forward.
absl::StatusOr<std::vector<std::vector<int64_t>>> GreedyGenerate(
    const Model& model, const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens,
    const LinearDelta* delta = nullptr);

struct MixtureGeneration {
  std::vector<std::vector<int64_t>> tokens;
  // Per prompt, [max_new_tokens, experts.size()]: the routing weights of the position that
  // produced each generated token (columns in `experts` order, the snapshot of the first step).
  std::vector<std::string> experts;
  std::vector<at::Tensor> routing;
};

// Greedy generation through the mixture: every prompt routed by `controls`, each with its own
// RoutingState across the steps.
absl::StatusOr<MixtureGeneration> GreedyGenerate(const Mixture& mixture,
                                                 const std::vector<std::vector<int64_t>>& prompts,
                                                 int64_t max_new_tokens,
                                                 const RoutingControls& controls);

}  // namespace moelora

#endif  // MOELORA_CORE_GENERATION_H_
