#ifndef MOELORA_TESTS_TESTING_DEVICES_H_
#define MOELORA_TESTS_TESTING_DEVICES_H_

#include <ATen/Context.h>
#include <c10/core/Device.h>

#include <vector>

namespace moelora::testing_support {

// The devices this machine has: the CPU always (ATen's ops), CUDA where libtorch has it (our
// kernels, on the GPU machine). Tests of an op with a kernel and an ATen path loop over these.
inline std::vector<c10::Device> Devices() {
  std::vector<c10::Device> devices = {c10::Device(c10::kCPU)};
  if (at::hasCUDA()) devices.emplace_back(c10::kCUDA, 0);
  return devices;
}

}  // namespace moelora::testing_support

#endif  // MOELORA_TESTS_TESTING_DEVICES_H_
