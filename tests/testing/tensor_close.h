#ifndef MOELORA_TESTS_TESTING_TENSOR_CLOSE_H_
#define MOELORA_TESTS_TESTING_TENSOR_CLOSE_H_

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <string>

namespace moelora::testing_support {

// got is within a rounding step of expected (relative and absolute 1e-4 in fp32, 2e-2 in bf16 and
// fp16): what a kernel gives when it rounds where the reference rounds but adds its fp32 sums in
// another order than cuBLAS.
inline void ExpectWithinRounding(const at::Tensor& got, const at::Tensor& expected,
                                 const std::string& what) {
  const double tolerance = got.scalar_type() == at::kFloat ? 1e-4 : 2e-2;
  const at::Tensor difference = (got.cpu().to(at::kFloat) - expected.cpu().to(at::kFloat)).abs();
  const at::Tensor bound = expected.cpu().to(at::kFloat).abs() * tolerance + tolerance;
  EXPECT_TRUE(difference.le(bound).all().item<bool>())
      << what << ": max difference " << difference.max().item<float>();
}

}  // namespace moelora::testing_support

#endif  // MOELORA_TESTS_TESTING_TENSOR_CLOSE_H_
