#ifndef MOELORA_CORE_CUDA_GRAPH_H_
#define MOELORA_CORE_CUDA_GRAPH_H_

// CUDA graph capture behind a torch-CUDA-free interface: the CUDA build compiles
// cuda_graph_cuda.cc, the CPU build (Debian's libtorch) cuda_graph_none.cc, where capture is
// Unimplemented and callers run their work eagerly.

#include <c10/core/Device.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/statusor.h"

namespace moelora {

// A captured sequence of device work, replayed on the current stream with the addresses it was
// captured with.
class CapturedGraph {
 public:
  virtual ~CapturedGraph() = default;
  virtual void Replay() = 0;
};

// Device memory shared by the graphs of one owner, which replay them one at a time and consume
// each replay's outputs before the next. Zero until the first capture creates it.
struct GraphMemoryPool {
  uint64_t first = 0;
  uint64_t second = 0;
};

// Whether this build can capture CUDA graphs.
bool CudaGraphsAvailable();

// Runs `body` once on a side stream (warming up cuBLAS and the allocator there), then captures a
// second run of it into a graph whose allocations come from `pool`. `body` must do device work
// only: no host reads of device data, no host-to-device copies, no synchronisation. Work other
// threads issue meanwhile is not captured (thread-local capture mode). Unimplemented on builds
// without CUDA graphs; Internal, with torch's message, when capture fails.
absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureGraph(c10::Device device,
                                                            const std::function<void()>& body,
                                                            GraphMemoryPool& pool);

}  // namespace moelora

#endif  // MOELORA_CORE_CUDA_GRAPH_H_
