// Device memory counters from the CUDA caching allocator (built only against a CUDA libtorch).

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_cat.h"
#include "core/device_memory.h"

namespace moelora {

namespace allocator = c10::cuda::CUDACachingAllocator;

namespace {
// "cuda" without an index means the current device.
c10::DeviceIndex IndexOf(c10::Device device) {
  return device.has_index() ? device.index() : c10::cuda::current_device();
}
}  // namespace

absl::StatusOr<DeviceMemory> GetDeviceMemory(c10::Device device) {
  if (!device.is_cuda()) return absl::InvalidArgumentError("device memory: not a CUDA device");
  try {
    const auto stats = allocator::getDeviceStats(IndexOf(device));
    constexpr size_t kAggregate = 0;  // StatType::AGGREGATE (its namespace moved across versions)
    return DeviceMemory{stats.allocated_bytes[kAggregate].current,
                        stats.allocated_bytes[kAggregate].peak,
                        stats.reserved_bytes[kAggregate].current};
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("device memory: ", e.what_without_backtrace()));
  }
}

absl::Status ResetPeakDeviceMemory(c10::Device device) {
  if (!device.is_cuda()) return absl::InvalidArgumentError("device memory: not a CUDA device");
  try {
    c10::cuda::device_synchronize();
    allocator::resetPeakStats(IndexOf(device));
  } catch (const c10::Error& e) {
    return absl::InternalError(absl::StrCat("device memory: ", e.what_without_backtrace()));
  }
  return absl::OkStatus();
}

void CopyOnSideStream(c10::Device device, const std::function<void()>& copies) {
  if (!device.is_cuda()) {
    copies();
    return;
  }
  c10::cuda::CUDAStream stream =
      c10::cuda::getStreamFromPool(/*isHighPriority=*/false, IndexOf(device));
  {
    c10::cuda::CUDAStreamGuard guard(stream);
    copies();
  }
  stream.synchronize();
}

}  // namespace moelora
