#include "core/sampler.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

namespace moelora {
namespace {

using ::testing::HasSubstr;

constexpr int kDraws = 2000;
constexpr double kTolerance = 0.05;

at::Tensor Logits(const std::vector<float>& values, at::ScalarType dtype = at::kFloat) {
  return at::tensor(values, at::kFloat).to(dtype);
}

// logits = log p, so softmax(logits) = p.
at::Tensor LogProbs(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(static_cast<float>(std::log(p)));
  return Logits(logits);
}

std::vector<double> Softmax(const std::vector<double>& logits, double temperature = 1.0) {
  double max = logits[0];
  for (double v : logits) max = std::max(max, v);
  std::vector<double> probs;
  double total = 0;
  for (double v : logits) total += probs.emplace_back(std::exp((v - max) / temperature));
  for (double& p : probs) p /= total;
  return probs;
}

// Token frequencies over `draws` samples, indexed by id.
std::vector<double> Frequencies(const SamplingParams& params, const at::Tensor& logits,
                                int draws = kDraws) {
  Sampler sampler(params);
  std::vector<double> counts(logits.size(0), 0.0);
  for (int i = 0; i < draws; ++i) {
    auto token = sampler.Sample(logits);
    EXPECT_TRUE(token.ok()) << token.status();
    if (!token.ok()) break;
    counts.at(*token) += 1;
  }
  for (double& c : counts) c /= draws;
  return counts;
}

std::vector<int64_t> Draw(const SamplingParams& params, const at::Tensor& logits, int draws) {
  Sampler sampler(params);
  std::vector<int64_t> tokens;
  for (int i = 0; i < draws; ++i) {
    auto token = sampler.Sample(logits);
    EXPECT_TRUE(token.ok()) << token.status();
    tokens.push_back(token.ok() ? *token : -1);
  }
  return tokens;
}

double Entropy(const std::vector<double>& probs) {
  double h = 0;
  for (double p : probs) {
    if (p > 0) h -= p * std::log(p);
  }
  return h;
}

void ExpectFrequencies(const std::vector<double>& actual, const std::vector<double>& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    if (expected[i] == 0) {
      EXPECT_EQ(actual[i], 0) << "token " << i << " must never be drawn";
    } else {
      EXPECT_NEAR(actual[i], expected[i], kTolerance) << "token " << i;
    }
  }
}

TEST(SamplerTest, GreedyPicksArgmaxLowestIdOnTies) {
  Sampler sampler({});
  EXPECT_EQ(*sampler.Sample(Logits({0.5f, 2.0f, -1.0f, 1.5f})), 1);
  EXPECT_EQ(*sampler.Sample(Logits({1.0f, 5.0f, 5.0f, 2.0f, 5.0f})), 1);
  EXPECT_EQ(*sampler.Sample(Logits({-std::numeric_limits<float>::infinity(), -3.0f})), 1);
}

TEST(SamplerTest, GreedyIgnoresTopKAndTopP) {
  Sampler sampler({.temperature = 0.0, .top_k = 2, .top_p = 0.1, .seed = 7});
  const at::Tensor logits = Logits({0.0f, 1.0f, 3.0f, 2.9f, 2.95f});
  for (int i = 0; i < 20; ++i) EXPECT_EQ(*sampler.Sample(logits), 2);
}

TEST(SamplerTest, TopKOneAtTemperatureOneIsArgmax) {
  const at::Tensor logits = Logits({0.3f, 0.1f, 0.35f, 0.2f, 0.34f});
  for (int64_t token : Draw({.temperature = 1.0, .top_k = 1, .seed = 3}, logits, 200)) {
    EXPECT_EQ(token, 2);
  }
  // Ties at the top-k boundary go to the lower id, so top_k = 1 agrees with greedy.
  for (int64_t token : Draw({.temperature = 1.0, .top_k = 1}, Logits({0.f, 2.f, 2.f}), 50)) {
    EXPECT_EQ(token, 1);
  }
}

TEST(SamplerTest, TemperatureOneMatchesSoftmax) {
  const std::vector<double> probs = {0.5, 0.3, 0.15, 0.05};
  ExpectFrequencies(Frequencies({.temperature = 1.0, .seed = 11}, LogProbs(probs)), probs);
}

TEST(SamplerTest, TopKTwoDrawsTheTopTwoRenormalized) {
  const std::vector<double> logits = {1.0, 3.0, 0.5, 2.5, -1.0};
  const std::vector<double> probs = Softmax(logits);
  const double top_two = probs[1] + probs[3];
  const std::vector<double> expected = {0, probs[1] / top_two, 0, probs[3] / top_two, 0};
  ExpectFrequencies(Frequencies({.temperature = 1.0, .top_k = 2, .seed = 5},
                                Logits(std::vector<float>(logits.begin(), logits.end()))),
                    expected);
}

TEST(SamplerTest, TopPKeepsSmallestPrefixReachingP) {
  const at::Tensor logits = LogProbs({0.5, 0.3, 0.15, 0.05});
  // 0.5 + 0.3 reaches 0.8: the nucleus is {0, 1}, renormalized to 0.625 / 0.375.
  ExpectFrequencies(Frequencies({.temperature = 1.0, .top_p = 0.8, .seed = 1}, logits),
                    {0.625, 0.375, 0, 0});
  // Just past 0.8 needs the third token.
  ExpectFrequencies(Frequencies({.temperature = 1.0, .top_p = 0.81, .seed = 1}, logits),
                    {0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0});
  // The top token alone reaches 0.5.
  ExpectFrequencies(Frequencies({.temperature = 1.0, .top_p = 0.5, .seed = 1}, logits),
                    {1, 0, 0, 0});
  // Below the top token's probability, still at least one token.
  ExpectFrequencies(Frequencies({.temperature = 1.0, .top_p = 0.01, .seed = 1}, logits),
                    {1, 0, 0, 0});
}

TEST(SamplerTest, TopPAppliesToWhatTopKKept) {
  // After top_k = 3 the probabilities are 0.5/0.95, 0.3/0.95, 0.15/0.95: 0.842 of the kept mass
  // is reached by ids {0, 1}, so top_p = 0.84 keeps only those.
  const at::Tensor logits = LogProbs({0.5, 0.3, 0.15, 0.05});
  ExpectFrequencies(Frequencies({.temperature = 1.0, .top_k = 3, .top_p = 0.84, .seed = 9}, logits),
                    {0.625, 0.375, 0, 0});
}

TEST(SamplerTest, TopPOrderIsByProbabilityNotId) {
  // Unsorted ids and a vocabulary larger than the first partial sort.
  std::vector<float> values(300, -10.0f);
  values[250] = std::log(0.6f);
  values[17] = std::log(0.3f);
  values[120] = std::log(0.05f);
  const std::vector<double> freqs =
      Frequencies({.temperature = 1.0, .top_p = 0.85, .seed = 2}, Logits(values));
  EXPECT_NEAR(freqs[250], 0.6 / 0.9, kTolerance);
  EXPECT_NEAR(freqs[17], 0.3 / 0.9, kTolerance);
  EXPECT_NEAR(freqs[250] + freqs[17], 1.0, 1e-12);
}

// Filtering equals masking the dropped logits to -inf: same seed, same draws. Over a flat
// vocabulary of 1000 the nucleus holds hundreds of tokens, past the first partial sort.
TEST(SamplerTest, FiltersEqualMaskingOnALargeVocabulary) {
  constexpr int kVocab = 1000;
  std::vector<float> values(kVocab);
  std::vector<int64_t> by_rank(kVocab);
  for (int i = 0; i < kVocab; ++i) {
    values[i] = 0.002f * static_cast<float>((i * 389) % kVocab);  // distinct, shuffled
  }
  for (int i = 0; i < kVocab; ++i) by_rank[i] = i;
  std::sort(by_rank.begin(), by_rank.end(),
            [&](int64_t a, int64_t b) { return values[a] > values[b]; });
  const float neg_inf = -std::numeric_limits<float>::infinity();
  auto masked = [&](int64_t keep) {
    std::vector<float> out(kVocab, neg_inf);
    for (int64_t r = 0; r < keep; ++r) out[by_rank[r]] = values[by_rank[r]];
    return Logits(out);
  };
  // The nucleus for top_p = 0.7, computed independently in double.
  const std::vector<double> probs = Softmax(std::vector<double>(values.begin(), values.end()));
  int64_t nucleus = 0;
  for (double cumulative = 0; cumulative < 0.7; ++nucleus) cumulative += probs[by_rank[nucleus]];
  ASSERT_GT(nucleus, 256);

  const at::Tensor logits = Logits(values);
  EXPECT_EQ(Draw({.temperature = 1.0, .top_p = 0.7, .seed = 21}, logits, 300),
            Draw({.temperature = 1.0, .seed = 21}, masked(nucleus), 300));
  EXPECT_EQ(Draw({.temperature = 1.0, .top_k = 100, .seed = 22}, logits, 300),
            Draw({.temperature = 1.0, .seed = 22}, masked(100), 300));
  EXPECT_NE(Draw({.temperature = 1.0, .top_k = 100, .seed = 22}, logits, 300),
            Draw({.temperature = 1.0, .seed = 22}, logits, 300));
}

TEST(SamplerTest, FiltersThatKeepEverythingDoNotChangeTheDraws) {
  const at::Tensor logits = LogProbs({0.4, 0.3, 0.2, 0.1});
  const std::vector<int64_t> plain = Draw({.temperature = 0.7, .seed = 42}, logits, 100);
  EXPECT_EQ(Draw({.temperature = 0.7, .top_k = 4, .seed = 42}, logits, 100), plain);
  EXPECT_EQ(Draw({.temperature = 0.7, .top_p = 0.999999999, .seed = 42}, logits, 100), plain);
}

TEST(SamplerTest, LowTemperatureIsArgmax) {
  const at::Tensor logits = Logits({1.0f, 2.0f, 1.5f, 1.9f});
  for (int64_t token : Draw({.temperature = 0.01, .seed = 4}, logits, 500)) EXPECT_EQ(token, 1);
  // Even a temperature whose scaled logits overflow a double.
  for (int64_t token : Draw({.temperature = 1e-310, .seed = 4}, logits, 50)) EXPECT_EQ(token, 1);
}

TEST(SamplerTest, HighTemperatureFlattens) {
  const std::vector<double> raw = {0.0, 1.0, 2.0, 3.0};
  const at::Tensor logits = Logits({0.0f, 1.0f, 2.0f, 3.0f});
  const std::vector<double> cool = Frequencies({.temperature = 1.0, .seed = 8}, logits);
  const std::vector<double> hot = Frequencies({.temperature = 20.0, .seed = 8}, logits);
  ExpectFrequencies(cool, Softmax(raw, 1.0));
  ExpectFrequencies(hot, Softmax(raw, 20.0));
  EXPECT_GT(Entropy(hot), Entropy(cool) + 0.3);
  EXPECT_GT(Entropy(hot), 0.95 * std::log(4.0));
}

TEST(SamplerTest, SameSeedSameTokensDifferentSeedsDiffer) {
  const at::Tensor logits = Logits({0.1f, 0.3f, 0.2f, 0.0f, 0.25f, 0.15f});
  const SamplingParams params = {.temperature = 1.0, .top_p = 0.9, .seed = 1234};
  const std::vector<int64_t> first = Draw(params, logits, 50);
  EXPECT_EQ(Draw(params, logits, 50), first);
  SamplingParams other = params;
  other.seed = 1235;
  EXPECT_NE(Draw(other, logits, 50), first);
}

TEST(SamplerTest, InterleavedSamplersStayIndependent) {
  // Two sequences stepped alternately (as in a batch) draw what each draws alone.
  const at::Tensor logits = Logits({0.1f, 0.3f, 0.2f, 0.0f});
  const SamplingParams a = {.temperature = 1.0, .seed = 1};
  const SamplingParams b = {.temperature = 1.0, .seed = 2};
  Sampler sa(a);
  Sampler sb(b);
  std::vector<int64_t> ta;
  std::vector<int64_t> tb;
  for (int i = 0; i < 30; ++i) {
    ta.push_back(*sa.Sample(logits));
    tb.push_back(*sb.Sample(logits));
  }
  EXPECT_EQ(ta, Draw(a, logits, 30));
  EXPECT_EQ(tb, Draw(b, logits, 30));
}

TEST(SamplerTest, ReducedPrecisionAndStridedInputs) {
  const std::vector<double> probs = {0.5, 0.3, 0.15, 0.05};
  const at::Tensor logits = LogProbs(probs);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kDouble}) {
    SCOPED_TRACE(std::string(c10::toString(dtype)));
    const at::Tensor cast = logits.to(dtype);
    Sampler greedy({});
    EXPECT_EQ(*greedy.Sample(cast), 0);
    // bf16 rounds log p by up to ~0.4%, well inside the tolerance.
    ExpectFrequencies(Frequencies({.temperature = 1.0, .seed = 3}, cast), probs);
    ExpectFrequencies(Frequencies({.temperature = 1.0, .top_k = 1, .seed = 3}, cast), {1, 0, 0, 0});
  }
  // A column of a matrix: non-contiguous.
  const at::Tensor matrix = at::stack({logits, logits.flip(0)}, 1);  // [4, 2]
  Sampler greedy({});
  EXPECT_EQ(*greedy.Sample(matrix.select(1, 1)), 3);
  EXPECT_EQ(Draw({.temperature = 1.0, .seed = 6}, matrix.select(1, 0), 40),
            Draw({.temperature = 1.0, .seed = 6}, logits, 40));
}

// The row is copied to the CPU before anything else, so a seed draws the same tokens from device
// logits as from the same values on the CPU.
TEST(SamplerTest, CudaLogitsDrawLikeCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const at::Tensor logits = at::randn({4096}, at::kFloat) * 3;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor cpu = logits.to(dtype);
    const at::Tensor cuda = cpu.to(at::kCUDA);
    const SamplingParams params = {.temperature = 0.9, .top_k = 200, .top_p = 0.9, .seed = 77};
    EXPECT_EQ(Draw(params, cuda, 100), Draw(params, cpu, 100));
    Sampler greedy({});
    EXPECT_EQ(*greedy.Sample(cuda), *greedy.Sample(cpu));
  }
}

TEST(SamplerTest, InfiniteLogits) {
  const float inf = std::numeric_limits<float>::infinity();
  // -inf is never drawn.
  ExpectFrequencies(Frequencies({.temperature = 1.0, .seed = 2}, Logits({-inf, 0.0f, -inf, 0.0f})),
                    {0, 0.5, 0, 0.5});
  // +inf logits take all the mass, shared equally.
  ExpectFrequencies(Frequencies({.temperature = 1.0, .seed = 2}, Logits({inf, 5.0f, inf, 1.0f})),
                    {0.5, 0, 0.5, 0});
  Sampler greedy({});
  EXPECT_EQ(*greedy.Sample(Logits({1.0f, inf, inf})), 1);
}

TEST(SamplerTest, BadLogits) {
  const float inf = std::numeric_limits<float>::infinity();
  for (double temperature : {0.0, 1.0}) {
    Sampler sampler({.temperature = temperature});
    auto status = sampler.Sample(Logits({0.0f, NAN, 1.0f})).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("NaN"));
    status = sampler.Sample(Logits({-inf, -inf})).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("-inf"));
    EXPECT_EQ(sampler.Sample(at::zeros({2, 3})).status().code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(sampler.Sample(at::zeros({0})).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(sampler.Sample(at::Tensor()).status().code(), absl::StatusCode::kInvalidArgument);
    status = sampler.Sample(at::zeros({3}, at::kLong)).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr("floating"));
  }
}

TEST(SamplerTest, SampleChecksParamsAgainstTheVocab) {
  Sampler sampler({.temperature = 1.0, .top_k = 5});
  auto status = sampler.Sample(Logits({0.0f, 1.0f, 2.0f})).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("top_k"));
}

TEST(SamplerTest, ValidateSamplingParamsNamesTheField) {
  EXPECT_TRUE(ValidateSamplingParams({}, 8).ok());
  EXPECT_TRUE(ValidateSamplingParams({.temperature = 0.8,
                                      .top_k = 8,
                                      .top_p = 1.0,
                                      .seed = 3,
                                      .max_new_tokens = 1,
                                      .stop_token_ids = {0, 7}},
                                     8)
                  .ok());
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<std::pair<SamplingParams, std::string>> cases = {
      {{.temperature = NAN}, "temperature"},
      {{.temperature = -0.5}, "temperature"},
      {{.temperature = inf}, "temperature"},
      {{.top_k = -1}, "top_k"},
      {{.top_k = 9}, "top_k"},
      {{.top_p = 0.0}, "top_p"},
      {{.top_p = 1.5}, "top_p"},
      {{.top_p = -0.1}, "top_p"},
      {{.top_p = NAN}, "top_p"},
      {{.max_new_tokens = 0}, "max_new_tokens"},
      {{.max_new_tokens = -3}, "max_new_tokens"},
      {{.stop_token_ids = {2, 8}}, "stop_token_ids[1]"},
      {{.stop_token_ids = {-1}}, "stop_token_ids[0]"},
  };
  for (const auto& [params, field] : cases) {
    const absl::Status status = ValidateSamplingParams(params, 8);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_THAT(std::string(status.message()), HasSubstr(field));
  }
  EXPECT_EQ(ValidateSamplingParams({}, 0).code(), absl::StatusCode::kInvalidArgument);
}

TEST(SamplerTest, FinishedOnStopTokenOrLength) {
  const Sampler sampler({.max_new_tokens = 3, .stop_token_ids = {2, 5}});
  EXPECT_FALSE(sampler.Finished(7, 1));
  EXPECT_TRUE(sampler.Finished(5, 1));
  EXPECT_TRUE(sampler.Finished(2, 2));
  EXPECT_FALSE(sampler.Finished(7, 2));
  EXPECT_TRUE(sampler.Finished(7, 3));
}

}  // namespace
}  // namespace moelora
