// Block b takes rows [b·kRows, +kRows) of W, all tokens; warp w of its n the passes w, w + n, ...
// of `in` (a pass is 256 elements: 8 a lane, one 16-byte pack). A lane loads a pass's pack of every
// row before any product, so that a block has kRows · n · 32 loads of W in flight; the
// first pass's before the wait for the kernel before (W is a weight). Many warps a multiprocessor
// keep enough of W in flight; a warp's next pass is loaded after its products. x comes from L1/L2
// (every block reads it). Each warp adds its lanes' sums with shuffles, the block its warps' in
// shared memory in a fixed order (deterministic), and one thread an output: bias added, rounded
// once.

#include <cstdint>

#include "core/kernels/dependent_launch.cuh"
#include "core/kernels/element.cuh"
#include "core/kernels/skinny_linear.h"

namespace moelora::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kVec = 8;                   // elements per 16-byte pack (bf16, fp16)
constexpr int kPass = kWarpSize * kVec;   // elements of `in` a warp reads a pass
constexpr int64_t kMaxIndex = 1ll << 31;  // 32-bit element offsets within a row block
constexpr int kRows = 8;                  // rows of W a block takes: packs of W in flight a lane
// Registers a thread: each of a multiprocessor's 4 schedulers holds 16384, in steps of 256 a
// warp. 72 fit 7 warps a scheduler, 3 blocks of 9 warps a multiprocessor (gate and up with their
// shrink columns beside 2048 inputs: 9 passes); 96 at two tokens fit 5, 2 blocks. Bounded only by
// 512 threads a block, the compiler gave two tokens 98 (4 warps a scheduler): those 9-warp blocks
// then ran one to a multiprocessor, 43 µs a launch against ~26 at one token (Nsight Compute).
template <int kTokens>
constexpr int kGemvMaxRegisters = kTokens == 1 ? 72 : 96;
// The most warps a block may have for two blocks to share a multiprocessor at that cap: 14 at
// one token, 10 at two (a 16-warp block, as 4096 inputs had, ran alone).
template <int kTokens>
constexpr int kTwoBlockWarps = 4 * (16384 / (kGemvMaxRegisters<kTokens> * kWarpSize)) / 2;
constexpr int kMaxWarps = kTwoBlockWarps<1>;
static_assert(kGemvMaxRegisters<1> * kWarpSize % 256 == 0 &&
                  kGemvMaxRegisters<2> * kWarpSize % 256 == 0,
              "kTwoBlockWarps assumes caps of whole 256-register steps a warp");
// __maxnreg__ is nvcc 12.4's; older ones bound the block size only (the compiler's own counts).
#if __CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4)
#define MOELORA_GEMV_REGISTER_BOUND(tokens) __maxnreg__(kGemvMaxRegisters<tokens>)
#else
#define MOELORA_GEMV_REGISTER_BOUND(tokens) __launch_bounds__(kMaxWarps* kWarpSize)
#endif

// W is read once: past L1, with L2 fetching whole 256-byte sectors ahead.
__device__ __forceinline__ uint4 LoadStreaming(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <typename T>
__device__ __forceinline__ float Dot(uint4 a, uint4 b) {
  const float2 a0 = Unpair(a.x, T{}), a1 = Unpair(a.y, T{}), a2 = Unpair(a.z, T{}),
               a3 = Unpair(a.w, T{});
  const float2 b0 = Unpair(b.x, T{}), b1 = Unpair(b.y, T{}), b2 = Unpair(b.z, T{}),
               b3 = Unpair(b.w, T{});
  float sum = a0.x * b0.x;
  sum = fmaf(a0.y, b0.y, sum);
  sum = fmaf(a1.x, b1.x, sum);
  sum = fmaf(a1.y, b1.y, sum);
  sum = fmaf(a2.x, b2.x, sum);
  sum = fmaf(a2.y, b2.y, sum);
  sum = fmaf(a3.x, b3.x, sum);
  return fmaf(a3.y, b3.y, sum);
}

template <typename T, int kTokens>
__global__ void MOELORA_GEMV_REGISTER_BOUND(kTokens)
    SkinnyLinearKernel(const SkinnyLinearArgs args) {
  __shared__ float partials[kMaxWarps][kRows][kTokens];
  const int warps = static_cast<int>(blockDim.x) / kWarpSize;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int tokens = static_cast<int>(args.tokens), in = static_cast<int>(args.in);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), args.out_features - row0));
  const int passes = (in + kPass - 1) / kPass;
  const int w_stride = static_cast<int>(args.weight.row_stride);
  const T* w =
      static_cast<const T*>(args.weight.data) + row0 * args.weight.row_stride + lane * kVec;
  const T* x = static_cast<const T*>(args.x.data) + lane * kVec;
  const int x_stride = static_cast<int>(args.x.row_stride);

  uint4 packs[kRows];
  auto load_pass = [&](int pass) {
    const bool inside = pass * kPass + lane * kVec < in;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      packs[r] = r < rows && inside ? LoadStreaming(w + r * w_stride + pass * kPass)
                                    : make_uint4(0, 0, 0, 0);
    }
  };
  float sums[kRows][kTokens] = {};
  int pass = warp;
  if (pass < passes) load_pass(pass);
  AwaitPrerequisitesThenAllowDependents();
  for (; pass < passes; pass += warps) {
    const bool inside = pass * kPass + lane * kVec < in;
    uint4 xs[kTokens];
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
      xs[t] = t < tokens && inside
                  ? *reinterpret_cast<const uint4*>(x + t * x_stride + pass * kPass)
                  : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) sums[r][t] += Dot<T>(packs[r], xs[t]);
    }
    if (pass + warps < passes) load_pass(pass + warps);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int t = 0; t < kTokens; ++t) {
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
        sums[r][t] += __shfl_xor_sync(0xffffffffu, sums[r][t], offset);
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int t = 0; t < kTokens; ++t) partials[warp][r][t] = sums[r][t];
    }
  }
  __syncthreads();
  const int r = threadIdx.x % kRows, t = threadIdx.x / kRows;
  if (threadIdx.x < kRows * kTokens && r < rows && t < tokens) {
    float total = 0.0f;
#pragma unroll
    for (int v = 0; v < warps; ++v) total += partials[v][r][t];
    if (args.bias != nullptr) total += ToFloat(static_cast<const T*>(args.bias)[row0 + r]);
    static_cast<T*>(args.out)[t * args.out_stride + row0 + r] = FromFloat<T>(total);
  }
}

#undef MOELORA_GEMV_REGISTER_BOUND

// Warps a block: every warp the same number of passes (a warp with one pass more than the rest
// held its block a whole memory round trip longer: gate and up with 128 shrink columns beside
// their 2048 are 9 passes), and few enough that two blocks share a multiprocessor at the
// register cap (kTwoBlockWarps; Llama-3-8B's 4096 inputs: 2 rounds of 8); for long inputs (32
// passes and more: down's 16384) at most 8: with 16 warps down's 256 blocks ran in two waves of
// one block each (26.7 µs, 2.5 TB/s under Nsight Compute, against 25.5 µs for gate's 4× more
// blocks).
template <int kTokens>
int WarpsFor(int64_t in) {
  const int64_t passes = (in + kPass - 1) / kPass;
  const int64_t most = passes >= 32 ? 8 : kTwoBlockWarps<kTokens>;
  const int64_t rounds = (passes + most - 1) / most;
  return static_cast<int>((passes + rounds - 1) / rounds);
}

template <typename T, int kTokens>
cudaError_t Launch(const SkinnyLinearArgs& args, cudaStream_t stream) {
  const int64_t blocks = (args.out_features + kRows - 1) / kRows;
  return LaunchDependent(SkinnyLinearKernel<T, kTokens>, dim3(static_cast<unsigned>(blocks)),
                         dim3(WarpsFor<kTokens>(args.in) * kWarpSize), 0, stream, args);
}

template <typename T>
cudaError_t LaunchForTokens(const SkinnyLinearArgs& args, cudaStream_t stream) {
  return args.tokens == 1 ? Launch<T, 1>(args, stream) : Launch<T, 2>(args, stream);
}

bool Packed(const void* data, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && row_stride % kVec == 0;
}

}  // namespace

bool SkinnyLinearTakes(const SkinnyLinearArgs& args) {
  // Offsets within a block's rows of W, x and the output stay below 2^31 elements.
  const bool small = args.in < kMaxIndex && kRows * args.weight.row_stride < kMaxIndex &&
                     kSkinnyLinearMaxTokens * args.x.row_stride < kMaxIndex &&
                     kSkinnyLinearMaxTokens * args.out_stride < kMaxIndex &&
                     args.out_features < kMaxIndex;
  return args.type != ElementType::kFloat && args.tokens >= 1 &&
         args.tokens <= kSkinnyLinearMaxTokens && args.in >= 1 && args.in % kVec == 0 &&
         args.out_features >= 1 && Packed(args.x.data, args.x.row_stride) &&
         Packed(args.weight.data, args.weight.row_stride) && args.x.row_stride >= args.in &&
         args.weight.row_stride >= args.in && args.out_stride >= args.out_features && small;
}

cudaError_t LaunchSkinnyLinear(const SkinnyLinearArgs& args, cudaStream_t stream) {
  if (!SkinnyLinearTakes(args)) return cudaErrorInvalidValue;
  return args.type == ElementType::kBFloat16 ? LaunchForTokens<__nv_bfloat16>(args, stream)
                                             : LaunchForTokens<__half>(args, stream);
}

}  // namespace moelora::kernels
