#include "core/sampler.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <mutex>
#include <ranges>
#include <span>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace moelora {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Rounding allowed in the top-p cumulative-probability test (see sampler.h).
constexpr double kTopPTolerance = 1e-6;
// Top-p sorts this many candidates first, then four times as many each time it needs more.
constexpr size_t kTopPFirstSort = 64;

struct RowMax {
  int64_t index = 0;  // the lowest id holding the maximum
  float value = 0;
};

absl::StatusOr<RowMax> ScanRow(std::span<const float> row) {
  // One pass for NaN and the maximum, then the first id holding the maximum.
  bool nan = false;
  float max = -std::numeric_limits<float>::infinity();
  for (float v : row) {
    nan |= std::isnan(v);
    max = v > max ? v : max;
  }
  if (nan) {
    const auto it = std::find_if(row.begin(), row.end(), [](float v) { return std::isnan(v); });
    return absl::InvalidArgumentError(absl::StrCat("sampler: logit ", it - row.begin(), " is NaN"));
  }
  if (max == -std::numeric_limits<float>::infinity()) {
    return absl::InvalidArgumentError("sampler: every logit is -inf");
  }
  return RowMax{std::find(row.begin(), row.end(), max) - row.begin(), max};
}

// A uniform double in [0, 1) from the top 53 bits of one 64-bit draw.
double Uniform(at::Generator& generator) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  const uint64_t bits = generator.get<at::CPUGeneratorImpl>()->random64();
  return static_cast<double>(bits >> 11) * 0x1.0p-53;
}

// A token's rank as one integer: ascending keys are descending logits, ties by ascending id.
// Dividing by a positive temperature keeps this order, so ranking the raw logits is enough.
uint64_t RankKey(float logit, size_t id) {
  const uint32_t bits = std::bit_cast<uint32_t>(logit + 0.0f);  // -0 -> +0
  const uint32_t ascending = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(id);
}

size_t KeyId(uint64_t key) { return static_cast<size_t>(key & 0xffffffffu); }

// One inverse-CDF draw over `ids` (ascending) with `weight(id)`.
template <typename Ids, typename Weight>
int64_t Draw(const Ids& ids, const Weight& weight, at::Generator& generator) {
  double total = 0;
  for (size_t id : ids) total += weight(id);
  const double threshold = Uniform(generator) * total;
  double cumulative = 0;
  int64_t last = -1;
  for (size_t id : ids) {
    const double w = weight(id);
    if (w <= 0) continue;
    cumulative += w;
    last = static_cast<int64_t>(id);
    if (cumulative > threshold) break;
  }
  return last;  // rounding can leave the threshold at the very end: the last token with weight
}

// Temperature, top-k, top-p and one inverse-CDF draw over `row` (whose maximum is `max`).
int64_t SampleRow(std::span<const float> row, const RowMax& max, const SamplingParams& params,
                  at::Generator& generator) {
  const size_t vocab = row.size();
  // Weights exp((logit - max) / T): the best token weighs 1 and exp() never overflows. With +inf
  // logits only those remain, equally likely.
  const bool infinite = std::isinf(max.value);
  auto candidate = [&](size_t i) { return infinite ? row[i] == max.value : row[i] > -kInf; };
  auto weight = [&](size_t i) -> double {
    if (infinite) return row[i] == max.value ? 1.0 : 0.0;
    return std::exp((static_cast<double>(row[i]) - max.value) / params.temperature);
  };
  std::vector<double> dense;  // weights by id, where every candidate's weight is needed
  auto dense_weight = [&dense](size_t i) { return dense[i]; };

  const bool top_k = params.top_k > 0 && static_cast<size_t>(params.top_k) < vocab;
  const bool top_p = params.top_p < 1.0;
  if (!top_k && !top_p) {
    dense.resize(vocab);
    for (size_t i = 0; i < vocab; ++i) dense[i] = weight(i);
    return Draw(std::views::iota(size_t{0}, vocab), dense_weight, generator);
  }

  std::vector<uint64_t> keys;  // the candidates still kept
  keys.reserve(vocab);
  for (size_t i = 0; i < vocab; ++i) {
    if (candidate(i)) keys.push_back(RankKey(row[i], i));
  }
  const bool truncated = top_k && static_cast<size_t>(params.top_k) < keys.size();
  if (truncated) {
    std::nth_element(keys.begin(), keys.begin() + params.top_k, keys.end());
    keys.resize(params.top_k);
  }
  if (top_p) {
    // The total over what top-k kept, summed in a fixed order (rank, or id when nothing was cut).
    double total = 0;
    size_t sorted = 0;
    if (truncated) {
      std::sort(keys.begin(), keys.end());
      sorted = keys.size();
      for (uint64_t key : keys) total += weight(KeyId(key));
    } else {
      dense.assign(vocab, 0.0);
      for (uint64_t key : keys) total += dense[KeyId(key)] = weight(KeyId(key));
    }
    auto kept_weight = [&](size_t i) { return dense.empty() ? weight(i) : dense[i]; };
    const double target = (params.top_p - kTopPTolerance) * total;
    // Walk the rank order, sorting only as far as the nucleus reaches.
    size_t cut = keys.size();
    double cumulative = 0;
    for (size_t i = 0, end = std::min(keys.size(), kTopPFirstSort); i < keys.size(); ++i) {
      if (i == sorted) {
        std::nth_element(keys.begin() + sorted, keys.begin() + end - 1, keys.end());
        std::sort(keys.begin() + sorted, keys.begin() + end);
        sorted = end;
        end = std::min(keys.size(), end * 4);
      }
      cumulative += kept_weight(KeyId(keys[i]));
      if (cumulative >= target) {
        cut = i + 1;
        break;
      }
    }
    keys.resize(cut);
  }

  // The draw walks the kept ids in ascending order (as with no filter, so a filter that keeps
  // everything changes nothing).
  std::vector<size_t> ids;
  if (keys.size() * 8 < vocab) {
    ids.reserve(keys.size());
    for (uint64_t key : keys) ids.push_back(KeyId(key));
    std::sort(ids.begin(), ids.end());
  } else {
    std::vector<char> kept(vocab, 0);
    for (uint64_t key : keys) kept[KeyId(key)] = 1;
    for (size_t i = 0; i < vocab; ++i) {
      if (kept[i]) ids.push_back(i);
    }
  }
  if (dense.empty()) return Draw(ids, weight, generator);
  return Draw(ids, dense_weight, generator);
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& params, int64_t vocab_size) {
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling: vocab_size must be > 0, got ", vocab_size));
  }
  if (!std::isfinite(params.temperature) || params.temperature < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling: temperature must be finite and >= 0, got ", params.temperature));
  }
  if (params.top_k < 0 || params.top_k > vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("sampling: top_k must be in [0, ", vocab_size,
                                                   "] (0 = off), got ", params.top_k));
  }
  if (!(params.top_p > 0 && params.top_p <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling: top_p must be in (0, 1] (1 = off), got ", params.top_p));
  }
  if (params.max_new_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling: max_new_tokens must be > 0, got ", params.max_new_tokens));
  }
  for (size_t i = 0; i < params.stop_token_ids.size(); ++i) {
    const int64_t id = params.stop_token_ids[i];
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("sampling: stop_token_ids[", i, "] = ", id,
                                                     " is outside [0, ", vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params)
    : params_(params), generator_(at::make_generator<at::CPUGeneratorImpl>(params.seed)) {}

absl::StatusOr<int64_t> Sampler::Sample(const at::Tensor& logits) {
  at::Tensor row;
  try {
    if (!logits.defined()) return absl::InvalidArgumentError("sampler: logits are undefined");
    if (logits.dim() != 1 || logits.size(0) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sampler: logits must be [vocab] with vocab > 0, got ", logits.dim(), " dims"));
    }
    if (!c10::isFloatingType(logits.scalar_type())) {
      return absl::InvalidArgumentError(absl::StrCat("sampler: logits must be floating, got ",
                                                     c10::toString(logits.scalar_type())));
    }
    // A no-op for a contiguous CPU fp32 row.
    row = logits.to(at::kCPU, at::kFloat).contiguous();
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("sampler: ", e.what_without_backtrace()));
  }
  if (row.numel() > std::numeric_limits<uint32_t>::max()) {
    return absl::InvalidArgumentError(
        "sampler: vocabularies of 2^32 tokens or more are unsupported");
  }
  const std::span<const float> values(row.data_ptr<float>(), static_cast<size_t>(row.numel()));
  RETURN_IF_ERROR(ValidateSamplingParams(params_, row.numel()));
  ASSIGN_OR_RETURN(const RowMax max, ScanRow(values));
  if (params_.temperature == 0) return max.index;
  return SampleRow(values, max, params_, generator_);
}

bool Sampler::Finished(int64_t token, int64_t generated) const {
  return generated >= params_.max_new_tokens ||
         std::find(params_.stop_token_ids.begin(), params_.stop_token_ids.end(), token) !=
             params_.stop_token_ids.end();
}

}  // namespace moelora
