#ifndef MOELORA_CORE_GENERATION_H_
#define MOELORA_CORE_GENERATION_H_

// Greedy generation over a batch of prompts: one batched prefill, then one batched decode step
// per new token, all through the KV cache. The serving engine (continuous batching, sampling)
// builds on Model::Forward directly; this is for the demo, tools and tests.

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model.h"

namespace moelora {

// Returns `max_new_tokens` greedy tokens for each prompt (no stop at EOS: callers compare fixed
// lengths). `delta` is passed to every forward.
absl::StatusOr<std::vector<std::vector<int64_t>>> GreedyGenerate(
    const Model& model, const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens,
    const LinearDelta* delta = nullptr);

}  // namespace moelora

#endif  // MOELORA_CORE_GENERATION_H_
