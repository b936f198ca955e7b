// Programmatic dependent launch (sm_90), for every one of our kernels: a decode step is ~300
// short kernels back to back, and each normally starts only after the one before has finished
// and its launch has gone through. Launched with LaunchDependent, a kernel's blocks start once
// every block of the kernel before it in the stream has called AllowDependentsToLaunch (or
// exited), and do their own set-up (and their loads of model weights) while it finishes.
// CUDA graphs capture the launch as a programmatic edge. Kernels launched the usual way (cuBLAS,
// ATen) keep full stream order on both sides.
//
// The contract, for every kernel launched this way:
//  - before AwaitPrerequisites() it writes no global memory and reads nothing the kernel just
//    before it in the stream may write: the model's weights, or what earlier kernels wrote (they
//    have all finished by then; see the next point but one);
//  - it calls AwaitPrerequisites() before any other access (it returns once the kernel before it
//    has finished and its writes are visible);
//  - it calls AllowDependentsToLaunch() only after AwaitPrerequisites(), so a kernel that starts
//    early never runs beside more than the one kernel before it.
// Without the launch attribute (or before sm_90) both calls are no-ops.

#ifndef MOELORA_CORE_KERNELS_DEPENDENT_LAUNCH_CUH_
#define MOELORA_CORE_KERNELS_DEPENDENT_LAUNCH_CUH_

#include <cuda_runtime.h>

#include <utility>

namespace moelora::kernels {

__device__ __forceinline__ void AwaitPrerequisites() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void AllowDependentsToLaunch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// For a kernel with nothing to load before its inputs: it waits, then lets the next one start.
__device__ __forceinline__ void AwaitPrerequisitesThenAllowDependents() {
  AwaitPrerequisites();
  AllowDependentsToLaunch();
}

// Starts moving the cache line at `p` into L2 (no registers, nothing to wait for): a weight read
// after AwaitPrerequisites then comes from L2 rather than DRAM.
__device__ __forceinline__ void PrefetchToL2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// kernel<<<grid, block, shared_bytes, stream>>>(args...), programmatically dependent on the
// kernel before it in `stream`. Returns the launch's error.
template <typename... Params, typename... Args>
cudaError_t LaunchDependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                            cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute overlap = {};
  overlap.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  overlap.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  config.attrs = &overlap;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace moelora::kernels

#endif  // MOELORA_CORE_KERNELS_DEPENDENT_LAUNCH_CUH_
