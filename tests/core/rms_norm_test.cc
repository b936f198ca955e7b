#include "core/rms_norm.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "tests/testing/devices.h"

namespace moelora {
namespace {

using testing_support::Devices;

// The definition in fp64: x / sqrt(mean(x²) + eps) * weight.
at::Tensor Reference(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const at::Tensor xd = x.cpu().to(at::kDouble);
  return xd * at::rsqrt(xd.pow(2).mean(-1, true) + eps) * weight.cpu().to(at::kDouble);
}

// Within one rounding of the model's dtype (two for kRoundThenWeight) of the fp64 definition.
void ExpectNear(const at::Tensor& got, const at::Tensor& reference, const std::string& what) {
  const double tolerance = got.scalar_type() == at::kFloat ? 1e-5 : 2e-2;
  const at::Tensor difference = (got.cpu().to(at::kDouble) - reference).abs();
  EXPECT_TRUE(difference.le(reference.abs() * tolerance + tolerance).all().item<bool>())
      << what << ": max difference " << difference.max().item<double>();
}

// A norm weight as each weighting takes it: Gemma's fp32 1 + w, or w in the model's dtype.
at::Tensor NormWeight(NormWeighting weighting, int64_t hidden, const at::TensorOptions& options) {
  return weighting == NormWeighting::kWeightInFp32
             ? at::randn({hidden}, options.dtype(at::kFloat)) + 1.0
             : at::randn({hidden}, options);
}

std::string Label(c10::Device device, at::ScalarType dtype, int64_t hidden) {
  return ::testing::PrintToString(device) + " " + std::string(c10::toString(dtype)) + " hidden " +
         std::to_string(hidden);
}

TEST(RmsNormTest, MatchesTheDefinitionForBothWeightings) {
  at::manual_seed(21);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;  // Debian's 1.13 lacks CPU half ops
      for (const int64_t hidden : {2048, 24, 13}) {         // vectorised and not
        for (const NormWeighting weighting :
             {NormWeighting::kRoundThenWeight, NormWeighting::kWeightInFp32}) {
          const auto options = at::TensorOptions().device(device).dtype(dtype);
          // Rows strided, as in a buffer with room: the norm must read only the first `hidden`.
          const at::Tensor x = (at::randn({5, hidden + 8}, options) * 3).narrow(1, 0, hidden);
          const at::Tensor weight = NormWeight(weighting, hidden, options);
          const std::string what = Label(device, dtype, hidden);
          const at::Tensor normed = RmsNorm(x, weight, 1e-6, weighting);
          EXPECT_EQ(normed.scalar_type(), dtype) << what;
          ExpectNear(normed, Reference(x, weight, 1e-6), what);

          // Into a strided output, as the post-attention norm writes gate/up's shared input.
          const at::Tensor out = at::full({5, hidden + 16}, 7.0, options).narrow(1, 0, hidden);
          const at::Tensor returned = RmsNorm(x, weight, 1e-6, weighting, out);
          EXPECT_EQ(returned.data_ptr(), out.data_ptr()) << what;
          EXPECT_TRUE(at::equal(out.cpu(), normed.cpu())) << what;
        }
      }
    }
  }
}

// The residual add and the norm after it: the sum exactly as Add rounds it, and the norm of that
// rounded sum exactly as RmsNorm computes it, for a strided residual (o's output beside its
// shrink) and a strided output written twice (gate's and up's inputs, each with room beside it).
TEST(RmsNormTest, AddRmsNormEqualsAddThenNorm) {
  at::manual_seed(23);
  for (const c10::Device device : Devices()) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      if (device.is_cpu() && dtype == at::kHalf) continue;
      for (const int64_t hidden : {2048, 24, 13}) {
        for (const NormWeighting weighting :
             {NormWeighting::kRoundThenWeight, NormWeighting::kWeightInFp32}) {
          const auto options = at::TensorOptions().device(device).dtype(dtype);
          const at::Tensor h = at::randn({6, hidden}, options) * 3;
          const at::Tensor residual = at::randn({6, hidden + 8}, options).narrow(1, 0, hidden);
          const at::Tensor weight = NormWeight(weighting, hidden, options);
          const std::string what = Label(device, dtype, hidden);
          const int64_t width = hidden + 16;
          const at::Tensor buffer = at::full({6, 2 * width}, 7.0, options);
          const at::Tensor out = buffer.narrow(1, 0, hidden);
          const at::Tensor copy = buffer.narrow(1, width, hidden);

          const AddAndNorm added = AddRmsNorm(h, residual, weight, 1e-6, weighting, out, copy);
          const at::Tensor sum = h + residual;
          EXPECT_TRUE(added.sum.is_contiguous()) << what;
          EXPECT_TRUE(at::equal(added.sum.cpu(), sum.cpu())) << what;
          EXPECT_EQ(added.normed.data_ptr(), out.data_ptr()) << what;
          const at::Tensor normed = RmsNorm(sum, weight, 1e-6, weighting).cpu();
          EXPECT_TRUE(at::equal(out.cpu(), normed)) << what;
          EXPECT_TRUE(at::equal(copy.cpu(), normed)) << what;
          EXPECT_TRUE(buffer.narrow(1, hidden, 16).eq(7.0).all().item<bool>()) << what;
          EXPECT_TRUE(buffer.narrow(1, width + hidden, 16).eq(7.0).all().item<bool>()) << what;
        }
      }
    }
  }
}

// On CUDA the kernel and ATen's ops (the CPU path) agree to a rounding.
TEST(RmsNormTest, KernelAgreesWithTheAtenPath) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA here: the kernel is not built in";
  at::manual_seed(22);
  const at::Tensor x = at::randn({33, 2048}, at::TensorOptions().dtype(at::kBFloat16));
  const at::Tensor weight = at::randn({2048}, at::TensorOptions().dtype(at::kBFloat16));
  const at::Tensor on_cpu = RmsNorm(x, weight, 1e-5, NormWeighting::kRoundThenWeight);
  const at::Tensor on_gpu =
      RmsNorm(x.cuda(), weight.cuda(), 1e-5, NormWeighting::kRoundThenWeight).cpu();
  const at::Tensor difference = (on_cpu.to(at::kFloat) - on_gpu.to(at::kFloat)).abs();
  EXPECT_TRUE(difference.le(on_cpu.to(at::kFloat).abs() * 1.6e-2 + 1e-2).all().item<bool>())
      << "max difference " << difference.max().item<float>();
  // Most elements equal bit for bit; the rest differ by the last bf16 bit.
  EXPECT_GT(at::eq(on_cpu, on_gpu).to(at::kFloat).mean().item<float>(), 0.95);
}

}  // namespace
}  // namespace moelora
