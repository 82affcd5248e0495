// The decode path of the FP8 grouped GEMM: few rows per expert (T = 1..16 tokens of a MoE layer),
// where the GEMM is the stream of the touched experts' weights and nothing else. CUDA headers only.
//
// Why not CUTLASS here: a 64-row CUTLASS tile gives each expert N/128 CTAs, each walking all of K
// serially through its TMA pipeline; with 1-2 rows per expert that is latency bound (Qwen3-30B-A3B
// at T=1 ran at 0.21 of its roofline on an H200). This kernel spreads an expert's weight over
// many CTAs and warps and keeps many 16-byte loads in flight per lane.
//
// Work split:
// - grid (N / 32, min(E, M)): blockIdx.x picks 32 output columns (weight rows); blockIdx.y is a
//   slot that takes the blockIdx.y-th expert with rows (found on the device from expert_offsets, so
//   no host sync and, at T = 1, 8 slots instead of E = 128 experts of mostly empty CTAs). Slots past
//   the number of experts with rows exit at once.
// - The warps of a CTA split K (128-deep steps, kUnroll consecutive steps per warp at a time), all
//   for the CTA's 32 columns: more warps per expert than columns would give at decode sizes, and
//   each 128-byte line of a weight row is read by one warp. Partial sums meet in shared memory and
//   are added in warp order: bit-identical results run to run, no atomics.
// - The products run on the tensor cores as mma.sync m16n8k32 e4m3 x e4m3 -> fp32 (sm_89+): the 16
//   weight rows of a tile are the MMA's M side and up to 8 activation rows its N side. The fp8
//   bytes go into the MMA as loaded; on sm_90a ptxas lowers it to F2FP.F16.E4M3 unpacks (one per
//   2 bytes, exact) and fp32-accumulating HMMA.16816 (seen in the SASS: per 8 KiB of weights a warp
//   issues about 330 instructions, 160 of them unpacks), cheaper than CUDA-core dot products,
//   which need an fp32 conversion per element besides. Rows past 8 loop over chunks of 8 (any
//   count is correct; each chunk streams the weights again, which only happens when few experts
//   take many rows, outside the shapes this kernel is chosen for).
// - Activations are read straight from global memory (through L1/L2): the warps of a CTA read
//   disjoint K ranges, so staging them in shared memory would give no reuse inside a CTA; the CTAs
//   of one expert share them through L2.
//
// Fragment trick: a K-permutation applied to both operands leaves a dot product unchanged. Lane
// (g = lane / 4, t = lane % 4) loads 16 contiguous bytes at K offset 16 t of weight rows g and
// g + 8 and of activation row g; bytes 0-7 feed one MMA and bytes 8-15 a second one, placed in
// the fragment slots the PTX layout gives lane (g, t) (A: rows g / g+8, k = 4t..4t+3 and
// 16+4t..16+4t+3; B: column g, the same k). So 4 lanes x 16 bytes = 64 K per MMA pair, with one
// 16-byte load per lane per row and no shuffles.
//
// Numerics: the MMA multiplies e4m3 pairs exactly and sums in fp32 (with the tensor cores' own
// order and accumulator, as CUTLASS's FP8 kernels do). Per tensor/token/channel:
// out = bf16((acc * a_scale) * b_scale), the CPU reference's order. Block-scaled: each 128-deep K
// step is one 128x128 scale block; its partial sum (from zero) is multiplied by
// a_scale[row, kb] * b_scale[e, nb, kb] and added to the fp32 accumulator (the CPU reference scales
// every element before one long sum: the same value up to fp32 rounding).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace moe_kernels::grouped_gemv_fp8 {

constexpr int kWarpSize = 32;
constexpr int kVecBytes = 16;                      // one 16-byte load per lane and row
constexpr int kTileCols = 16;                      // MMA M: output columns (weight rows) per tile
constexpr int kTileRows = 8;                       // MMA N: activation rows per chunk
constexpr int kTilesPerCta = 2;                    // the activation fragment feeds two tiles
constexpr int kColsPerCta = kTileCols * kTilesPerCta;
constexpr int kLanesPerRow = 4;                    // lanes t = 0..3 of one fragment row
constexpr int kSubStepK = kLanesPerRow * kVecBytes;  // 64: K of one MMA pair
constexpr int kSubSteps = 2;
constexpr int kStepK = kSubStepK * kSubSteps;        // 128: K per warp step = one scale block
constexpr int kUnroll = 2;                         // consecutive steps whose loads are in flight together
constexpr int kScaleBlock = 128;                   // block-scaled: 1x128 activation groups, 128x128 weight blocks
static_assert(kStepK == kScaleBlock, "a warp step must be exactly one K scale block");
static_assert(kScaleBlock % kColsPerCta == 0, "a CTA's columns must lie in one N scale block");

struct Params {
  const uint8_t* a;               // [M, K] e4m3
  const uint8_t* b;               // [E, N, K] e4m3
  const float* a_scale;           // [M] or [1]; [M, K/128] block-scaled
  const float* b_scale;           // [E, N] or [E]; [E, N/128, K/128] block-scaled
  const int64_t* expert_offsets;  // [E + 1]
  __nv_bfloat16* out;             // [M, N]
  int64_t m;
  int num_experts;
  int n;
  int k;                          // a multiple of 16 (of 128 block-scaled)
  bool a_per_token;
  bool b_per_channel;
};

// D(16x8, fp32) += A(16x32 e4m3, row-major) * B(32x8 e4m3, column-major).
__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  // volatile keeps the MMAs after the loads they follow in the source: all of a batch's loads are
  // issued before the first MMA waits on one (else the compiler interleaves them, and a warp has
  // only two or three loads in flight).
  asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // never launched: the op requires compute capability 9.0 (check_gemm_arch)
#endif
}

// Weights are read once per call: keep them out of L1 (the activations and partial sums use it).
// L2::256B: a warp reads 256 contiguous bytes of each of its weight rows per batch (kUnroll x 128),
// so the first load brings the rest into L2 for the loads the compiler schedules later.
// volatile: the load sits under a predicate (K tail, columns past N) and must not be hoisted.
__device__ __forceinline__ uint4 load_streaming(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 load_cached(const uint8_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// Rows of expert e: [begin, end), clamped into [0, M] and non-decreasing as the CUTLASS path does,
// so that offsets that do not come from moe_permute give wrong rows but no access outside a or out.
__device__ __forceinline__ void expert_rows(const Params& p, int e, int64_t* begin, int64_t* end) {
  *begin = min(max(p.expert_offsets[e], int64_t{0}), p.m);
  *end = min(max(p.expert_offsets[e + 1], *begin), p.m);
}

// The slot-th expert (in index order) that has rows, or -1. Every thread of the CTA calls it and
// gets the same answer. One pass of kThreads experts at a time: a ballot per warp, the warps'
// counts through shared memory.
template <int kWarps>
__device__ int find_expert_with_rows(const Params& p, int slot, int* s_expert, int* s_warp_count) {
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (threadIdx.x == 0) *s_expert = -1;
  int seen = 0;  // experts with rows in the passes before this one
  for (int e0 = 0; e0 < p.num_experts && seen <= slot; e0 += kWarps * kWarpSize) {
    const int e = e0 + static_cast<int>(threadIdx.x);
    bool has_rows = false;
    if (e < p.num_experts) {
      int64_t begin, end;
      expert_rows(p, e, &begin, &end);
      has_rows = end > begin;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, has_rows);
    if (lane == 0) s_warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = seen, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = s_warp_count[w];
      before += w < warp ? c : 0;
      total += c;
    }
    if (has_rows && before + __popc(ballot & ((1u << lane) - 1u)) == slot) *s_expert = e;
    seen += total;
    __syncthreads();  // s_warp_count is rewritten by the next pass; *s_expert is visible
  }
  __syncthreads();  // the first pass may not have run (no expert): *s_expert = -1 is visible
  return *s_expert;
}

// Resident warps per SM the register budget is sized for: 16 (128 registers a thread) keeps a
// batch's loads ahead of its MMAs without spills; block scaling holds a second accumulator and
// the scales, so 12 (168 registers).
template <bool kBlockScaled>
constexpr int kMinWarpsPerSm = kBlockScaled ? 12 : 16;

// One CTA: kColsPerCta columns of one expert, every row chunk of that expert.
template <int kWarps, bool kBlockScaled>
__global__ void __launch_bounds__(kWarps* kWarpSize, (kMinWarpsPerSm<kBlockScaled> + kWarps - 1) / kWarps)
    grouped_gemv_fp8_kernel(const Params p) {
  constexpr int kThreads = kWarps * kWarpSize;
  // Each in its own 16-byte granule: the counts are read with 128-bit loads, and a load that also
  // covered s_expert (written by one thread between the same barriers) was a read/write race to
  // racecheck (the value read was discarded; seen on the H200 run of 2026-12-04).
  __shared__ alignas(16) int s_expert;
  __shared__ alignas(16) int s_warp_count[kWarps];
  __shared__ float s_partial[kWarps][kTilesPerCta][4][kWarpSize];

  const int e = find_expert_with_rows<kWarps>(p, static_cast<int>(blockIdx.y), &s_expert, s_warp_count);
  if (e < 0) return;  // uniform: fewer experts with rows than slots
  int64_t row_begin, row_end;
  expert_rows(p, e, &row_begin, &row_end);

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / kLanesPerRow, t = lane % kLanesPerRow;
  const int64_t N = p.n, K = p.k;
  const int n0 = static_cast<int>(blockIdx.x) * kColsPerCta;
  const int steps = static_cast<int>((K + kStepK - 1) / kStepK);

  // This lane's weight rows: tile i, half h holds column n0 + 16 i + 8 h + g. Columns past N (N
  // is a multiple of 8, not always of 32) load zeros and are not stored.
  const uint8_t* w_row[kTilesPerCta][2];
  bool w_ok[kTilesPerCta][2];
#pragma unroll
  for (int i = 0; i < kTilesPerCta; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + kTileCols * i + 8 * h + g;
      w_ok[i][h] = n < N;
      w_row[i][h] = p.b + (static_cast<int64_t>(e) * N + (w_ok[i][h] ? n : 0)) * K;
    }
  // Block-scaled: the CTA's columns lie in one 128-row weight block (n0 is a multiple of 32).
  const int64_t KB = K / kScaleBlock;
  const float* b_block_scale = kBlockScaled ? p.b_scale + (static_cast<int64_t>(e) * (N / kScaleBlock) +
                                                           n0 / kScaleBlock) * KB
                                            : nullptr;

  for (int64_t r0 = row_begin; r0 < row_end; r0 += kTileRows) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), row_end - r0));
    const bool row_ok = g < rows;  // this lane's activation row (the MMA's column g)
    const uint8_t* a_row = p.a + (r0 + (row_ok ? g : 0)) * K;
    float acc[kTilesPerCta][4] = {};

    for (int s0 = warp * kUnroll; s0 < steps; s0 += kWarps * kUnroll) {
      // Every load of kUnroll steps first (16 x 16 bytes of weights per lane in flight), then the MMAs.
      uint4 w[kUnroll][kSubSteps][kTilesPerCta][2];
      uint4 x[kUnroll][kSubSteps];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int j = 0; j < kSubSteps; ++j) {
          // K is a multiple of 16: a lane's 16 bytes are all inside K or all outside.
          const int64_t kk = static_cast<int64_t>(s0 + u) * kStepK + j * kSubStepK + t * kVecBytes;
          const bool k_ok = kk < K;
          x[u][j] = k_ok && row_ok ? load_cached(a_row + kk) : make_uint4(0, 0, 0, 0);
#pragma unroll
          for (int i = 0; i < kTilesPerCta; ++i)
#pragma unroll
            for (int h = 0; h < 2; ++h)
              w[u][j][i][h] = k_ok && w_ok[i][h] ? load_streaming(w_row[i][h] + kk) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float step_sum[kTilesPerCta][4] = {};
        float (&dst)[kTilesPerCta][4] = kBlockScaled ? step_sum : acc;
#pragma unroll
        for (int j = 0; j < kSubSteps; ++j)
#pragma unroll
          for (int i = 0; i < kTilesPerCta; ++i) {
            const uint4& lo = w[u][j][i][0];  // weight row g
            const uint4& hi = w[u][j][i][1];  // weight row g + 8
            mma_e4m3(dst[i], lo.x, hi.x, lo.y, hi.y, x[u][j].x, x[u][j].y);  // bytes 0-7
            mma_e4m3(dst[i], lo.z, hi.z, lo.w, hi.w, x[u][j].z, x[u][j].w);  // bytes 8-15
          }
        if constexpr (kBlockScaled) {
          const int kb = s0 + u;
          if (kb < steps) {
            // Accumulator slot v holds activation row 2t + (v & 1).
            const float sb = b_block_scale[kb];
            float s[2];
#pragma unroll
            for (int q = 0; q < 2; ++q) {
              const int rr = 2 * t + q;
              s[q] = rr < rows ? p.a_scale[(r0 + rr) * KB + kb] * sb : 0.f;
            }
#pragma unroll
            for (int i = 0; i < kTilesPerCta; ++i)
#pragma unroll
              for (int v = 0; v < 4; ++v) acc[i][v] += step_sum[i][v] * s[v & 1];
          }
        }
      }
    }

    // The warps' partial sums over their K ranges, added in warp order by the thread that owns
    // the output (row rr, column cc): columns fastest, so that stores of a row are contiguous.
#pragma unroll
    for (int i = 0; i < kTilesPerCta; ++i)
#pragma unroll
      for (int v = 0; v < 4; ++v) s_partial[warp][i][v][lane] = acc[i][v];
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTileRows * kColsPerCta; idx += kThreads) {
      const int rr = idx / kColsPerCta, cc = idx % kColsPerCta;
      const int64_t n = n0 + cc;
      if (rr >= rows || n >= N) continue;
      // Inverse of the accumulator layout: slot v = (rr & 1) + 2 * (upper 8 columns), lane = g * 4 + rr / 2.
      const int i = cc / kTileCols, c = cc % kTileCols;
      const int v = (rr & 1) + 2 * (c / 8), src_lane = (c % 8) * kLanesPerRow + rr / 2;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += s_partial[w][i][v][src_lane];
      const int64_t row = r0 + rr;
      if constexpr (!kBlockScaled) {
        sum = sum * p.a_scale[p.a_per_token ? row : 0];
        sum = sum * p.b_scale[p.b_per_channel ? static_cast<int64_t>(e) * N + n : e];
      }
      p.out[row * N + n] = __float2bfloat16_rn(sum);
    }
    __syncthreads();  // s_partial is rewritten by the next row chunk
  }
}

}  // namespace moe_kernels::grouped_gemv_fp8
