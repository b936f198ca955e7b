#include "core/generation.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace moelora {

absl::StatusOr<std::vector<std::vector<int64_t>>> GreedyGenerate(
    const Model& model, const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens,
    const LinearDelta* delta) {
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
  ForwardOptions options;
  options.delta = delta;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    ASSIGN_OR_RETURN(ForwardOutput out, model.Forward(batch, cache, options));
    std::vector<int64_t> next;
    try {
      const at::Tensor argmax = out.logits.argmax(-1).to(at::kCPU).contiguous();
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

}  // namespace moelora
