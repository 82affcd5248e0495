// The grouped GEMM with 4-bit weights (MXFP4 or INT4) behind grouped_gemm_mxfp4,
// grouped_gemm_w4a8 and the cutlass_moe_mxfp4 / cutlass_moe_w4a8 layers. CUDA headers only.
//
// Why not CUTLASS: CUTLASS 4.2's sm90 mixed-input collective requires the scale group to be a
// multiple of its K tile (chunk_size % size<2>(TileShape) == 0 in
// sm90_mma_array_tma_gmma_rs_warpspecialized_mixed_input.hpp), whose bf16 K tile is at least 64,
// so MXFP4's 32-wide E8M0 groups cannot go through it without re-quantizing the weights. This one
// template serves both formats through a weight decoder, runs on every GPU the library targets
// (sm_80+: cp.async and bf16 tensor cores through the WMMA API) and fuses GEMM1's gated
// activation and both biases into its epilogue.
//
// Structure: persistent CTAs (as many as fit on the GPU, at most the work the routing can need
// under a static bound, so the launch never depends on data: no host sync, CUDA-graph capturable)
// walk the (n tile, m tile) items; each CTA derives the experts' m tiles from expert_offsets on the
// device (a prefix sum in shared memory) and finds an item's expert by binary search. Per K tile of
// 128: 16-byte cp.async copies of the packed weight rows, their scales and the activation rows
// into a multi-stage shared-memory ring; the weights decoded to bf16 in shared memory 8 codes at a
// time with bit operations and bf16x2 multiplies (e4m3 activations converted, exactly, to bf16);
// WMMA bf16 16x16x16 with fp32 accumulators. Weights dominate the bytes at decode, so each weight
// tile is streamed once per expert m tile and the decode costs a few instructions per weight.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>

#include "gemm/w4_format.h"
#include "gemm/w4_launchers.h"

namespace moe_kernels::w4 {

// kBlockM activation rows x kRows weight rows per CTA (gated: kRows/2 gate rows and the kRows/2
// matching up rows, i.e. kRows/2 output columns); K in tiles of 128 (one INT4 scale group, four
// MXFP4 groups); kStages copies in flight.
template <int kBlockM_, int kRows_, int kWarpsM_, int kStages_>
struct W4TileConfig {
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kRows = kRows_;
  static constexpr int kBlockK = 128;
  static constexpr int kStages = kStages_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpsM = kWarpsM_;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kFragsM = kBlockM / 16 / kWarpsM;
  static constexpr int kFragsN = kRows / 16 / kWarpsN;
  static_assert(kFragsM >= 1 && kFragsN >= 1 && kFragsM * 16 * kWarpsM == kBlockM &&
                    kFragsN * 16 * kWarpsN == kRows,
                "warps must tile the CTA's output in 16x16 fragments");
};

namespace detail {

constexpr int kChunk = 16;                       // bytes per cp.async and per shared-memory vector
constexpr int kPadBf16 = 8;                      // one chunk of padding per bf16 row: WMMA loads
                                                 // of consecutive rows fall in different banks
constexpr int kWeightBytesPerRow = 128 / 2;      // one K tile of packed nibbles
constexpr int kScaleSlotBytes = 8;               // per weight row and stage: see load_scales

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? kChunk : 0;  // 0: the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

template <typename AT> struct ActTraits;
template <> struct ActTraits<__nv_bfloat16> {
  static constexpr DType kDType = DType::kBFloat16;
  static constexpr int kRawPitch = (128 + kPadBf16) * 2;  // used by WMMA as it lands
};
template <> struct ActTraits<__nv_fp8_e4m3> {
  static constexpr DType kDType = DType::kFloat8E4M3;
  static constexpr int kRawPitch = 128 + kChunk;          // converted to bf16 before use
};

// Byte offsets of one CTA's dynamic shared memory.
template <class Cfg, typename AT>
struct SmemLayout {
  static constexpr bool kConvertA = sizeof(AT) == 1;
  static constexpr int kBf16Pitch = (Cfg::kBlockK + kPadBf16) * 2;  // bytes per bf16 row
  static constexpr int kARaw = Cfg::kBlockM * ActTraits<AT>::kRawPitch;
  static constexpr int kWRaw = Cfg::kRows * kWeightBytesPerRow;
  static constexpr int kScales = Cfg::kRows * kScaleSlotBytes;
  static constexpr int kStage = kARaw + kWRaw + kScales;
  static constexpr int kWDecoded = Cfg::kStages * kStage;
  static constexpr int kADecoded = kWDecoded + Cfg::kRows * kBf16Pitch;
  static constexpr int kBytes = kADecoded + (kConvertA ? Cfg::kBlockM * kBf16Pitch : 0);
  // The epilogue reuses the ring for the fp32 accumulators (after the last MMA).
  static constexpr int kCPitch = Cfg::kRows + 4;  // floats
  static_assert(Cfg::kBlockM * kCPitch * 4 <= kBytes, "accumulators must fit the ring");
  // WMMA loads and stores need 32-byte aligned fragment pointers.
  static_assert(kStage % 32 == 0 && kWDecoded % 32 == 0 && kADecoded % 32 == 0 && (16 * kBf16Pitch) % 32 == 0,
                "shared-memory buffers must stay 32-byte aligned");
  // Opt-in shared memory of sm_86, sm_89 and sm_120 (the smallest of the targets): 99 KiB.
  static_assert(kBytes + (kMaxW4Experts + 1) * 4 <= 99 * 1024,
                "tile configuration exceeds 99 KiB of shared memory (with the static m-tile prefix sums)");
};

}  // namespace detail

// One work item: rows [row0, min(row0 + BM, row_end)) of expert e times its weight tile n_tile,
// through the whole K, into out. Ends with the accumulators in (and read from) shared memory.
template <WeightFormat kFormat, typename AT, class Cfg>
__device__ __forceinline__ void grouped_gemm_w4_tile(const W4GemmArgs& p, unsigned char* smem, int e, int64_t row0,
                                                     int64_t row_end, int n_tile) {
  using namespace nvcuda;
  using L = detail::SmemLayout<Cfg, AT>;
  constexpr int kBM = Cfg::kBlockM;
  constexpr int kRows = Cfg::kRows;
  constexpr int kBK = Cfg::kBlockK;
  constexpr int kThreads = Cfg::kThreads;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int N = p.n;
  const int K = p.k;
  const bool gated = p.activation != Activation::kNone;
  const int half_n = N / 2;

  // The weight row of local row r of this CTA, or -1 past the end. Gated: rows [0, kRows/2) are
  // the gate rows of output columns n_tile * kRows/2 + r, the rest the matching up rows.
  auto weight_row = [&](int r) -> int {
    if (!gated) {
      const int g = n_tile * kRows + r;
      return g < N ? g : -1;
    }
    constexpr int kHalf = kRows / 2;
    const int j = n_tile * kHalf + (r % kHalf);
    if (j >= half_n) return -1;
    const bool up = r >= kHalf;
    return p.gate_up_interleaved ? 2 * j + (up ? 1 : 0) : (up ? half_n + j : j);
  };

  const auto* a_bytes = static_cast<const unsigned char*>(p.a);
  const uint8_t* w_expert = p.w + static_cast<int64_t>(e) * N * (K / 2);
  const int num_k_tiles = (K + kBK - 1) / kBK;
  constexpr int kGroup = kFormat == WeightFormat::kMxfp4 ? kMxfp4Group : kInt4Group;
  const int groups_per_row = K / kGroup;

  auto stage_ptr = [&](int stage) { return smem + stage * L::kStage; };

  // What each thread copies and decodes is the same in every K tile: its rows' addresses are
  // computed once. Weight chunk j of a thread is row tid/4 + j*kThreads/4, 32 K elements at
  // chunk tid%4 of the tile; activation chunk j is row tid/kAChunksPerRow + j*kThreads/kAChunksPerRow.
  constexpr int kElemsPerChunk = detail::kChunk / static_cast<int>(sizeof(AT));
  constexpr int kAChunksPerRow = kBK / kElemsPerChunk;
  constexpr int kAChunksPerThread = kBM * kAChunksPerRow / kThreads;
  constexpr int kWChunksPerThread = kRows * 4 / kThreads;
  static_assert(kAChunksPerThread >= 1 && kBM * kAChunksPerRow % kThreads == 0 && kThreads % kAChunksPerRow == 0,
                "activation chunks must divide evenly among the threads");
  static_assert(kWChunksPerThread >= 1 && kRows * 4 % kThreads == 0 && kRows <= kThreads,
                "weight chunks must divide evenly among the threads, one scale row per thread at most");
  const int a_c = tid % kAChunksPerRow;
  const unsigned char* a_src[kAChunksPerThread];  // row start, nullptr past the expert's rows
#pragma unroll
  for (int j = 0; j < kAChunksPerThread; ++j) {
    const int64_t row = row0 + tid / kAChunksPerRow + j * (kThreads / kAChunksPerRow);
    a_src[j] = row < row_end ? a_bytes + row * K * static_cast<int64_t>(sizeof(AT)) : nullptr;
  }
  const int w_c = tid % 4;
  const uint8_t* w_src[kWChunksPerThread];  // row start, nullptr past N
  int sc_shift[kWChunksPerThread];          // MXFP4: the row's first scale byte within its aligned word
#pragma unroll
  for (int j = 0; j < kWChunksPerThread; ++j) {
    const int g = weight_row(tid / 4 + j * (kThreads / 4));
    w_src[j] = g >= 0 ? w_expert + static_cast<int64_t>(g) * (K / 2) : nullptr;
    sc_shift[j] = g >= 0 ? static_cast<int>(((static_cast<int64_t>(e) * N + g) * groups_per_row) % 4) : 0;
  }
  // The scales of row tid (when tid < kRows): index of its first group, or -1 past N.
  int64_t sc_first = -1;
  if (tid < kRows) {
    const int g = weight_row(tid);
    if (g >= 0) sc_first = (static_cast<int64_t>(e) * N + g) * groups_per_row;
  }

  auto load_stage = [&](int stage, int kt) {
    unsigned char* s_a = stage_ptr(stage);
    unsigned char* s_w = s_a + L::kARaw;
    unsigned char* s_sc = s_w + L::kWRaw;
    const int k0 = kt * kBK;
    // Activation rows: K is a multiple of 32, so a chunk is either wholly inside K or past it.
    const int ak = k0 + a_c * kElemsPerChunk;
#pragma unroll
    for (int j = 0; j < kAChunksPerThread; ++j) {
      const int r = tid / kAChunksPerRow + j * (kThreads / kAChunksPerRow);
      const bool ok = a_src[j] != nullptr && ak < K;
      const void* src = ok ? a_src[j] + ak * static_cast<int64_t>(sizeof(AT)) : p.a;
      detail::cp_async_16(s_a + r * detail::ActTraits<AT>::kRawPitch + a_c * detail::kChunk, src, ok);
    }
    // Packed weights: 4 chunks of 32 K elements per row.
    const int wk = k0 + w_c * 32;
#pragma unroll
    for (int j = 0; j < kWChunksPerThread; ++j) {
      const int r = tid / 4 + j * (kThreads / 4);
      const bool ok = w_src[j] != nullptr && wk < K;
      const void* src = ok ? w_src[j] + wk / 2 : p.w;
      detail::cp_async_16(s_w + r * detail::kWeightBytesPerRow + w_c * detail::kChunk, src, ok);
    }
    // Scales, one 8-byte slot per row. INT4: the tile's one fp32 scale. MXFP4: the tile's (up to)
    // four scale bytes start at any byte (K/32 need not be a multiple of 4), so the slot holds
    // the aligned word containing the first and, if they straddle, the next one; only words that
    // contain a byte of this row's tile are read, so nothing past the tensor is touched.
    if (sc_first >= 0) {
      const int64_t first = sc_first + k0 / kGroup;
      unsigned char* slot = s_sc + tid * detail::kScaleSlotBytes;
      if constexpr (kFormat == WeightFormat::kInt4) {
        detail::cp_async_4(slot, static_cast<const float*>(p.w_scale) + first);
      } else {
        const auto* sc = static_cast<const uint8_t*>(p.w_scale);
        const int count = min(kBK, K - k0) / kMxfp4Group;
        const int64_t w0 = first / 4;
        const int64_t w1 = (first + count - 1) / 4;
        detail::cp_async_4(slot, sc + 4 * w0);
        if (w1 != w0) detail::cp_async_4(slot + 4, sc + 4 * w1);
      }
    }
  };

  unsigned char* s_wdec = smem + L::kWDecoded;
  unsigned char* s_adec = smem + L::kADecoded;

  // Raw stage -> bf16 weights (and bf16 activations for e4m3 input) in shared memory, each thread
  // the chunks it copied. Codes of rows or K chunks outside the problem become zeros (their scale
  // slots hold stale bytes).
  auto decode_stage = [&](int stage, int kt) {
    const unsigned char* s_a = stage_ptr(stage);
    const unsigned char* s_w = s_a + L::kARaw;
    const unsigned char* s_sc = s_w + L::kWRaw;
    const int k0 = kt * kBK;
    const bool k_ok = k0 + w_c * 32 < K;
#pragma unroll
    for (int j = 0; j < kWChunksPerThread; ++j) {
      const int r = tid / 4 + j * (kThreads / 4);
      const int c = w_c;
      const bool ok = w_src[j] != nullptr && k_ok;
      const uint4 raw = *reinterpret_cast<const uint4*>(s_w + r * detail::kWeightBytesPerRow + c * detail::kChunk);
      uint4* dst = reinterpret_cast<uint4*>(s_wdec + r * L::kBf16Pitch + c * 64);
      if (!ok) {
#pragma unroll
        for (int v = 0; v < 4; ++v) dst[v] = make_uint4(0u, 0u, 0u, 0u);
        continue;
      }
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
      uint32_t out[4];
      if constexpr (kFormat == WeightFormat::kInt4) {
        const uint32_t scale = int4_scale_bf16x2(*reinterpret_cast<const float*>(s_sc + r * detail::kScaleSlotBytes));
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          decode8_int4(words[v], scale, out);
          dst[v] = make_uint4(out[0], out[1], out[2], out[3]);
        }
      } else {
        // first % 4 = (row base + k0/32) % 4 with k0/32 a multiple of 4: the row's shift.
        const Mxfp4Factors f = mxfp4_factors(s_sc[r * detail::kScaleSlotBytes + sc_shift[j] + c]);
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          decode8_mxfp4(words[v], f, out);
          dst[v] = make_uint4(out[0], out[1], out[2], out[3]);
        }
      }
    }
    if constexpr (L::kConvertA) {
      // e4m3 -> bf16 is exact (3 mantissa bits, exponents 2^-9..2^8 inside bf16's range).
      for (int i = tid; i < kBM * (kBK / 16); i += kThreads) {
        const int r = i / (kBK / 16);
        const int c = i % (kBK / 16);
        const uint4 raw = *reinterpret_cast<const uint4*>(s_a + r * detail::ActTraits<AT>::kRawPitch + c * 16);
        const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
        __nv_bfloat162 out[8];
#pragma unroll
        for (int b = 0; b < 8; ++b) {
          __nv_fp8_e4m3 x0, x1;
          x0.__x = static_cast<__nv_fp8_storage_t>((words[b / 2] >> (16 * (b % 2))) & 0xffu);
          x1.__x = static_cast<__nv_fp8_storage_t>((words[b / 2] >> (16 * (b % 2) + 8)) & 0xffu);
          out[b] = __floats2bfloat162_rn(static_cast<float>(x0), static_cast<float>(x1));
        }
        uint4* dst = reinterpret_cast<uint4*>(s_adec + r * L::kBf16Pitch + c * 32);
        dst[0] = reinterpret_cast<const uint4*>(out)[0];
        dst[1] = reinterpret_cast<const uint4*>(out)[1];
      }
    }
  };

  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  // W is [n][k] row-major in shared memory, i.e. B = W^T is K x N column-major.
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  FragC acc[Cfg::kFragsM][Cfg::kFragsN];
#pragma unroll
  for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kFragsN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  const int warp_m = warp / Cfg::kWarpsN;
  const int warp_n = warp % Cfg::kWarpsN;
  constexpr int kALd = L::kConvertA ? L::kBf16Pitch / 2 : detail::ActTraits<AT>::kRawPitch / 2;  // elements
  constexpr int kWLd = L::kBf16Pitch / 2;

#pragma unroll
  for (int s = 0; s < Cfg::kStages - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, s);
    detail::cp_async_commit();
  }
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    detail::cp_async_wait<Cfg::kStages - 2>();
    // Tile kt is visible to every thread, and every warp is done with tile kt-1 (its stage and
    // the decoded buffers may be overwritten).
    __syncthreads();
    const int next = kt + Cfg::kStages - 1;
    if (next < num_k_tiles) load_stage(next % Cfg::kStages, next);
    detail::cp_async_commit();
    const int stage = kt % Cfg::kStages;
    decode_stage(stage, kt);
    __syncthreads();
    const __nv_bfloat16* s_amma = reinterpret_cast<const __nv_bfloat16*>(L::kConvertA ? s_adec : stage_ptr(stage));
    const __nv_bfloat16* s_wmma = reinterpret_cast<const __nv_bfloat16*>(s_wdec);
    const int k_len = min(kBK, K - kt * kBK);  // a multiple of 32: the zero tail is skipped
    for (int kk = 0; kk < k_len; kk += 16) {
      FragA fa[Cfg::kFragsM];
      FragB fb[Cfg::kFragsN];
#pragma unroll
      for (int i = 0; i < Cfg::kFragsM; ++i)
        wmma::load_matrix_sync(fa[i], s_amma + ((warp_m * Cfg::kFragsM + i) * 16) * kALd + kk, kALd);
#pragma unroll
      for (int j = 0; j < Cfg::kFragsN; ++j)
        wmma::load_matrix_sync(fb[j], s_wmma + ((warp_n * Cfg::kFragsN + j) * 16) * kWLd + kk, kWLd);
#pragma unroll
      for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::kFragsN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  detail::cp_async_wait<0>();
  __syncthreads();

  // Epilogue: accumulators through shared memory, so that a thread holds the gate and the up value
  // of one output element whatever the fragment layout.
  float* s_c = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < Cfg::kFragsM; ++i)
#pragma unroll
    for (int j = 0; j < Cfg::kFragsN; ++j)
      wmma::store_matrix_sync(s_c + ((warp_m * Cfg::kFragsM + i) * 16) * L::kCPitch + (warp_n * Cfg::kFragsN + j) * 16,
                              acc[i][j], L::kCPitch, wmma::mem_row_major);
  __syncthreads();

  const float* bias = p.bias ? p.bias + static_cast<int64_t>(e) * N : nullptr;
  auto* out = static_cast<__nv_bfloat16*>(p.out);
  // y = acc * a_scale + bias, in fp32, before the activation.
  auto finish = [&](float acc_v, int64_t row, int g) {
    float y = acc_v;
    if (p.a_scale) y = pmath::mul_rn(y, p.a_scale[p.a_scale_per_row ? row : 0]);
    if (bias) y = pmath::add_rn(y, bias[g]);
    return y;
  };
  if (gated) {
    constexpr int kHalf = kRows / 2;
    for (int i = tid; i < kBM * kHalf; i += kThreads) {
      const int r = i / kHalf;
      const int c = i % kHalf;
      const int64_t row = row0 + r;
      const int col = n_tile * kHalf + c;
      if (row >= row_end || col >= half_n) continue;
      const float gate = finish(s_c[r * L::kCPitch + c], row, weight_row(c));
      const float up = finish(s_c[r * L::kCPitch + kHalf + c], row, weight_row(kHalf + c));
      out[row * half_n + col] =
          __float2bfloat16_rn(gated_activation(p.activation, gate, up, p.swiglu_alpha, p.swiglu_limit));
    }
  } else {
    for (int i = tid; i < kBM * kRows; i += kThreads) {
      const int r = i / kRows;
      const int c = i % kRows;
      const int64_t row = row0 + r;
      const int g = weight_row(c);
      if (row >= row_end || g < 0) continue;
      out[row * N + g] = __float2bfloat16_rn(finish(s_c[r * L::kCPitch + c], row, g));
    }
  }
}

template <WeightFormat kFormat, typename AT, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads)
    grouped_gemm_w4_kernel(const W4GemmArgs p) {
  constexpr int kBM = Cfg::kBlockM;
  constexpr int kRows = Cfg::kRows;
  extern __shared__ __align__(128) unsigned char smem[];
  // Prefix sums of the m tiles per expert: expert e owns tiles [s_tiles[e], s_tiles[e+1]).
  __shared__ int s_tiles[kMaxW4Experts + 1];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int E = p.num_experts;

  // Warp 0 scans the offsets 32 experts at a time (a warp prefix sum of ceil(rows_e / BM)).
  if (warp == 0) {
    int base = 0;
    if (lane == 0) s_tiles[0] = 0;
    for (int e0 = 0; e0 < E; e0 += 32) {
      const int e = e0 + lane;
      const int64_t rows = e < E ? p.expert_offsets[e + 1] - p.expert_offsets[e] : 0;
      const int tiles = static_cast<int>((rows + kBM - 1) / kBM);
      int incl = tiles;
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int t = __shfl_up_sync(0xffffffffu, incl, d);
        if (lane >= d) incl += t;
      }
      if (e < E) s_tiles[e + 1] = base + incl;
      base += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();

  const int N = p.n;
  const bool gated = p.activation != Activation::kNone;
  const int half_n = N / 2;
  const int n_tiles = gated ? (half_n + kRows / 2 - 1) / (kRows / 2) : (N + kRows - 1) / kRows;
  const int m_tiles = s_tiles[E];
  const int64_t work = static_cast<int64_t>(m_tiles) * n_tiles;
  // Persistent CTAs over (n tile, m tile) items, n-major: CTAs running together share a weight
  // tile across an expert's m tiles (L2 reuse at prefill); at decode every item is one expert's
  // weight tile, read once. The grid is at most what fits on the GPU at once, so no CTA waits
  // for a slot only to find it empty.
  for (int64_t item = blockIdx.x; item < work; item += gridDim.x) {
    const int n_tile = static_cast<int>(item / m_tiles);
    const int m_tile = static_cast<int>(item % m_tiles);
    // The expert owning m_tile: the last e with s_tiles[e] <= m_tile (binary search, the same in
    // every thread; empty experts repeat a prefix value and are skipped).
    int lo = 0, hi = E;  // s_tiles[lo] <= m_tile < s_tiles[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (s_tiles[mid] <= m_tile) lo = mid; else hi = mid;
    }
    const int64_t row0 = p.expert_offsets[lo] + static_cast<int64_t>(m_tile - s_tiles[lo]) * kBM;
    grouped_gemm_w4_tile<kFormat, AT, Cfg>(p, smem, lo, row0, p.expert_offsets[lo + 1], n_tile);
    __syncthreads();  // the next item's copies overwrite the accumulators' shared memory
  }
}


// CTAs of this kernel that fit on one SM of the current device, times its SMs: the persistent
// grid. Queried once per device (host calls only, so also fine while a CUDA graph is captured).
template <WeightFormat kFormat, typename AT, class Cfg>
int resident_ctas() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0: not yet asked; one cache per kernel instantiation
  auto kernel = grouped_gemm_w4_kernel<kFormat, AT, Cfg>;
  constexpr int threads = Cfg::kThreads;
  constexpr int smem_bytes = detail::SmemLayout<Cfg, AT>::kBytes;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return 0;
  int n = __atomic_load_n(&cache[device], __ATOMIC_RELAXED);
  if (n == 0) {
    int sms = 0, per_sm = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 0;
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes) != cudaSuccess) return 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes) != cudaSuccess) return 0;
    n = sms * (per_sm > 0 ? per_sm : 1);
    __atomic_store_n(&cache[device], n, __ATOMIC_RELAXED);
  }
  return n;
}

// Grid: persistent CTAs, at most the items the routing can need (ceil(M / BM) + E m tiles, a
// static bound) times the n tiles, at most what fits on the GPU. Returns the launch's error.
template <WeightFormat kFormat, typename AT, class Cfg>
cudaError_t launch_grouped_gemm_w4_typed(const W4GemmArgs& args, cudaStream_t stream) {
  using L = detail::SmemLayout<Cfg, AT>;
  if (args.num_experts > kMaxW4Experts) return cudaErrorInvalidValue;
  const int64_t m_tiles_bound = (args.m + Cfg::kBlockM - 1) / Cfg::kBlockM + args.num_experts;
  const bool gated = args.activation != Activation::kNone;
  const int cols_per_tile = gated ? Cfg::kRows / 2 : Cfg::kRows;
  const int out_cols = gated ? args.n / 2 : args.n;
  const int64_t n_tiles = (out_cols + cols_per_tile - 1) / cols_per_tile;
  if (args.m == 0 || n_tiles == 0) return cudaSuccess;
  auto kernel = grouped_gemm_w4_kernel<kFormat, AT, Cfg>;
  // Above 48 KiB, dynamic shared memory must be opted into (per function and device, once).
  const int resident = resident_ctas<kFormat, AT, Cfg>();
  if (resident == 0) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorInvalidConfiguration;
  }
  const int64_t grid = std::min<int64_t>(m_tiles_bound * n_tiles, resident);
  kernel<<<static_cast<unsigned>(grid), Cfg::kThreads, L::kBytes, stream>>>(args);
  return cudaGetLastError();
}

// The launcher of one configuration: bf16 activations (MXFP4's W4A16) where kBf16A, e4m3 always.
template <WeightFormat kFormat, class Cfg, bool kBf16A>
cudaError_t launch_grouped_gemm_w4(const W4GemmArgs& args, cudaStream_t stream) {
  if (args.format != kFormat) return cudaErrorInvalidValue;
  if (args.a_dtype == DType::kFloat8E4M3) return launch_grouped_gemm_w4_typed<kFormat, __nv_fp8_e4m3, Cfg>(args, stream);
  if constexpr (kBf16A) {
    if (args.a_dtype == DType::kBFloat16) return launch_grouped_gemm_w4_typed<kFormat, __nv_bfloat16, Cfg>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moe_kernels::w4

// One configuration per .cu file: defines <name>_kernel() returning its W4GemmKernel.
#define MOE_KERNELS_W4_GEMM_DEFINE(name, format, bf16_a, block_m, rows, warps_m, stages)                  \
  namespace moe_kernels::w4 {                                                                              \
  const W4GemmKernel& name##_kernel() {                                                                    \
    using Cfg = W4TileConfig<block_m, rows, warps_m, stages>;                                              \
    static const W4GemmKernel k{#name, format, block_m, &launch_grouped_gemm_w4<format, Cfg, bf16_a>};      \
    return k;                                                                                              \
  }                                                                                                        \
  }
