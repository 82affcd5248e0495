// The decode path of the 4-bit grouped GEMMs (MXFP4 or INT4 weights): a GEMV-style kernel for few
// activation rows per expert, behind the configurations mxfp4_gemv and int4_gemv of
// grouped_gemm_mxfp4 / grouped_gemm_w4a8 (contract: W4GemmArgs in w4_launchers.h). CUDA headers
// only.
//
// Why a second kernel: at decode an expert gets 1..few rows, so the tiled WMMA kernel
// (grouped_gemm_w4.cuh) pads 16-row tiles with zeros and stages every weight tile through shared
// memory and a decode pass before any math: the weight stream, the only thing that matters here
// (4-bit weights are nearly all the bytes), stalls on those round trips. This kernel streams the
// packed weights of the touched experts straight into registers (16-byte loads along K, several in
// flight per lane), decodes them there with the same bit tricks as the tiled kernel (the _split
// forms of decode8_mxfp4 / decode8_int4 in w4_format.h, checked on the host against the scalar
// definitions) and
// multiplies them with the few activation rows in fp32.
//
// Work split:
// - grid.y: expert slots. Only min(E, M) experts can have rows (known on the host, no data read),
//   so slot s is the s-th expert with rows, found on the device from expert_offsets (a warp
//   ballot over the offsets, no host sync, CUDA-graph capturable); a CTA whose slot has no expert
//   exits at once. (A grid over all E experts would launch E - touched empty CTAs per slice: at
//   decode, DeepSeek's 256 experts of which 8 are touched, that is thousands of CTAs that only
//   exit.)
// - grid.x: slices of the expert's output: each warp owns kWarpRows = 4 weight rows; gated, those
//   are the gate and the up rows of 2 output columns (rows j and N/2 + j, or 2j and 2j + 1 when
//   interleaved), so the activation is applied in registers and N/2 columns are written.
// - Lanes split K: lane l takes 16-byte chunks (32 codes, one MXFP4 scale group, a quarter of an
//   INT4 one) l, l + 32, ... of each of its warp's rows, kUnrollK chunks per row in flight.
// - Activation rows: in chunks of kR rows (4, 2 or 1, the most that the expert's remaining rows
//   fill, so that one row does not pay for four), read straight from global memory through L1:
//   every warp of the CTA (and every CTA of the expert on the SM) reads the same few rows, so they
//   are L1 hits, and unlike a shared-memory stage that needs no size bound on K and no barrier.
//   Each activation element loaded is reused for the warp's 4 weight rows. An expert with more
//   rows than kR loops over its rows (the weight slice is then re-read, from L2).
// - Numerics as the CPU reference: acc += a * w in fp32 with a and w exactly their bf16 values
//   (e4m3 activations convert exactly; the decoded weight is bf16(decode(w)) with the scale applied
//   before the bf16 rounding, as w4_format.h defines it), so every product is exact in fp32 and
//   only the order of the sum differs from the reference: per lane along K, then across lanes by
//   a fixed butterfly of shuffles (bit-identical from run to run, no atomics). Then
//   y = acc * a_scale + bias and the activation, in the tiled kernel's operations.
// - Portable: plain loads, shuffles and bf16 bit operations, for every arch the library builds
//   (sm_80+).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemm/w4_format.h"
#include "gemm/w4_launchers.h"

namespace moe_kernels::w4 {
namespace gemv {

constexpr int kWarps = 4;                       // per CTA
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpRows = 4;                    // weight rows per warp (gated: 2 output columns)
constexpr int kCtaRows = kWarps * kWarpRows;    // weight rows per CTA
constexpr int kChunkBytes = 16;                 // one load of packed weights
constexpr int kChunkCodes = 2 * kChunkBytes;    // 32 codes: one MXFP4 scale group
constexpr int kUnrollK = 2;                     // chunks per row in flight per lane
// At least 3 CTAs (12 warps) per SM, i.e. at most 170 registers a thread: 12 warps x 32 lanes x
// kUnrollK * kWarpRows 16-byte loads = 48 KiB in flight per SM, about twice what HBM's latency
// needs (H200: 4.8 TB/s x ~0.7 us / 132 SMs = 25 KiB). 4 CTAs (128 registers) spill in the
// 4-row pass (ptxas, sm_90a).
constexpr int kMinCtasPerSm = 3;

static_assert(kChunkCodes == kMxfp4Group && kInt4Group % kChunkCodes == 0,
              "a chunk must lie inside one scale group");

// 16 bytes of the weight stream: read once, so kept out of L1 (which holds the activation rows).
__device__ __forceinline__ uint4 load_stream_16(const uint8_t* p) {
  uint4 v;
#if defined(__CUDA_ARCH__)
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
#else
  std::memcpy(&v, p, sizeof(v));  // the host emulation (tests/test_mxfp4_w4a8_gemv_emu.cpp)
#endif
  return v;
}

// Two bf16 in one word -> two floats (exact: a bf16 is the top half of an fp32).
__device__ __forceinline__ float bf16_lo(uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t x) { return __uint_as_float(x & 0xffff0000u); }

// Eight activation elements k0..k0+7 of one row as floats (bf16: one 16-byte load; e4m3: 8 bytes,
// converted exactly through fp16, which holds every e4m3 value).
template <typename AT>
__device__ __forceinline__ void load_act8(const AT* row, int k0, float out[8]);

template <>
__device__ __forceinline__ void load_act8<__nv_bfloat16>(const __nv_bfloat16* row, int k0, float out[8]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(row + k0));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = bf16_lo(w[i]);
    out[2 * i + 1] = bf16_hi(w[i]);
  }
}

template <>
__device__ __forceinline__ void load_act8<__nv_fp8_e4m3>(const __nv_fp8_e4m3* row, int k0, float out[8]) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + k0));
  const uint32_t w[2] = {v.x, v.y};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>((w[i / 2] >> (16 * (i % 2))) & 0xffffu);
    const __half2 h = __half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));
    const float2 f = __half22float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

// The expert of grid slot `slot`: the slot-th expert (in index order) with rows, or -1. Every
// warp finds it on its own (the same answer in all of them), so no barrier is needed.
__device__ __forceinline__ int expert_of_slot(const int64_t* offsets, int num_experts, int slot) {
  const int lane = threadIdx.x % 32;
  int seen = 0;
  for (int e0 = 0; e0 < num_experts; e0 += 32) {
    const int e = e0 + lane;
    const bool busy = e < num_experts && offsets[e + 1] > offsets[e];
    const unsigned mask = __ballot_sync(0xffffffffu, busy);
    const int count = __popc(mask);
    if (slot < seen + count) {
      const bool mine = busy && __popc(mask & ((1u << lane) - 1u)) == slot - seen;
      return e0 + __ffs(__ballot_sync(0xffffffffu, mine)) - 1;
    }
    seen += count;
  }
  return -1;
}

// One pass over K for kR activation rows starting at `row0` (rows at and past row_end are
// computed on a clamped row and not written) and this warp's kWarpRows weight rows `wrow`
// (indices into the expert's N rows); the epilogue writes the outputs.
template <WeightFormat kFormat, typename AT, int kR>
__device__ __forceinline__ void gemv_pass(const W4GemmArgs& p, int e, const int (&wrow)[kWarpRows], bool warp_live,
                                          int col0, int64_t row0, int64_t row_end) {
  const int lane = threadIdx.x % 32;
  const int N = p.n;
  const int K = p.k;
  const int chunks = K / kChunkCodes;  // per weight row
  const bool gated = p.activation != Activation::kNone;

  const AT* a_rows[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int64_t row = row0 + r < row_end ? row0 + r : row0;  // clamped: valid memory, not written
    a_rows[r] = static_cast<const AT*>(p.a) + row * K;
  }
  const uint8_t* w_rows[kWarpRows];
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j)
    w_rows[j] = p.w + (static_cast<int64_t>(e) * N + wrow[j]) * (K / 2);
  // Scales of the rows: MXFP4 one byte per chunk, INT4 one float per four chunks.
  const int64_t groups = K / (kFormat == WeightFormat::kMxfp4 ? kMxfp4Group : kInt4Group);
  int64_t sc_rows[kWarpRows];
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j) sc_rows[j] = (static_cast<int64_t>(e) * N + wrow[j]) * groups;

  float acc[kWarpRows][kR];
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j)
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[j][r] = 0.0f;

  if (warp_live) {
    for (int c0 = lane; c0 < chunks; c0 += 32 * kUnrollK) {
      // All loads of this step first (kUnrollK x kWarpRows 16-byte weight loads in flight).
      uint4 wv[kUnrollK][kWarpRows];
      uint32_t sc[kUnrollK][kWarpRows];  // MXFP4: the E8M0 byte; INT4: the fp32 bits
#pragma unroll
      for (int u = 0; u < kUnrollK; ++u) {
        const int c = c0 + 32 * u;
#pragma unroll
        for (int j = 0; j < kWarpRows; ++j) {
          if (c < chunks) {
            wv[u][j] = load_stream_16(w_rows[j] + static_cast<int64_t>(c) * kChunkBytes);
            const int64_t s = sc_rows[j];
            if constexpr (kFormat == WeightFormat::kMxfp4) {
              sc[u][j] = __ldg(static_cast<const uint8_t*>(p.w_scale) + s + c);
            } else {
              sc[u][j] = __float_as_uint(__ldg(static_cast<const float*>(p.w_scale) + s + c / (kInt4Group / kChunkCodes)));
            }
          } else {
            wv[u][j] = make_uint4(0u, 0u, 0u, 0u);
            sc[u][j] = 0u;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnrollK; ++u) {
        const int c = c0 + 32 * u;
        if (c >= chunks) break;
        // The decode constants of each row's scale.
        Mxfp4Factors f[kWarpRows];
        uint32_t s_int4[kWarpRows];
#pragma unroll
        for (int j = 0; j < kWarpRows; ++j) {
          if constexpr (kFormat == WeightFormat::kMxfp4) f[j] = mxfp4_factors(sc[u][j]);
          else s_int4[j] = int4_scale_bf16x2(__uint_as_float(sc[u][j]));
        }
        const uint32_t* words[kWarpRows];
#pragma unroll
        for (int j = 0; j < kWarpRows; ++j) words[j] = reinterpret_cast<const uint32_t*>(&wv[u][j]);
        // Eight codes (one word) at a time: decode the 4 rows' words, then every activation row.
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          float wf[kWarpRows][8];
#pragma unroll
          for (int j = 0; j < kWarpRows; ++j) {
            uint32_t d[4];
            // Split form: d[t] holds elements t and t + 4 (no byte permutes: they are indexed).
            if constexpr (kFormat == WeightFormat::kMxfp4) decode8_mxfp4_split(words[j][v], f[j], d);
            else decode8_int4_split(words[j][v], s_int4[j], d);
#pragma unroll
            for (int t = 0; t < 4; ++t) {
              wf[j][t] = bf16_lo(d[t]);
              wf[j][t + 4] = bf16_hi(d[t]);
            }
          }
          const int k0 = c * kChunkCodes + 8 * v;
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            float af[8];
            load_act8<AT>(a_rows[r], k0, af);
#pragma unroll
            for (int j = 0; j < kWarpRows; ++j)
#pragma unroll
              for (int i = 0; i < 8; ++i) acc[j][r] = fmaf(af[i], wf[j][i], acc[j][r]);  // exact product
          }
        }
      }
    }
  }

  // Butterfly over the lanes: the same fixed order in every run, and every lane ends with the sums.
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j)
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
      for (int d = 16; d >= 1; d /= 2) acc[j][r] += __shfl_xor_sync(0xffffffffu, acc[j][r], d);
  if (!warp_live) return;

  // y = acc * a_scale + bias, in fp32 (as the tiled kernel's epilogue), then the activation.
  const float* bias = p.bias ? p.bias + static_cast<int64_t>(e) * N : nullptr;
  auto finish = [&](float v, int64_t row, int g) {
    if (p.a_scale) v = pmath::mul_rn(v, p.a_scale[p.a_scale_per_row ? row : 0]);
    if (bias) v = pmath::add_rn(v, bias[g]);
    return v;
  };
  auto* out = static_cast<__nv_bfloat16*>(p.out);
  // Lane (col, r) writes one output: kWarpRows x kR (plain) or kWarpRows/2 x kR (gated) lanes.
  constexpr int kCols = kWarpRows;
  const int half_n = N / 2;
#pragma unroll
  for (int j = 0; j < kCols; ++j)
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (lane != j * kR + r) continue;
      const int64_t row = row0 + r;
      if (row >= row_end) continue;
      if (!gated) {
        const int col = col0 + j;
        if (col < N) out[row * N + col] = __float2bfloat16_rn(finish(acc[j][r], row, wrow[j]));
      } else if (j < kWarpRows / 2) {
        const int col = col0 + j;
        if (col < half_n) {
          const float gate = finish(acc[2 * j][r], row, wrow[2 * j]);
          const float up = finish(acc[2 * j + 1][r], row, wrow[2 * j + 1]);
          out[row * half_n + col] =
              __float2bfloat16_rn(gated_activation(p.activation, gate, up, p.swiglu_alpha, p.swiglu_limit));
        }
      }
    }
}

template <WeightFormat kFormat, typename AT>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) grouped_gemv_w4_kernel(const W4GemmArgs p) {
  const int e = expert_of_slot(p.expert_offsets, p.num_experts, static_cast<int>(blockIdx.y));
  if (e < 0) return;  // fewer busy experts than slots
  // Clamped to [0, M]: offsets past a's rows (invalid input) never make the kernel read past a.
  const int64_t end_raw = p.expert_offsets[e + 1];
  const int64_t begin_raw = p.expert_offsets[e];
  const int64_t row_end = end_raw < p.m ? end_raw : p.m;
  const int64_t row_begin = begin_raw < 0 ? 0 : begin_raw < row_end ? begin_raw : row_end;
  const int N = p.n;
  const bool gated = p.activation != Activation::kNone;
  const int half_n = N / 2;
  const int warp = threadIdx.x / 32;

  // This warp's weight rows: plain, rows col0 .. col0 + 3; gated, the (gate, up) rows of output
  // columns col0 and col0 + 1 in the order (gate0, up0, gate1, up1). Rows past the end are clamped
  // to a valid row (their results are not written); a warp with no valid row only joins nothing.
  const int cols_per_warp = gated ? kWarpRows / 2 : kWarpRows;
  const int col0 = (static_cast<int>(blockIdx.x) * kWarps + warp) * cols_per_warp;
  const int out_cols = gated ? half_n : N;
  const bool warp_live = col0 < out_cols;
  int wrow[kWarpRows];
#pragma unroll
  for (int j = 0; j < kWarpRows; ++j) {
    int g;
    if (!gated) {
      g = col0 + j;
    } else {
      const int col = col0 + j / 2;
      const bool up = j % 2 == 1;
      g = p.gate_up_interleaved ? 2 * col + (up ? 1 : 0) : (up ? half_n + col : col);
      if (col >= half_n) g = N;  // past the end: clamped below
    }
    wrow[j] = g < N ? g : 0;
  }

  // kR = the most of 4, 2, 1 that the remaining rows fill (a warp-uniform choice).
  for (int64_t row0 = row_begin; row0 < row_end;) {
    const int64_t left = row_end - row0;
    if (left >= 4) {
      gemv_pass<kFormat, AT, 4>(p, e, wrow, warp_live, col0, row0, row_end);
      row0 += 4;
    } else if (left >= 2) {
      gemv_pass<kFormat, AT, 2>(p, e, wrow, warp_live, col0, row0, row_end);
      row0 += 2;
    } else {
      gemv_pass<kFormat, AT, 1>(p, e, wrow, warp_live, col0, row0, row_end);
      row0 += 1;
    }
  }
}

#if defined(__CUDACC__)  // the launchers; a host test compiles the kernel alone with g++ and
                         // emulates its warps (tests/test_mxfp4_w4a8_gemv_emu.cpp)
// Grid: (slices of kWarps * output columns per warp, min(E, M) expert slots). Returns the launch's
// error.
template <WeightFormat kFormat, typename AT>
cudaError_t launch_typed(const W4GemmArgs& args, cudaStream_t stream) {
  if (args.num_experts > kMaxW4Experts || args.k % kChunkCodes != 0) return cudaErrorInvalidValue;
  const bool gated = args.activation != Activation::kNone;
  const int out_cols = gated ? args.n / 2 : args.n;
  const int cols_per_cta = kWarps * (gated ? kWarpRows / 2 : kWarpRows);
  const int64_t slices = (out_cols + cols_per_cta - 1) / cols_per_cta;
  const int64_t slots = std::min<int64_t>(args.num_experts, args.m);
  if (slots == 0 || slices == 0) return cudaSuccess;
  if (slices > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(slices), static_cast<unsigned>(slots));
  grouped_gemv_w4_kernel<kFormat, AT><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

// The launcher of one configuration: bf16 activations (MXFP4's W4A16) where kBf16A, e4m3 always
// (the activation types the tiled kernel of the same format accepts).
template <WeightFormat kFormat, bool kBf16A>
cudaError_t launch(const W4GemmArgs& args, cudaStream_t stream) {
  if (args.format != kFormat) return cudaErrorInvalidValue;
  if (args.a_dtype == DType::kFloat8E4M3) return launch_typed<kFormat, __nv_fp8_e4m3>(args, stream);
  if constexpr (kBf16A) {
    if (args.a_dtype == DType::kBFloat16) return launch_typed<kFormat, __nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}
#endif  // __CUDACC__

}  // namespace gemv
}  // namespace moe_kernels::w4

// One GEMV configuration per .cu file: defines <name>_kernel() returning its W4GemmKernel
// (block_m 1: it is built for about one row per expert).
#define MOE_KERNELS_W4_GEMV_DEFINE(name, format, bf16_a)                                   \
  namespace moe_kernels::w4 {                                                              \
  const W4GemmKernel& name##_kernel() {                                                    \
    static const W4GemmKernel k{#name, format, 1, &gemv::launch<format, bf16_a>};           \
    return k;                                                                              \
  }                                                                                        \
  }
