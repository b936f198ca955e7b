// CUDA graphs on a build without CUDA (Debian's CPU libtorch): nothing to capture.

#include "absl/status/status.h"
#include "core/cuda_graph.h"

namespace moelora {

bool CudaGraphsAvailable() { return false; }

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureGraph(c10::Device device,
                                                            const std::function<void()>& body,
                                                            GraphMemoryPool& pool) {
  return absl::UnimplementedError("this build of moelora has no CUDA graphs");
}

}  // namespace moelora
