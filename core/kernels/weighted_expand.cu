// The weighted expand on tensor cores, laid out for latency: at decode sizes it moves well under
// 1 MB, so what counts is how soon every load is in flight and how short the chain after them is.
//
// Grid: one block of 4 warps per (segment, tile of kColumns output columns), the segments' tiles
// one after another in blockIdx.x. kColumns is 16 up to 32 tokens (2048 columns: 128 blocks,
// about one per SM) and 32 past them, where each block's own copy of s and w (T·K elements each,
// L2 hits) would otherwise dominate the traffic; 64 for wide outputs (gate and up), whose
// thousands of narrow tiles would each stage all of s and w for 32 bytes of each Bᵀ row.
// Staging, every load issued before any is used: the tile's K rows of Bᵀ by cp.async into shared
// memory (DRAM, the longest wait, and no registers held meanwhile), the tile's out elements into
// registers, then s and w in 16-byte packs (up to K = 128 all of a thread's packs at once),
// whose product, rounded to T as the unfused multiply rounds it, is stored as the mma's A:
// [tokens padded to 16][K padded to 16]. A's padded tokens and K's padding (rows % 16 == 8) are
// zeros, as is Bᵀ's padding (rows past K, columns past the segment), so no mma reads anything
// unset. Index math divides by run-time values with a multiply (Divider), not div.s32.
// Compute, after one __syncthreads: m16n8k16 mma.sync, fp32 accumulators, A and Bᵀ read with
// ldmatrix (Bᵀ with .trans: it is staged [k][n]; rows padded to an odd number of 16 bytes, so no
// bank conflicts). Warps take the m tiles first, then split K: with one m tile (T ≤ 16) each warp
// takes every 4th k step, with two every 2nd, past that a whole m tile each. Each warp writes its
// partial [16][kColumns] to shared memory; after the second __syncthreads a thread per 8 output
// columns of a token adds the partials in a fixed order (deterministic), adds out in fp32 and
// rounds once.
// Shared memory is sized at launch by the tokens and the segments' rows (21 KB at T = 32,
// K = 128; 38 KB at T = 64), so the common cases pay nothing for the extremes (115 KB at T = 64,
// K = 512, past the 48 KB default: the launcher raises the limit first).

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/kernels/dependent_launch.cuh"
#include "core/kernels/element.cuh"
#include "core/kernels/ptx.cuh"
#include "core/kernels/weighted_expand.h"

namespace moelora::kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kVec = 8;           // elements per 16-byte pack
constexpr int kElementBytes = 2;  // bf16 and fp16
constexpr int kTileM = 16;        // tokens per mma
constexpr int kTileK = 16;        // rows of Bᵀ per mma
constexpr int kMaxTokens = static_cast<int>(kWeightedExpandMaxTokens);
constexpr int kMaxRows = static_cast<int>(kWeightedExpandMaxRows);
constexpr int kRowPad = 8;     // elements: staged rows an odd number of 16 bytes apart (ldmatrix)
constexpr int kReducePad = 8;  // floats: partial rows 8 banks apart (the float2 stores)
constexpr int kMinBlocks = 4;  // per SM: at most 128 registers, which the staging stays under
constexpr int kSharedLimit = 48 * 1024;   // dynamic shared memory without the attribute
constexpr int64_t kWideTileBlocks = 256;  // 64-column tiles from this many (two an H100 SM)

__host__ __device__ constexpr int RoundUp(int x, int to) { return (x + to - 1) / to * to; }

// Shared memory: the warps' partials [kWarps][kTileM][kColumns + kReducePad] floats, then A
// [t_pad][k_pad + kRowPad] and Bᵀ [k_pad][kColumns + kRowPad] elements.
template <int kColumns>
__host__ __device__ constexpr int ReduceFloats() {
  return kWarps * kTileM * (kColumns + kReducePad);
}
template <int kColumns>
__host__ __device__ constexpr int SharedBytes(int t_pad, int k_pad) {
  return static_cast<int>(sizeof(float)) * ReduceFloats<kColumns>() +
         kElementBytes * (t_pad * (k_pad + kRowPad) + k_pad * (kColumns + kRowPad));
}

// Column tiles of a segment; none where it reads no rows (out is then left as it is).
template <int kColumns>
__host__ __device__ inline int64_t Tiles(const ExpandSegment& segment) {
  return segment.blocks * segment.block_rows > 0 && segment.columns > 0
             ? (segment.columns + kColumns - 1) / kColumns
             : 0;
}

// round(a ⊙ b) of two packs of 8 elements, in fp32 as the unfused multiply.
template <typename T>
__device__ __forceinline__ uint32_t ProductPair(uint32_t a, uint32_t b) {
  const float2 x = Unpair(a, T{}), y = Unpair(b, T{});
  return Pair(x.x * y.x, x.y * y.y, T{});
}

// n / d for 2 ≤ d and n·d < 2^32 by a multiply: exact there, since the magic number's excess over
// 2^32 / d is below 1. The divisions of the staging's index math took a few hundred instructions
// (div.s32 by a value only known at run time) before the last load was issued.
class Divider {
 public:
  __device__ explicit Divider(uint32_t d) : magic_(0xffffffffu / d + 1) {}
  __device__ int operator()(int n) const {
    return static_cast<int>(__umulhi(static_cast<uint32_t>(n), magic_));
  }

 private:
  uint32_t magic_;
};

template <typename T, int kColumns>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    WeightedExpandKernel(WeightedExpandArgs args) {
  constexpr int kChunks = kColumns / kVec;  // 16-byte chunks of a tile row; also its n8 tiles
  constexpr int kBStride = kColumns + kRowPad;
  constexpr int kReduceStride = kColumns + kReducePad;
  constexpr int kOutPacks = kMaxTokens * kChunks / kThreads;  // per thread
  // Packs each of s and w a thread has in flight: 4 with 16-column tiles, else 8 (all of them up
  // to K = 128 at 32 and 64 tokens), more registers where they are needed.
  constexpr int kStageBatch = kColumns == 16 ? 4 : 8;
  constexpr uint32_t kBytes = sizeof(T);
  static_assert(kColumns % 16 == 0 && kOutPacks * kThreads == kMaxTokens * kChunks, "tiling");
  extern __shared__ uint4 dynamic_shared[];

  // This block's segment and first column in it: the segments' tiles one after another. Constant
  // indices throughout, so that the arguments stay in the parameter space.
  ExpandSegment segment = args.segments[0];
  int column0 = 0;
  {
    int tile = static_cast<int>(blockIdx.x);
#pragma unroll
    for (int i = 0; i < kMaxExpandSegments; ++i) {
      const int tiles = i < args.count ? static_cast<int>(Tiles<kColumns>(args.segments[i])) : 0;
      if (tile >= 0 && tile < tiles) {
        segment = args.segments[i];
        column0 = tile * kColumns;
      }
      tile -= tiles;
    }
  }
  const int tokens = static_cast<int>(args.tokens);
  const int m_tiles = (tokens + kTileM - 1) / kTileM;
  const int t_pad = m_tiles * kTileM;
  const int block_rows = static_cast<int>(segment.block_rows);
  const int rows = static_cast<int>(segment.blocks) * block_rows;
  const int k_pad = RoundUp(rows, kTileK);
  const int a_stride = k_pad + kRowPad;
  // 16-byte chunks of the tile inside the segment's columns.
  const int chunks = min(static_cast<int>(segment.columns) - column0, kColumns) / kVec;
  const int64_t out_column = segment.first_column + column0;
  // Row j < rows of those the segment reads, in s's and w's columns and Bᵀ's rows. j and
  // block_rows are multiples of 8: a pack never straddles two blocks.
  const Divider by_block_rows(block_rows);  // ≥ 8; j < 512
  auto source_row = [&](int j) -> int64_t {
    const int block = by_block_rows(j);
    return segment.first_row + block * segment.block_stride + (j - block * block_rows);
  };

  float* reduce = reinterpret_cast<float*>(dynamic_shared);
  T* a_s = reinterpret_cast<T*>(reduce + ReduceFloats<kColumns>());
  T* b_s = a_s + t_pad * a_stride;

  // Bᵀ's tile first: it comes from DRAM, the rest mostly from L2.
  {
    const T* bt = static_cast<const T*>(segment.bt.data) + out_column;
    for (int i = threadIdx.x; i < k_pad * kChunks; i += kThreads) {
      const int j = i / kChunks, c = i % kChunks;
      T* dst = b_s + j * kBStride + c * kVec;
      if (j < rows && c < chunks) {
        CopyAsync(SharedAddress(dst), bt + source_row(j) * segment.bt.row_stride + c * kVec);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
    CommitCopies();
  }
  // Bᵀ is a weight: its copies go out while the kernel before (the GEMM that wrote s and the
  // output) finishes; everything below reads what it wrote.
  AwaitPrerequisitesThenAllowDependents();

  // This thread's packs of the output: token i / kChunks, chunk i % kChunks of the tile, for
  // i = threadIdx.x + u·kThreads. Loaded now, added at the end.
  T* out = static_cast<T*>(segment.out);
  uint4 out_packs[kOutPacks];
#pragma unroll
  for (int u = 0; u < kOutPacks; ++u) {
    const int i = threadIdx.x + u * kThreads, t = i / kChunks, c = i % kChunks;
    out_packs[u] = make_uint4(0, 0, 0, 0);
    if (t < tokens && c < chunks) {
      out_packs[u] =
          *reinterpret_cast<const uint4*>(out + t * segment.out_stride + out_column + c * kVec);
    }
  }

  // A = round(s ⊙ w): [t_pad][k_pad], pack i at token i / packs_per_row.
  {
    const T* shrink = static_cast<const T*>(segment.shrink.data);
    const T* weights = static_cast<const T*>(segment.weights.data);
    const int packs_per_row = k_pad / kVec;
    const int packs = t_pad * packs_per_row;
    const Divider by_packs_per_row(packs_per_row);  // ≥ 2; i < 64 · 64
    for (int base = 0; base < packs; base += kStageBatch * kThreads) {
      uint4 s[kStageBatch], w[kStageBatch];
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int i = base + u * kThreads + threadIdx.x;
        const int t = by_packs_per_row(i), j = (i - t * packs_per_row) * kVec;
        s[u] = w[u] = make_uint4(0, 0, 0, 0);
        if (i < packs && t < tokens && j < rows) {
          const int64_t row = source_row(j);
          s[u] = *reinterpret_cast<const uint4*>(shrink + t * segment.shrink.row_stride + row);
          w[u] = *reinterpret_cast<const uint4*>(weights + t * segment.weights.row_stride + row);
        }
      }
#pragma unroll
      for (int u = 0; u < kStageBatch; ++u) {
        const int i = base + u * kThreads + threadIdx.x;
        if (i < packs) {
          const int t = by_packs_per_row(i), j = (i - t * packs_per_row) * kVec;
          *reinterpret_cast<uint4*>(a_s + t * a_stride + j) =
              make_uint4(ProductPair<T>(s[u].x, w[u].x), ProductPair<T>(s[u].y, w[u].y),
                         ProductPair<T>(s[u].z, w[u].z), ProductPair<T>(s[u].w, w[u].w));
        }
      }
    }
  }
  WaitCopies<0>();
  __syncthreads();

  // Warp (m_tile, k_split): m tiles first, the rest of the 4 warps over K's steps.
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int k_shift = m_tiles == 1 ? 2 : (m_tiles == 2 ? 1 : 0);  // k splits: 4, 2 or 1
  const int k_splits = 1 << k_shift;
  const int m_tile = warp >> k_shift, k_split = warp & (k_splits - 1);
  // acc[n]: rows g (0, 1) and g + 8 (2, 3), columns 8n + 2q (0, 2) and 8n + 2q + 1 (1, 3).
  float acc[kChunks][4] = {};
  if (m_tile < m_tiles) {
    // ldmatrix: lane 8j + r addresses row r + 8 (j % 2), columns 8 (j / 2).. of a 16x16 block:
    // for A (rows tokens, columns k) its matrices are a0..a3; for Bᵀ (rows k, columns n), with
    // .trans, b0 and b1 of the n8 tile at 0, then of the one at 8.
    const int row = lane % 8 + lane / 8 % 2 * 8, column = lane / 16 * 8;
    uint32_t a_address =
        SharedAddress(a_s + (m_tile * kTileM + row) * a_stride + column + k_split * kTileK);
    uint32_t b_address = SharedAddress(b_s + (row + k_split * kTileK) * kBStride + column);
    const int k_steps = k_pad / kTileK;
#pragma unroll 2
    for (int k = k_split; k < k_steps; k += k_splits) {
      uint32_t a[4];
      LoadMatrices<false>(a, a_address);
#pragma unroll
      for (int n = 0; n < kChunks; n += 2) {
        uint32_t b[4];
        LoadMatrices<true>(b, b_address + n * kVec * kBytes);
        Mma<T>(acc[n], a, b[0], b[1]);
        Mma<T>(acc[n + 1], a, b[2], b[3]);
      }
      a_address += k_splits * kTileK * kBytes;
      b_address += k_splits * kTileK * kBStride * kBytes;
    }
  }
  {
    const int g = lane / 4, q = lane % 4;
    float* partial = reduce + warp * kTileM * kReduceStride;
#pragma unroll
    for (int n = 0; n < kChunks; ++n) {
      *reinterpret_cast<float2*>(partial + g * kReduceStride + n * kVec + 2 * q) =
          make_float2(acc[n][0], acc[n][1]);
      *reinterpret_cast<float2*>(partial + (g + 8) * kReduceStride + n * kVec + 2 * q) =
          make_float2(acc[n][2], acc[n][3]);
    }
  }
  __syncthreads();

  // out = round(out + Σ over the token's m tile's k splits), in fp32.
#pragma unroll
  for (int u = 0; u < kOutPacks; ++u) {
    const int i = threadIdx.x + u * kThreads, t = i / kChunks, c = i % kChunks;
    if (t < tokens && c < chunks) {
      float sums[kVec] = {};
      for (int split = 0; split < k_splits; ++split) {
        const float* partial =
            reduce + ((t / kTileM * k_splits + split) * kTileM + t % kTileM) * kReduceStride +
            c * kVec;
        const float4 lo = *reinterpret_cast<const float4*>(partial);
        const float4 hi = *reinterpret_cast<const float4*>(partial + 4);
        sums[0] += lo.x;
        sums[1] += lo.y;
        sums[2] += lo.z;
        sums[3] += lo.w;
        sums[4] += hi.x;
        sums[5] += hi.y;
        sums[6] += hi.z;
        sums[7] += hi.w;
      }
      const uint4 o = out_packs[u];
      const float2 o0 = Unpair(o.x, T{}), o1 = Unpair(o.y, T{}), o2 = Unpair(o.z, T{}),
                   o3 = Unpair(o.w, T{});
      *reinterpret_cast<uint4*>(out + t * segment.out_stride + out_column + c * kVec) = make_uint4(
          Pair(o0.x + sums[0], o0.y + sums[1], T{}), Pair(o1.x + sums[2], o1.y + sums[3], T{}),
          Pair(o2.x + sums[4], o2.y + sums[5], T{}), Pair(o3.x + sums[6], o3.y + sums[7], T{}));
    }
  }
}

template <typename T, int kColumns>
cudaError_t LaunchKernel(const WeightedExpandArgs& args, int tiles, int k_pad,
                         cudaStream_t stream) {
  auto* kernel = WeightedExpandKernel<T, kColumns>;
  const int t_pad = RoundUp(static_cast<int>(args.tokens), kTileM);
  const int bytes = SharedBytes<kColumns>(t_pad, k_pad);
  if (bytes > kSharedLimit) {
    // The most any launch asks for, so that launches from several threads never lower it.
    constexpr int kMostBytes = SharedBytes<kColumns>(kMaxTokens, kMaxRows);
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMostBytes);
    if (error != cudaSuccess) return error;
  }
  return LaunchDependent(kernel, dim3(static_cast<unsigned>(tiles)), dim3(kThreads), bytes, stream,
                         args);
}

// Whether a segment field is a whole number of packs.
bool WholePacks(int64_t value) { return value >= 0 && value % kVec == 0; }

}  // namespace

bool WeightedExpandTakes(const WeightedExpandArgs& args) {
  if (args.type != ElementType::kBFloat16 && args.type != ElementType::kHalf) return false;
  if (args.count < 1 || args.count > kMaxExpandSegments) return false;
  if (args.tokens < 0 || args.tokens > kWeightedExpandMaxTokens) return false;
  for (int i = 0; i < args.count; ++i) {
    const ExpandSegment& segment = args.segments[i];
    if (!Aligned(segment.shrink.data, segment.shrink.row_stride, kVec, kElementBytes) ||
        !Aligned(segment.weights.data, segment.weights.row_stride, kVec, kElementBytes) ||
        !Aligned(segment.bt.data, segment.bt.row_stride, kVec, kElementBytes) ||
        !Aligned(segment.out, segment.out_stride, kVec, kElementBytes)) {
      return false;
    }
    if (!WholePacks(segment.first_column) || !WholePacks(segment.columns) ||
        !WholePacks(segment.first_row) || !WholePacks(segment.block_rows) ||
        !WholePacks(segment.block_stride) || segment.blocks < 0) {
      return false;
    }
    // rows() ≤ the most, without overflowing.
    if (segment.blocks > 0 && segment.block_rows > kWeightedExpandMaxRows / segment.blocks) {
      return false;
    }
  }
  return true;
}

cudaError_t LaunchWeightedExpand(const WeightedExpandArgs& args, cudaStream_t stream) {
  if (!WeightedExpandTakes(args)) return cudaErrorInvalidValue;
  if (args.tokens == 0) return cudaSuccess;
  // Tile width: 16 columns (2048 columns are 128 blocks, about one an SM); past 32 tokens 32,
  // so that half the blocks each read s and w once for twice the columns; and 64 where that
  // still leaves kWideTileBlocks blocks (gate and up: 16384 columns each), where 16-column tiles
  // were a thousand blocks a launch each staging all of s and w for 32 bytes of each Bᵀ row.
  int64_t tiles16 = 0, tiles32 = 0, tiles64 = 0;
  int k_pad = 0;
  for (int i = 0; i < args.count; ++i) {
    const ExpandSegment& segment = args.segments[i];
    if (Tiles<16>(segment) == 0) continue;
    tiles16 += Tiles<16>(segment);
    tiles32 += Tiles<32>(segment);
    tiles64 += Tiles<64>(segment);
    k_pad = std::max(k_pad, RoundUp(static_cast<int>(segment.rows()), kTileK));
  }
  if (tiles16 == 0) return cudaSuccess;
  if (tiles16 > INT_MAX) return cudaErrorInvalidValue;
  const int columns = tiles64 >= kWideTileBlocks ? 64 : (args.tokens > 32 ? 32 : 16);
  return WithElementType(args.type, [&](auto element) -> cudaError_t {
    using T = decltype(element);
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;
    } else {
      switch (columns) {
        case 64:
          return LaunchKernel<T, 64>(args, static_cast<int>(tiles64), k_pad, stream);
        case 32:
          return LaunchKernel<T, 32>(args, static_cast<int>(tiles32), k_pad, stream);
        default:
          return LaunchKernel<T, 16>(args, static_cast<int>(tiles16), k_pad, stream);
      }
    }
  });
}

}  // namespace moelora::kernels
