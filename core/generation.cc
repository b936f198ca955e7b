#include "core/generation.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <functional>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace moelora {
namespace {

// One forward over `batch` (each sequence's new tokens) returning last-token logits [seqs, V].
using Step = std::function<absl::StatusOr<at::Tensor>(const std::vector<SequenceInput>& batch,
                                                      KvCache& cache)>;

// The shared greedy loop: batched prefill, then one token per sequence per step.
absl::StatusOr<std::vector<std::vector<int64_t>>> GreedyLoop(
    const Model& model, const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens,
    const Step& step) {
  if (prompts.empty()) return absl::InvalidArgumentError("generate: no prompts");
  if (max_new_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("generate: max_new_tokens must be >= 0, got ", max_new_tokens));
  }
  size_t longest = 0;
  for (const auto& prompt : prompts) longest = std::max(longest, prompt.size());
  const int64_t num_seqs = static_cast<int64_t>(prompts.size());
  ASSIGN_OR_RETURN(KvCache cache,
                   model.CreateKvCache(num_seqs, static_cast<int64_t>(longest) + max_new_tokens));
  std::vector<SequenceInput> batch(num_seqs);
  for (int64_t b = 0; b < num_seqs; ++b) batch[b] = {b, prompts[b]};
  std::vector<std::vector<int64_t>> generated(num_seqs);
  for (int64_t i = 0; i < max_new_tokens; ++i) {
    ASSIGN_OR_RETURN(at::Tensor logits, step(batch, cache));
    std::vector<int64_t> next;
    try {
      const at::Tensor argmax = logits.argmax(-1).to(at::kCPU).contiguous();
      next.assign(argmax.data_ptr<int64_t>(), argmax.data_ptr<int64_t>() + num_seqs);
    } catch (const c10::Error& e) {
      return absl::InternalError(absl::StrCat("generate: ", e.what_without_backtrace()));
    }
    for (int64_t b = 0; b < num_seqs; ++b) {
      generated[b].push_back(next[b]);
      batch[b].tokens = {next[b]};
    }
  }
  return generated;
}

}  // namespace

absl::StatusOr<std::vector<std::vector<int64_t>>> GreedyGenerate(
    const Model& model, const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens,
    const LinearDelta* delta) {
  return GreedyLoop(
      model, prompts, max_new_tokens,
      [&](const std::vector<SequenceInput>& batch, KvCache& cache) -> absl::StatusOr<at::Tensor> {
        ASSIGN_OR_RETURN(ForwardOutput out, model.Forward(batch, cache, {.delta = delta}));
        return out.logits;
      });
}

absl::StatusOr<MixtureGeneration> GreedyGenerate(const Mixture& mixture,
                                                 const std::vector<std::vector<int64_t>>& prompts,
                                                 int64_t max_new_tokens,
                                                 const RoutingControls& controls) {
  MixtureGeneration result;
  std::vector<RoutingState> states(prompts.size());
  std::vector<std::vector<at::Tensor>> rows(prompts.size());
  auto step = [&](const std::vector<SequenceInput>& batch,
                  KvCache& cache) -> absl::StatusOr<at::Tensor> {
    std::vector<MixtureSequence> sequences;
    for (size_t b = 0; b < batch.size(); ++b) {
      sequences.push_back({batch[b], controls, &states[b]});
    }
    ASSIGN_OR_RETURN(MixtureOutput out, mixture.Forward(sequences, cache));
    if (result.experts.empty() && rows[0].empty()) result.experts = out.routing.experts;
    if (out.routing.experts == result.experts) {
      for (size_t b = 0; b < batch.size(); ++b) {
        rows[b].push_back(out.routing.weights[out.forward.token_offsets[b + 1] - 1]);
      }
    }
    return out.forward.logits;
  };
  ASSIGN_OR_RETURN(result.tokens, GreedyLoop(mixture.model(), prompts, max_new_tokens, step));
  for (auto& per_prompt : rows) {
    result.routing.push_back(per_prompt.empty() ? at::Tensor() : at::stack(per_prompt));
  }
  return result;
}

}  // namespace moelora
