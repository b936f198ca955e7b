#include "core/training_data.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <random>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/checkpoint.h"
#include "core/status_macros.h"

namespace moelora {
namespace {

// next[i] = index of the token after token first_token + i: one random cycle through all of them.
std::vector<int64_t> DomainCycle(const SyntheticDomain& domain) {
  std::vector<int64_t> order(domain.num_tokens);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(domain.rule_seed);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<int64_t> next(domain.num_tokens);
  for (int64_t i = 0; i < domain.num_tokens; ++i) {
    next[order[i]] = order[(i + 1) % domain.num_tokens];
  }
  return next;
}

bool IsIntegerType(at::ScalarType type) { return at::isIntegralType(type, /*includeBool=*/false); }

}  // namespace

absl::StatusOr<std::vector<TokenSequence>> ReadTokenIdFile(const std::string& path) {
  std::ifstream in(path);
  if (!in.is_open()) return absl::NotFoundError(absl::StrCat(path, ": data file not found"));
  std::vector<TokenSequence> sequences;
  std::string line;
  int64_t line_number = 0;
  while (std::getline(in, line)) {
    ++line_number;
    const absl::string_view text = absl::StripAsciiWhitespace(line);
    if (text.empty() || absl::StartsWith(text, "#")) continue;
    TokenSequence sequence;
    for (absl::string_view piece :
         absl::StrSplit(text, absl::ByAnyChar(" \t,"), absl::SkipEmpty())) {
      int64_t id = 0;
      if (!absl::SimpleAtoi(piece, &id)) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ":", line_number, ": '", piece,
                         "' is not a token id (expected integers separated by spaces or commas)"));
      }
      if (id < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ":", line_number, ": negative token id ", id));
      }
      sequence.push_back(id);
    }
    sequences.push_back(std::move(sequence));
  }
  if (in.bad()) return absl::DataLossError(absl::StrCat(path, ": read failed"));
  return sequences;
}

absl::StatusOr<std::vector<TokenSequence>> ReadTokenTensorFile(const std::string& path) {
  ASSIGN_OR_RETURN(Checkpoint file, Checkpoint::OpenFile(path));
  const std::vector<std::string> names = file.Names();
  std::string name;
  if (file.Has("input_ids")) {
    name = "input_ids";
  } else if (names.size() == 1) {
    name = names[0];
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected a tensor named 'input_ids' or exactly one tensor, found ",
                     names.empty() ? "none" : absl::StrCat("[", absl::StrJoin(names, ", "), "]")));
  }
  ASSIGN_OR_RETURN(at::Tensor tensor, file.Get(name));
  if (!IsIntegerType(tensor.scalar_type())) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' has dtype ",
                                                   c10::toString(tensor.scalar_type()),
                                                   ", expected integer token ids"));
  }
  if (tensor.dim() == 1) tensor = tensor.unsqueeze(0);
  if (tensor.dim() != 2) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", name, "' has shape ",
                                                   ShapeString(tensor.sizes()),
                                                   ", expected [sequences, length]"));
  }
  const at::Tensor ids = tensor.to(at::kLong).contiguous();
  const int64_t rows = ids.size(0), cols = ids.size(1);
  const int64_t* data = ids.data_ptr<int64_t>();
  std::vector<TokenSequence> sequences;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* row = data + r * cols;
    int64_t length = cols;
    while (length > 0 && row[length - 1] < 0) --length;  // trailing padding
    for (int64_t c = 0; c < length; ++c) {
      if (row[c] < 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": row ", r, " of '", name, "' has the negative id ", row[c], " at position ", c,
            " before real tokens (negative ids are only allowed as trailing padding)"));
      }
    }
    sequences.emplace_back(row, row + length);
  }
  return sequences;
}

absl::StatusOr<std::vector<TokenSequence>> ReadTokenSequences(const std::string& path) {
  if (absl::EndsWith(path, ".safetensors")) return ReadTokenTensorFile(path);
  return ReadTokenIdFile(path);
}

std::vector<TokenSequence> ChunkSequences(const std::vector<TokenSequence>& sequences,
                                          int64_t max_len) {
  if (max_len <= 0) return sequences;
  std::vector<TokenSequence> out;
  for (const TokenSequence& sequence : sequences) {
    const int64_t n = static_cast<int64_t>(sequence.size());
    if (n <= max_len) {
      out.push_back(sequence);
      continue;
    }
    for (int64_t start = 0; start < n; start += max_len) {
      const int64_t end = std::min(n, start + max_len);
      if (end - start < 2) break;
      out.emplace_back(sequence.begin() + start, sequence.begin() + end);
    }
  }
  return out;
}

absl::Status ValidateSequences(const std::vector<TokenSequence>& sequences, int64_t vocab_size,
                               absl::string_view label) {
  if (sequences.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": no sequences"));
  }
  for (size_t i = 0; i < sequences.size(); ++i) {
    const TokenSequence& sequence = sequences[i];
    if (sequence.size() < 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          label, ": sequence ", i, " has ", sequence.size(),
          " token(s); every sequence needs at least 2 (a token and the one it predicts)"));
    }
    for (size_t t = 0; t < sequence.size(); ++t) {
      if (sequence[t] < 0 || sequence[t] >= vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": sequence ", i, " has token id ", sequence[t], " at position ", t,
                         ", outside the model's vocabulary [0, ", vocab_size, ")"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<TokenDataset> SplitHeldout(std::vector<TokenSequence> sequences, double fraction,
                                          uint64_t seed) {
  if (!(fraction >= 0.0 && fraction < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("heldout_fraction must be in [0, 1), got ", fraction));
  }
  if (sequences.empty()) return absl::InvalidArgumentError("no sequences to split");
  const int64_t n = static_cast<int64_t>(sequences.size());
  int64_t heldout = static_cast<int64_t>(std::llround(fraction * static_cast<double>(n)));
  if (fraction > 0 && heldout == 0) heldout = 1;
  heldout = std::min(heldout, n - 1);
  std::mt19937_64 rng(seed);
  std::shuffle(sequences.begin(), sequences.end(), rng);
  TokenDataset dataset;
  dataset.heldout.assign(std::make_move_iterator(sequences.begin()),
                         std::make_move_iterator(sequences.begin() + heldout));
  dataset.train.assign(std::make_move_iterator(sequences.begin() + heldout),
                       std::make_move_iterator(sequences.end()));
  return dataset;
}

int64_t DomainNextToken(const SyntheticDomain& domain, int64_t token) {
  return domain.first_token + DomainCycle(domain)[token - domain.first_token];
}

std::vector<TokenSequence> DomainSequences(const SyntheticDomain& domain, int64_t count,
                                           int64_t length, uint64_t seed) {
  const std::vector<int64_t> next = DomainCycle(domain);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> pick(0, domain.num_tokens - 1);
  std::uniform_real_distribution<double> coin(0.0, 1.0);
  std::vector<TokenSequence> sequences(count);
  for (TokenSequence& sequence : sequences) {
    int64_t index = pick(rng);
    for (int64_t t = 0; t < length; ++t) {
      sequence.push_back(domain.first_token + index);
      index = next[index];
      if (domain.noise > 0 && coin(rng) < domain.noise) index = pick(rng);
    }
  }
  return sequences;
}

}  // namespace moelora
