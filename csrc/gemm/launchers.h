// Launchers of the FP8 grouped GEMM. Plain C++: no torch, no CUTLASS types.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace moe_kernels {

// out[rows of expert e] = alpha_e * (a[rows of e] @ b[e]^T), alpha_e = a_scale[0] * b_scale[e];
// rows of expert e are expert_offsets[e] .. expert_offsets[e+1]. a [M,K] e4m3 row-major,
// b [E,N,K] e4m3 (each expert's [N,K] row-major: the K-major "column-major B" of CUTLASS),
// out [M,N] bf16. Problem sizes, pointers, strides and alphas are built on the device.
struct GroupedGemmFp8Args {
  const void* a;
  const void* b;
  const float* a_scale;          // [1]
  const float* b_scale;          // [E]
  const int64_t* expert_offsets; // [E+1]
  void* out;
  int num_experts;
  int n;
  int k;
  void* scratch;                 // kernel.scratch_bytes(num_experts), 256-byte aligned
  void* workspace;               // kernel.workspace_bytes(sm_count)
  int sm_count;
};

// One CUTLASS configuration (one .cu file each): its scratch and workspace sizes and its launch,
// which returns an empty string on success, else what went wrong (CUTLASS status or CUDA error).
struct GroupedGemmFp8Kernel {
  const char* name;
  size_t (*scratch_bytes)(int num_experts);
  size_t (*workspace_bytes)(int sm_count);
  const char* (*launch)(const GroupedGemmFp8Args& args, cudaStream_t stream);
};

// The configuration for this many rows per expert on average (T * topk / E: known on the host
// without reading the routing). Table in grouped_gemm_fp8.cpp.
const GroupedGemmFp8Kernel& select_grouped_gemm_fp8(int64_t avg_rows_per_expert);

// In place on the GEMM's bf16 output (computed with unit scales): out[r, c] *= a_scale[r or 0] *
// b_scale[e(r), c or 0], for rows r < expert_offsets[E]; e(r) is r's expert.
struct GroupedGemmScaleArgs {
  void* out;                     // [m, n] bf16
  const float* a_scale;          // [m] per token, or [1]
  const float* b_scale;          // [E, n] per channel, or [E]
  const int64_t* expert_offsets; // [E+1]
  int64_t m;
  int n;
  int num_experts;
  bool a_per_token;
  bool b_per_channel;
};

const char* launch_grouped_gemm_apply_scales(const GroupedGemmScaleArgs& args, cudaStream_t stream);

}  // namespace moe_kernels
