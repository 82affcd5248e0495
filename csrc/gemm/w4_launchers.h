// Launchers and CPU reference of the 4-bit grouped GEMMs (grouped_gemm_mxfp4, grouped_gemm_w4a8).
// Plain C++: no torch types, so that the .cu files compile without torch headers.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "gemm/w4_format.h"

namespace moe_kernels::w4 {

// Experts a launch may have (the kernel keeps their m-tile prefix sums in shared memory); as
// moe_permute's kMaxSortExperts.
constexpr int kMaxW4Experts = 1024;

// For the rows r of expert e (expert_offsets[e] <= r < expert_offsets[e+1]):
//   acc[r, n] = sum_k bf16(a[r, k]) * bf16(decode(w[e, n, k]))  (fp32 accumulation)
//   y[r, n]   = acc[r, n] * a_scale[r or 0] + bias[e, n]       (a_scale, bias when given)
// activation kNone:  out[r, n] = bf16(y[r, n]), out [M, N];
// gated activations: out[r, j] = bf16(act(y[r, gate_row(j)], y[r, up_row(j)])), out [M, N/2],
//   gate_row(j) = j and up_row(j) = N/2 + j, or 2j and 2j + 1 with gate_up_interleaved.
// Rows at and past expert_offsets[E] are not written. e4m3 activations are exact in bf16; their
// per-row (or per-tensor) scale multiplies the fp32 accumulator.
struct W4GemmArgs {
  WeightFormat format;
  const void* a;                   // [M, K] bfloat16 or float8_e4m3fn, row-major
  DType a_dtype;                   // kBFloat16 or kFloat8E4M3
  const float* a_scale;            // nullptr, [1] (a_scale_per_row false) or [M]
  bool a_scale_per_row;
  const uint8_t* w;                // [E, N, K/2]
  const void* w_scale;             // MXFP4: uint8 [E, N, K/32]; INT4: float [E, N, K/128]
  const float* bias;               // [E, N] or nullptr
  const int64_t* expert_offsets;   // [E+1]
  void* out;                       // bfloat16 [M, N] or [M, N/2] (gated)
  int64_t m;                       // rows of a and out
  int num_experts;
  int n;                           // rows of each expert's weight (2I for GEMM1)
  int k;                           // multiple of 32 (MXFP4) or 128 (INT4)
  Activation activation;
  bool gate_up_interleaved;
  float swiglu_alpha;
  float swiglu_limit;
};

// One kernel configuration (one .cu file each): a name for tests and benchmarks, the rows per
// expert it is chosen for, the launch.
struct W4GemmKernel {
  const char* name;
  WeightFormat format;
  int block_m;
  cudaError_t (*launch)(const W4GemmArgs& args, cudaStream_t stream);
};

const W4GemmKernel& mxfp4_bm16_kernel();
const W4GemmKernel& mxfp4_bm64_kernel();
const W4GemmKernel& int4_bm16_kernel();
const W4GemmKernel& int4_bm64_kernel();
// The decode GEMVs (grouped_gemv_w4.cuh): weights streamed into registers, few rows per expert.
const W4GemmKernel& mxfp4_gemv_kernel();
const W4GemmKernel& int4_gemv_kernel();

// select_w4_gemm takes the GEMV while M / E (rounded down) is at most this. Measured on an H200
// (2026-12-05, bench --ops layer_mxfp4,layer_w4a8,gemm_mxfp4 against MOE_KERNELS_W4_GEMM_CONFIG=
// mxfp4_bm16 / int4_bm16): at M / E <= 0.5 the GEMV wins everywhere (GEMMs 1.05-2.35x, layers
// 1.03-2.03x); at M / E = 2 it loses with bf16 activations (gpt-oss-120b and DeepSeek-V3 T = 64,
// layers 0.86x; gpt-oss-20b T = 16, 0.91x) and ties with fp8 ones (0.92-1.11x per GEMM), so 1.
constexpr int64_t kGemvMaxAvgRowsPerExpert = 1;

// The configuration for this many rows per expert on average (M / E: known on the host without
// reading the routing): the GEMV at decode (at most kGemvMaxAvgRowsPerExpert), 16-row tiles while
// experts get few rows (each weight tile is read once per expert), 64-row tiles above.
const W4GemmKernel& select_w4_gemm(WeightFormat format, int64_t avg_rows_per_expert);

// The configuration of this name (mxfp4_gemv, mxfp4_bm16, mxfp4_bm64, int4_gemv, int4_bm16,
// int4_bm64), or nullptr.
const W4GemmKernel* find_w4_gemm(const char* name);

// select_w4_gemm, unless the environment variable MOE_KERNELS_W4_GEMM_CONFIG names a configuration
// (a tuning and testing override, read at each call on the host): one of this format is used, one
// of the other format leaves the choice to the table; a name that is no configuration is returned
// in *unknown (the glue raises).
const W4GemmKernel& pick_w4_gemm(WeightFormat format, int64_t avg_rows_per_expert, const char** unknown);

// The CPU reference: the specification above as plain loops.
void grouped_gemm_w4_reference(const W4GemmArgs& args);

}  // namespace moe_kernels::w4
