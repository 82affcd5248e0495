// Launchers of the FP8 grouped GEMM. Plain C++: no torch, no CUTLASS types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace moe_kernels {

// out[rows of expert e] = bf16(a_scale * (b_scale * (a[rows of e] @ b[e]^T))): a_scale per row
// (token) or one value, b_scale per column of expert e or one value per expert. Rows of expert e
// are expert_offsets[e] .. expert_offsets[e+1]. Block-scaled (block_scaled = true): a_scale
// [M, K/128] (per row per 128 columns) and b_scale [E, N/128, K/128] (per 128x128 weight block),
// both row-major, applied to each 128-wide K block's partial sum. a [M,K] e4m3 row-major, b [E,N,K] e4m3 (each
// expert's [N,K] row-major: the K-major "column-major B" of CUTLASS), out [M,N] bf16. Problem
// sizes, pointers and strides are built on the device.
struct GroupedGemmFp8Args {
  const void* a;
  const void* b;
  const float* a_scale;          // [M] if a_per_token, else [1]; [M, K/128] if block_scaled
  const float* b_scale;          // [E, N] if b_per_channel, else [E]; [E, N/128, K/128] if block_scaled
  const int64_t* expert_offsets; // [E+1]
  void* out;
  int64_t m;                     // rows of a and out
  int num_experts;
  int n;
  int k;
  void* scratch;                 // kernel.scratch_bytes(num_experts), 256-byte aligned
  void* workspace;               // kernel.workspace_bytes(sm_count)
  int sm_count;
  bool a_per_token;
  bool b_per_channel;
  bool block_scaled;
};

// GEMM1 with the gated activation and the fp8 quantization of its output in the epilogue
// (grouped_gemm_fp8_gated_sm90.cuh): out [M, n/2] e4m3 = e4m3(act(h[:, 2j] + bias, h[:, 2j+1] + bias)
// / out_scale), h the bf16 output the plain GEMM would write for the same a, b and scales; b's rows
// interleave gate (even) and up (odd). Per tensor/token a_scale and per expert/channel b_scale only
// (block_scaled false).
struct GroupedGemmFp8GatedArgs : GroupedGemmFp8Args {
  const float* out_scale;  // [1]: static per-tensor scale of the output
  const float* bias;       // [E, n] fp32 in b's row order, or nullptr
  int activation;          // a GatedActivation (quant/gated_act.h)
  float swiglu_alpha;
  float swiglu_limit;
};
// One configuration of it (one .cu file each, grouped_gemm_fp8_gated_<name>.cu).
struct GroupedGemmFp8GatedKernel {
  const char* name;  // "gated_<tile>", the name MOE_KERNELS_GEMM_CONFIG may give
  size_t (*scratch_bytes)(int num_experts);
  size_t (*workspace_bytes)(int sm_count);
  const char* (*launch)(const GroupedGemmFp8GatedArgs& args, cudaStream_t stream);
};
// The configuration a call runs (the rule and its measurements: grouped_gemm_fp8_gated.cpp), or
// the one MOE_KERNELS_GEMM_CONFIG names when it names a gated one (nullptr: no such name).
const GroupedGemmFp8GatedKernel* select_grouped_gemm_fp8_gated(const char* forced, int64_t k);

// One configuration (one .cu file each: CUTLASS, or the decode GEMV of grouped_gemv_fp8.cuh): its
// scratch and workspace sizes and its launch, which returns an empty string on success, else what
// went wrong (CUTLASS status or CUDA error).
// A configuration serves either block-scaled calls or the others (per tensor/token/channel).
struct GroupedGemmFp8Kernel {
  const char* name;
  bool block_scaled;
  size_t (*scratch_bytes)(int num_experts);
  size_t (*workspace_bytes)(int sm_count);
  const char* (*launch)(const GroupedGemmFp8Args& args, cudaStream_t stream);
};

// The configuration for this many rows in all (M) and per expert on average (T * topk / E: known
// on the host without reading the routing) and this K. The rule and its measurements:
// grouped_gemm_fp8.cpp.
const GroupedGemmFp8Kernel& select_grouped_gemm_fp8(int64_t rows, int64_t avg_rows_per_expert, int64_t k);
const GroupedGemmFp8Kernel& select_grouped_gemm_fp8_block(int64_t rows, int64_t avg_rows_per_expert, int64_t k);

// Every compiled configuration, and the one of this name (nullptr if none): the tuning override
// MOE_KERNELS_GEMM_CONFIG=<name> and the tests that run each configuration use them.
int grouped_gemm_fp8_config_count();
const GroupedGemmFp8Kernel& grouped_gemm_fp8_config(int i);
const GroupedGemmFp8Kernel* find_grouped_gemm_fp8(const char* name);

}  // namespace moe_kernels
