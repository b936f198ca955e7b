// Device memory counters on a build without CUDA.

#include "core/device_memory.h"

namespace moelora {

absl::StatusOr<DeviceMemory> GetDeviceMemory(c10::Device device) {
  return absl::UnimplementedError("this build of moelora has no CUDA allocator");
}

absl::Status ResetPeakDeviceMemory(c10::Device device) {
  return absl::UnimplementedError("this build of moelora has no CUDA allocator");
}

void CopyOnSideStream(c10::Device /*device*/, const std::function<void()>& copies) { copies(); }

}  // namespace moelora
