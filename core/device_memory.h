#ifndef MOELORA_CORE_DEVICE_MEMORY_H_
#define MOELORA_CORE_DEVICE_MEMORY_H_

// The CUDA caching allocator's counters (what torch.cuda.max_memory_allocated reports), for
// benchmarks, and copies that stay off the model's stream. Builds without CUDA answer
// Unimplemented for the counters and copy in place.

#include <c10/core/Device.h>

#include <cstdint>
#include <functional>

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

// Runs `copies` with a side stream of `device` current and waits for that stream only, so the
// work other threads queued on the device (a running forward) neither delays the copies nor is
// waited for. Sources on the host should be pinned (non-blocking copies). On the CPU, or a build
// without CUDA, just runs them. c10::Error propagates.
void CopyOnSideStream(c10::Device device, const std::function<void()>& copies);

}  // namespace moelora

#endif  // MOELORA_CORE_DEVICE_MEMORY_H_
