#ifndef MOELORA_CORE_DEVICE_MEMORY_H_
#define MOELORA_CORE_DEVICE_MEMORY_H_

// The CUDA caching allocator's counters (what torch.cuda.max_memory_allocated reports), for
// benchmarks. Builds without CUDA answer Unimplemented.

#include <c10/core/Device.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace moelora {

struct DeviceMemory {
  int64_t allocated_bytes = 0;       // held by live tensors now
  int64_t peak_allocated_bytes = 0;  // most held at once since the last reset
  int64_t reserved_bytes = 0;        // cached by the allocator (allocated + free blocks)
};

absl::StatusOr<DeviceMemory> GetDeviceMemory(c10::Device device);
// Starts a new peak window, after synchronising the device.
absl::Status ResetPeakDeviceMemory(c10::Device device);

}  // namespace moelora

#endif  // MOELORA_CORE_DEVICE_MEMORY_H_
