// CUDA graphs through ATen's CUDAGraph (built only against a CUDA libtorch).

#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/cuda_graph.h"

namespace moelora {
namespace {

class CudaCapturedGraph : public CapturedGraph {
 public:
  void Replay() override { graph_.replay(); }
  at::cuda::CUDAGraph& graph() { return graph_; }

 private:
  at::cuda::CUDAGraph graph_;
};

}  // namespace

bool CudaGraphsAvailable() { return true; }

absl::StatusOr<std::unique_ptr<CapturedGraph>> CaptureGraph(c10::Device device,
                                                            const std::function<void()>& body,
                                                            GraphMemoryPool& pool) {
  if (!device.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA graphs need a CUDA device, not ", device.str()));
  }
  if (!device.has_index()) device = c10::Device(c10::kCUDA, c10::cuda::current_device());
  bool capturing = false;
  auto graph = std::make_unique<CudaCapturedGraph>();
  try {
    c10::cuda::CUDAGuard device_guard(device);
    // Capture needs a stream other than the default one; it starts after the current stream's
    // work and the current stream continues after the capture stream's warm-up.
    const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream(device.index());
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, device.index());
    at::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(side);
    {
      c10::cuda::CUDAStreamGuard stream_guard(side);
      body();  // warm-up: cuBLAS handles and workspaces for this stream exist before capture
      if (pool.first == 0 && pool.second == 0) {
        const at::cuda::MempoolId_t id = at::cuda::graph_pool_handle();
        pool = {id.first, id.second};
      }
      graph->graph().capture_begin({pool.first, pool.second}, cudaStreamCaptureModeThreadLocal);
      capturing = true;
      body();
      capturing = false;
      graph->graph().capture_end();
    }
    at::cuda::CUDAEvent done;
    done.record(side);
    done.block(current);
  } catch (const c10::Error& e) {
    if (capturing) {
      try {
        graph->graph().capture_end();
      } catch (const c10::Error&) {
        // The capture is already invalid; the graph is dropped below.
      }
    }
    return absl::InternalError(
        absl::StrCat("capturing a CUDA graph: ", e.what_without_backtrace()));
  }
  return std::unique_ptr<CapturedGraph>(std::move(graph));
}

}  // namespace moelora
