#ifndef MOELORA_CORE_SAMPLER_H_
#define MOELORA_CORE_SAMPLER_H_

// Next-token selection for one sequence, with the semantics of HF generate / vLLM:
//
//   temperature == 0: greedy, the argmax of the logits (lowest id on ties); top_k / top_p are
//   ignored and no random number is drawn.
//   temperature > 0:  logits -> fp32 on the CPU -> / temperature -> top-k (keep the k largest)
//   -> top-p (on the softmax of what top-k kept: the smallest prefix of the tokens sorted by
//   probability whose cumulative probability reaches top_p, at least one token) -> one draw from
//   the softmax of what remains.
//
// The draw is an inverse CDF: one uniform u in [0, 1) from the sequence's own mt19937 generator
// (ATen's CPUGeneratorImpl seeded with `seed`, 53 bits of one random64()) and the first token, in
// ascending id order, whose cumulative weight exceeds u times the total. Everything after the copy
// of the row to the CPU is plain C++ in double precision, so a seed gives the same tokens on CPU
// and CUDA builds and across libtorch versions. Every non-greedy Sample consumes exactly one
// 64-bit draw.
//
// Ordering: tokens are ranked by logit, ties broken by lower id. top-k keeps exactly
// min(k, finite logits) tokens (ties at the boundary go to the lower ids, so top_k = 1 is greedy),
// and top-p walks that same order. The cumulative-probability test allows 1e-6 of rounding, so a
// nucleus whose probabilities sum to top_p exactly in real arithmetic is not widened by one token.

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moelora {

struct SamplingParams {
  double temperature = 0.0;  // 0 = greedy (argmax)
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  // Same seed, params and logits -> same tokens. ATen's mt19937 seeds from the low 32 bits only
  // (as torch.manual_seed on the CPU), so seeds equal modulo 2^32 give the same stream.
  uint64_t seed = 0;
  int64_t max_new_tokens = 16;
  std::vector<int64_t> stop_token_ids;
};

// OK, or InvalidArgument naming the field: temperature NaN, negative or infinite; top_k < 0 or
// > vocab_size; top_p not in (0, 1]; max_new_tokens <= 0; a stop id outside [0, vocab_size).
absl::Status ValidateSamplingParams(const SamplingParams& params, int64_t vocab_size);

// One per sequence: it owns its generator, so sequences batched together stay independent and
// each is reproducible from its seed alone. Move-only (a copy would share the generator state).
// Not thread-safe; the engine thread owns it.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;
  Sampler(Sampler&&) = default;
  Sampler& operator=(Sampler&&) = default;

  // logits: [vocab], any floating dtype, any device, any strides. Returns the token id.
  // InvalidArgument for bad params (checked against this vocab), a wrong shape or dtype, a NaN
  // logit or no finite-or-+inf logit at all; Internal for a torch error. Logits that are -inf are
  // never chosen; if some are +inf, the choice is among those alone (uniform when sampling).
  // A CPU fp32 contiguous row is read in place: the engine can copy the whole [sequences, vocab]
  // matrix to the CPU once per step and pass rows, instead of one device copy per sequence.
  absl::StatusOr<int64_t> Sample(const at::Tensor& logits);

  // True when `token` (just generated) is a stop token or `generated` (the number of tokens
  // generated so far, `token` included) has reached max_new_tokens.
  bool Finished(int64_t token, int64_t generated) const;

  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  at::Generator generator_;
};

}  // namespace moelora

#endif  // MOELORA_CORE_SAMPLER_H_
