#ifndef MOELORA_CORE_TRAINING_DATA_H_
#define MOELORA_CORE_TRAINING_DATA_H_

// Training data for the router / expert trainer (core/trainer.h): token-id sequences read from a
// text file (one sequence per line) or a safetensors tensor, checked against the model's
// vocabulary, split into a training and a held-out part; and synthetic "domains" (disjoint token
// ranges, each with its own deterministic next-token rule) for tests and the built-in demo.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moelora {

using TokenSequence = std::vector<int64_t>;

// A text file of token ids: one sequence per line, ids separated by spaces, tabs and/or commas.
// Blank lines and lines starting with '#' are skipped. InvalidArgument naming the file and line
// for anything that is not a non-negative integer; NotFound when the file is missing.
absl::StatusOr<std::vector<TokenSequence>> ReadTokenIdFile(const std::string& path);

// A safetensors file holding an integer tensor [N, L] (or [L] for one sequence): the tensor named
// "input_ids", or the file's only tensor. Negative values at the end of a row (-100, -1) are
// padding and dropped; a negative value before a non-negative one is an error.
absl::StatusOr<std::vector<TokenSequence>> ReadTokenTensorFile(const std::string& path);

// By extension: ".safetensors" -> ReadTokenTensorFile, anything else -> ReadTokenIdFile.
absl::StatusOr<std::vector<TokenSequence>> ReadTokenSequences(const std::string& path);

// Splits sequences longer than `max_len` into consecutive chunks of at most `max_len` tokens
// (a last chunk of one token is dropped: it has no next token to predict). max_len <= 0: as is.
std::vector<TokenSequence> ChunkSequences(const std::vector<TokenSequence>& sequences,
                                          int64_t max_len);

// InvalidArgument (naming `label`, the sequence index and the id) when there are no sequences, a
// sequence has fewer than 2 tokens (nothing to predict), or an id is outside [0, vocab_size).
absl::Status ValidateSequences(const std::vector<TokenSequence>& sequences, int64_t vocab_size,
                               absl::string_view label);

struct TokenDataset {
  std::vector<TokenSequence> train;
  std::vector<TokenSequence> heldout;
};

// Shuffles (seeded) and puts round(fraction * N) sequences aside, at least one when fraction > 0;
// at least one sequence always stays for training. fraction must be in [0, 1).
absl::StatusOr<TokenDataset> SplitHeldout(std::vector<TokenSequence> sequences, double fraction,
                                          uint64_t seed);

// A synthetic domain: tokens [first_token, first_token + num_tokens), and a next-token rule that
// is a fixed random cycle over them (seeded by `rule_seed`), so every domain has its own
// distribution of tokens and of transitions. With `noise` > 0 a token is replaced by a random
// token of the domain with that probability.
struct SyntheticDomain {
  std::string name;
  int64_t first_token = 0;
  int64_t num_tokens = 0;
  uint64_t rule_seed = 0;
  double noise = 0.0;
};

// `count` sequences of `length` tokens of the domain, each starting at a random token.
std::vector<TokenSequence> DomainSequences(const SyntheticDomain& domain, int64_t count,
                                           int64_t length, uint64_t seed);

// The domain's next token after `token` (which must belong to the domain).
int64_t DomainNextToken(const SyntheticDomain& domain, int64_t token);

}  // namespace moelora

#endif  // MOELORA_CORE_TRAINING_DATA_H_
