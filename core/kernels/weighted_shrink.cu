// The weighted shrink on tensor cores, laid out for latency: at decode sizes it moves about 1 MB
// (A from DRAM, x from L2), so what counts is how soon every load is in flight and how short the
// chain after them is. Nothing is written to global memory but the outputs: no workspace, no
// second kernel.
//
// Grid: x = tiles of kTileRows rows of one target (target 0's tiles, then target 1's; a tile
// never straddles two targets, and a target's last tile may be part-filled), y = kSplits splits
// of `in`, the y blocks of a tile one thread-block cluster (__cluster_dims__). At 256 rows that is
// 16 × 8 = 128 blocks of 4 warps, about one per SM, each reading 8 KB of A and T × 512 B of x at
// in = 2048. in's k16 steps are split evenly (the last splits get fewer, or none, where they do
// not divide): 16 steps a block at 2048, 24 at 3072, 32 at 4096.
// Staging, every load issued before any is used: the tile's rows of A (DRAM, the longest wait)
// then x's, by cp.async into shared memory [kTileRows + tokens][k + kRowPad] (rows an odd number
// of 16 bytes apart, so ldmatrix has no bank conflicts), a warp per row and a few instructions a
// row; packs past `in` (in % 16 == 8) are zeros. Then the reducing threads' routing weights, into
// registers. Only real rows are staged: ldmatrix reads a padded token's or row's address from the
// last real one, whose garbage lands in mma rows and columns that are never read. Up to 32 k16
// steps (in ≤ 4096) are staged at once; a larger split goes through its steps in chunks of 32.
// Compute, after one __syncthreads: m16n8k16 mma.sync, fp32 accumulators, x as the row-major A
// (tokens × k) and A's rows as the "col" B (k × rows: ldmatrix without .trans), two n8 tiles.
// Warps take the m tiles (16 tokens) first, then split the block's k steps in contiguous runs
// (4 warps a run each with one m tile, 2 with two); a warp loads 4 steps' fragments before their
// mmas, which go into 4 accumulator chains. With one warp per SM sub-partition nothing hides
// latency, so instruction counts matter here as much as the memory.
// Reduction, through distributed shared memory: output (token t, quad c of 4 rows) is group
// 4t + c, owned by the cluster's block (4t + c) % kSplits. Each warp sends its partials (float2
// stores) straight into the owners' shared memory, one slot per (group, source block, warp);
// after one cluster barrier (release/acquire) the owner's thread per group adds its slots in a
// fixed order (deterministic), rounds, multiplies by the weights and writes 4 outputs (2-byte
// stores: outputs and weights need no alignment). Pushing rather than pulling the partials makes
// the reduction one barrier and no remote loads; a relaxed cluster arrival at the start, waited
// for before the stores, guarantees every block of the cluster has started.
// Shared memory: 4 KB for the received partials plus the staging, 29 KB at T = 32, in = 2048;
// 85 KB at most (T = 64, in ≥ 4096, past the 48 KB default: the launcher raises the limit first).
// On an H100 (ncu, default clocks and cache flush), 2 × 128 rows, in = 2048: 6.0 µs at T = 1,
// 6.6 µs at T = 32, 7.7 µs at T = 64, where the CUDA-core kernel before it took 7.8, 9.9 and
// 16.7 µs; an empty kernel of this grid measures 2.5 µs there.

#include <cooperative_groups.h>

#include <cstdint>
#include <type_traits>

#include "core/kernels/dependent_launch.cuh"
#include "core/kernels/element.cuh"
#include "core/kernels/ptx.cuh"
#include "core/kernels/weighted_shrink.h"

namespace moelora::kernels {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kSplitsShift = 3;
constexpr int kSplits = 1 << kSplitsShift;  // blocks of a cluster, each an eighth of in's k16 steps
constexpr int kVec = 8;                     // elements per 16-byte pack
constexpr int kElementBytes = 2;            // bf16 and fp16
constexpr int kTileM = 16;                  // tokens per mma
constexpr int kTileK = 16;                  // k per mma step
constexpr int kTileRows = 16;               // rows of A per block: two n8 mma tiles
constexpr int kQuads = kTileRows / 4;       // float4s of a token's partial row
constexpr int kMaxChunkSteps = 32;          // k16 steps staged at once
constexpr int kStagePasses = 2 * kMaxChunkSteps / kWarpSize;  // of a warp over a staged row
constexpr int kMaxTokens = static_cast<int>(kWeightedShrinkMaxTokens);
constexpr int kRowPad = 8;  // elements: staged rows an odd number of 16 bytes apart (ldmatrix)
constexpr int kStepBytes = kTileK * kElementBytes;  // of a staged row, a k16 step
constexpr int kChains = 4;  // accumulator chains of a warp (k steps in flight)
// Partials (group, source block, source warp) a block receives: at most ⌈4T / 8⌉ · 8 · k_splits,
// where k_splits · m_tiles ≤ 4, so at most 256 (checked below).
constexpr int kReceived = 256;
constexpr int kMinBlocks = 4;            // per SM: at most 128 registers
constexpr int kSharedLimit = 48 * 1024;  // dynamic shared memory without the attribute

static_assert(kMaxTokens <= kWarps * kTileM, "a warp per m tile at most");

__host__ __device__ constexpr int64_t CeilDiv(int64_t x, int64_t by) { return (x + by - 1) / by; }

// log2 of the warps splitting a block's k steps: 4 warps over the m tiles (16 tokens) first.
__host__ __device__ constexpr int KShift(int m_tiles) {
  return m_tiles == 1 ? 2 : (m_tiles == 2 ? 1 : 0);
}
// Whether every token count's received partials fit, and its owned groups have a thread each.
constexpr bool ReductionFits() {
  for (int tokens = 1; tokens <= kMaxTokens; ++tokens) {
    const int max_owned = static_cast<int>(CeilDiv(tokens * kQuads, kSplits));
    const int sources = kSplits << KShift(static_cast<int>(CeilDiv(tokens, kTileM)));
    if (sources * max_owned > kReceived || max_owned > kThreads) return false;
  }
  return true;
}
static_assert(ReductionFits(), "the reduction's shared memory and threads");

// k16 steps of in (the last one half-filled where in % 16 == 8) each split takes, except that the
// last splits may get fewer or none.
__host__ __device__ inline int StepsPerSplit(int64_t in) {
  return static_cast<int>(CeilDiv(CeilDiv(in, kTileK), kSplits));
}
__host__ __device__ inline int ChunkSteps(int steps_per_split) {
  return steps_per_split < kMaxChunkSteps ? steps_per_split : kMaxChunkSteps;
}
__host__ __device__ constexpr int SharedBytes(int tokens, int chunk_steps) {
  return static_cast<int>(sizeof(float4)) * kReceived +
         kElementBytes * (kTileRows + tokens) * (chunk_steps * kTileK + kRowPad);
}

// The cluster's barrier in halves: every thread of every block arrives, then waits for all.
// Arrive is a release and wait an acquire (cluster scope), except where relaxed.
__device__ __forceinline__ void ClusterArrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void ClusterArriveRelaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void ClusterWait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Which rows a staging pass copies: A's (a weight), x's (the input), or both.
enum class Staged { kWeights, kInputs, kBoth };

template <typename T>
__global__ void __cluster_dims__(1, kSplits, 1) __launch_bounds__(kThreads, kMinBlocks)
    WeightedShrinkKernel(WeightedShrinkArgs args) {
  extern __shared__ uint4 dynamic_shared[];
  // Every block of the cluster must have started before any stores into its shared memory: this
  // arrival is waited for just before the partials are sent, long after every block started.
  ClusterArriveRelaxed();
  const cg::cluster_group cluster = cg::this_cluster();
  // The cluster is this tile's kSplits blocks along y: the rank is blockIdx.y.
  const int split = static_cast<int>(cluster.block_rank());

  // This block's target and its tile's first row there. Constant indices throughout, so that the
  // arguments stay in the parameter space.
  const T* a = nullptr;
  int64_t a_stride = 0;
  T* out = nullptr;
  int64_t out_stride = 0;
  int rows = 0, row0 = 0;
  {
    int tile = static_cast<int>(blockIdx.x);
#pragma unroll
    for (int i = 0; i < kMaxShrinkTargets; ++i) {
      const int target_rows = i < args.count ? static_cast<int>(args.targets[i].rows) : 0;
      const int tiles = static_cast<int>(CeilDiv(target_rows, kTileRows));
      if (tile >= 0 && tile < tiles) {
        a = static_cast<const T*>(args.targets[i].a.data);
        a_stride = args.targets[i].a.row_stride;
        out = static_cast<T*>(args.targets[i].out);
        out_stride = args.targets[i].out_stride;
        rows = target_rows;
        row0 = tile * kTileRows;
      }
      tile -= tiles;
    }
  }
  const int tokens = static_cast<int>(args.tokens);
  const int tile_rows = min(rows - row0, kTileRows);  // ≥ 1
  const int64_t in = args.in;
  const int steps_per_split = StepsPerSplit(in);
  const int chunk_steps = ChunkSteps(steps_per_split);
  const int pitch = chunk_steps * kTileK + kRowPad;  // elements between staged rows
  const int64_t first_step = static_cast<int64_t>(split) * steps_per_split;
  const int steps = static_cast<int>(max(
      int64_t{0}, min(static_cast<int64_t>(steps_per_split), CeilDiv(in, kTileK) - first_step)));

  float4* received = reinterpret_cast<float4*>(dynamic_shared);  // [kReceived]: see below
  T* stage = reinterpret_cast<T*>(received + kReceived);         // [kTileRows + tokens][pitch]
  a += static_cast<int64_t>(row0) * a_stride;
  const T* x = static_cast<const T*>(args.x.data);

  // Stages local steps [first, first + count) of this block's, 2 · count packs a row: the tile's
  // A rows (r at row r) then x's (token t at row kTileRows + t), a warp per row, its lanes over
  // the packs (512 contiguous bytes a pass). Which of its packs a lane copies (or zeroes, past
  // in) is the same in every row, so a row costs a few instructions: a single warp per SM
  // sub-partition runs these with little overlap, and the copies go out as fast as they issue.
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  auto stage_steps = [&](int first, int count, Staged staged) {
    const int64_t k0 = (first_step + first) * kTileK + lane * kVec;  // the lane's first column
    bool copy[kStagePasses], zero[kStagePasses];
#pragma unroll
    for (int u = 0; u < kStagePasses; ++u) {
      const bool pack = lane + u * kWarpSize < 2 * count;
      copy[u] = pack && k0 + u * kWarpSize * kVec < in;
      zero[u] = pack && !copy[u];
    }
    auto stage_rows = [&](T* dst, const T* src, int rows_left, int64_t src_stride) {
      for (; rows_left > 0; rows_left -= kWarps) {
#pragma unroll
        for (int u = 0; u < kStagePasses; ++u) {
          if (copy[u]) {
            CopyAsync(SharedAddress(dst + u * kWarpSize * kVec), src + u * kWarpSize * kVec);
          } else if (zero[u]) {
            *reinterpret_cast<uint4*>(dst + u * kWarpSize * kVec) = make_uint4(0, 0, 0, 0);
          }
        }
        dst += kWarps * pitch;
        src += kWarps * src_stride;
      }
    };
    if (staged != Staged::kInputs) {
      stage_rows(stage + warp * pitch + lane * kVec, a + warp * a_stride + k0, tile_rows - warp,
                 a_stride);
    }
    if (staged != Staged::kWeights) {
      stage_rows(stage + (kTileRows + warp) * pitch + lane * kVec,
                 x + warp * args.x.row_stride + k0, tokens - warp, args.x.row_stride);
      CommitCopies();
    }
  };
  // A is a weight: its first copies go out while the kernel before (the norm that wrote x)
  // finishes (dependent_launch.cuh); x's, in the same copy group, once it has.
  const int first_count = min(steps, chunk_steps);
  if (steps > 0) stage_steps(0, first_count, Staged::kWeights);
  AwaitPrerequisitesThenAllowDependents();
  if (steps > 0) stage_steps(0, first_count, Staged::kInputs);

  // The reduction: output (token t, quad c of 4 rows) is group 4t + c, owned by the cluster's
  // block (4t + c) % kSplits as its local group j = (4t + c) / kSplits. Each of the cluster's
  // blocks sends its warps' partials of the group (a float4 each; `sources` of them, source
  // block-major) to received[source · max_owned + j] of the owner, where thread j adds them in
  // order (deterministic), rounds, multiplies by the weights (loaded now) and writes 4 outputs.
  const int m_tiles = (tokens + kTileM - 1) / kTileM;
  const int k_shift = KShift(m_tiles);  // warp k splits: 4, 2 or 1
  const int k_splits = 1 << k_shift;
  const int sources = kSplits << k_shift;  // partials a group adds: 8, 16 or 32
  const int groups = tokens * kQuads;
  const int max_owned = (groups + kSplits - 1) >> kSplitsShift;  // sources · max_owned ≤ 256
  const int owned = groups > split ? (groups - split + kSplits - 1) >> kSplitsShift : 0;
  const int j = threadIdx.x;
  const int owned_group = (j << kSplitsShift) + split, owned_t = owned_group / kQuads;
  const int owned_row = row0 + owned_group % kQuads * 4;
  T weights[4];
  {
    const T* w =
        static_cast<const T*>(args.weights.data) + owned_t * args.weights.row_stride + owned_row;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      weights[e] = FromFloat<T>(0.0f);
      if (j < owned && owned_row + e < rows) weights[e] = w[e];
    }
  }

  // Warp (m_tile, k_split): m tiles first, the rest of the 4 warps over the block's k steps.
  const int m_tile = warp >> k_shift, k_split = warp & (k_splits - 1);
  // ldmatrix: lane 8j + r addresses row r of matrix j. x's matrices are a0..a3: tokens
  // r + 8 (j % 2), k 8 (j / 2)..; A's are b0, b1 of rows 0..7, then of rows 8..15: rows
  // r + 8 (j / 2), k 8 (j % 2)... Padded tokens and rows read the last real one's.
  const int token = min(m_tile * kTileM + lane % 8 + lane / 8 % 2 * 8, tokens - 1);
  const int a_row = min(lane % 8 + lane / 16 * 8, tile_rows - 1);
  const uint32_t x_address = SharedAddress(stage + (kTileRows + token) * pitch + lane / 16 * 8);
  const uint32_t a_address = SharedAddress(stage + a_row * pitch + lane / 8 % 2 * 8);
  // acc[chain][n]: rows (tokens) g (0, 1) and g + 8 (2, 3), columns (rows of A) 8n + 2q (0, 2)
  // and 8n + 2q + 1 (1, 3). A warp takes a contiguous run of the chunk's steps, kChains at a
  // time: their fragments loaded before any mma (immediate offsets from one address), each step
  // into its own chain, so that neither the loads nor the mmas wait on each other.
  float acc[kChains][2][4] = {};
  auto step = [&](int c, uint32_t offset) {
    uint32_t xa[4], b[4];
    LoadMatrices<false>(xa, x_address + offset);
    LoadMatrices<false>(b, a_address + offset);
    Mma<T>(acc[c][0], xa, b[0], b[1]);
    Mma<T>(acc[c][1], xa, b[2], b[3]);
  };
  for (int first = 0; first < steps; first += chunk_steps) {
    const int count = min(chunk_steps, steps - first);
    WaitCopies<0>();
    __syncthreads();
    if (m_tile < m_tiles) {
      const int per_warp = (count + k_splits - 1) >> k_shift;
      const int warp_steps = min(per_warp, count - k_split * per_warp);  // may be ≤ 0
      uint32_t offset = k_split * per_warp * kStepBytes;
      int s = 0;
      for (; s + kChains <= warp_steps; s += kChains, offset += kChains * kStepBytes) {
        uint32_t xa[kChains][4], b[kChains][4];
#pragma unroll
        for (int c = 0; c < kChains; ++c) {
          LoadMatrices<false>(xa[c], x_address + offset + c * kStepBytes);
          LoadMatrices<false>(b[c], a_address + offset + c * kStepBytes);
        }
#pragma unroll
        for (int c = 0; c < kChains; ++c) {
          Mma<T>(acc[c][0], xa[c], b[c][0], b[c][1]);
          Mma<T>(acc[c][1], xa[c], b[c][2], b[c][3]);
        }
      }
#pragma unroll
      for (int c = 0; c < kChains - 1; ++c) {
        if (s + c < warp_steps) step(c, offset + c * kStepBytes);
      }
    }
    if (first + chunk_steps < steps) {
      __syncthreads();  // every warp is done with this chunk
      stage_steps(first + chunk_steps, min(chunk_steps, steps - first - chunk_steps),
                  Staged::kBoth);
    }
  }
  ClusterWait();  // every block has started
  if (m_tile < m_tiles) {
    // Lane (g, q) holds rows 8n + 2q, +1 of tokens g and g + 8: half of quad 2n + q / 2.
    const int g = lane / 4, q = lane % 4;
    const int source = split * k_splits + k_split;
#pragma unroll
    for (int n = 0; n < 2; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int t = m_tile * kTileM + g + 8 * h, group = t * kQuads + 2 * n + q / 2;
        if (t < tokens) {
          float2 sum = make_float2(acc[0][n][2 * h], acc[0][n][2 * h + 1]);
#pragma unroll
          for (int c = 1; c < kChains; ++c) {
            sum.x += acc[c][n][2 * h];
            sum.y += acc[c][n][2 * h + 1];
          }
          float* owner =
              reinterpret_cast<float*>(cluster.map_shared_rank(received, group & (kSplits - 1)));
          *reinterpret_cast<float2*>(owner + (source * max_owned + (group >> kSplitsShift)) * 4 +
                                     q % 2 * 2) = sum;
        }
      }
    }
  }
  // Every partial is in its owner's shared memory once all arrive; none is read remotely after.
  ClusterArrive();
  ClusterWait();

  if (j < owned) {
    float4 sum = received[j];
#pragma unroll 8
    for (int source = 1; source < sources; ++source) {
      const float4 partial = received[source * max_owned + j];
      sum.x += partial.x;
      sum.y += partial.y;
      sum.z += partial.z;
      sum.w += partial.w;
    }
    const float sums[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (owned_row + e < rows) {
        const float shrunk = ToFloat(FromFloat<T>(sums[e]));
        out[owned_t * out_stride + owned_row + e] = FromFloat<T>(shrunk * ToFloat(weights[e]));
      }
    }
  }
}

template <typename T>
cudaError_t LaunchKernel(const WeightedShrinkArgs& args, int tiles, cudaStream_t stream) {
  auto* kernel = WeightedShrinkKernel<T>;
  const int bytes = SharedBytes(static_cast<int>(args.tokens), ChunkSteps(StepsPerSplit(args.in)));
  if (bytes > kSharedLimit) {
    // The most any launch asks for, so that launches from several threads never lower it.
    constexpr int kMostBytes = SharedBytes(kMaxTokens, kMaxChunkSteps);
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMostBytes);
    if (error != cudaSuccess) return error;
  }
  // The grid's y is the cluster's (__cluster_dims__): one cluster per tile.
  return LaunchDependent(kernel, dim3(static_cast<unsigned>(tiles), kSplits), dim3(kThreads), bytes,
                         stream, args);
}

}  // namespace

bool WeightedShrinkTakes(const WeightedShrinkArgs& args) {
  if (args.type != ElementType::kBFloat16 && args.type != ElementType::kHalf) return false;
  if (args.count < 1 || args.count > kMaxShrinkTargets) return false;
  if (args.tokens < 0 || args.tokens > kWeightedShrinkMaxTokens) return false;
  if (args.in < 0 || args.in % kVec != 0) return false;
  if (!Aligned(args.x.data, args.x.row_stride, kVec, kElementBytes)) return false;
  int64_t rows = 0;
  for (int i = 0; i < args.count; ++i) {
    const ShrinkTarget& target = args.targets[i];
    if (target.rows < 0 || target.rows > kWeightedShrinkMaxRows ||
        !Aligned(target.a.data, target.a.row_stride, kVec, kElementBytes)) {
      return false;
    }
    rows += target.rows;
  }
  return rows <= kWeightedShrinkMaxRows;
}

cudaError_t LaunchWeightedShrink(const WeightedShrinkArgs& args, cudaStream_t stream) {
  if (!WeightedShrinkTakes(args)) return cudaErrorInvalidValue;
  int64_t tiles = 0;
  for (int i = 0; i < args.count; ++i) tiles += CeilDiv(args.targets[i].rows, kTileRows);
  if (args.tokens == 0 || tiles == 0) return cudaSuccess;
  return WithElementType(args.type, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      return LaunchKernel<T>(args, static_cast<int>(tiles), stream);
    }
  });
}

}  // namespace moelora::kernels
