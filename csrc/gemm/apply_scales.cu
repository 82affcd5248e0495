// Per-token / per-channel scales of the FP8 grouped GEMM, applied after the GEMM.
//
// The CUTLASS configurations take one scalar alpha per expert (ptr-array LinearCombination). For
// a_scales [M] and/or b_scales [E, N] the GEMM runs with alpha = 1 and this kernel rescales its
// bf16 output in place: out[r, c] = bf16(float(out[r, c]) * a_scale[r] * b_scale[e(r), c]), with
// e(r) the expert whose row range holds r. One extra read+write of the output and a second bf16
// rounding (relative error <= 2^-8 more); an epilogue broadcast would remove both.
#include <cuda_bf16.h>

#include <cstdint>

#include "gemm/launchers.h"

namespace moe_kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kVec = 8;  // bf16 per 16-byte access; N % 8 == 0 is checked by the glue

// The expert whose rows [offsets[e], offsets[e+1]) hold row r, or -1 past the last used row.
__device__ int expert_of_row(const int64_t* offsets, int num_experts, int64_t r) {
  if (r >= offsets[num_experts]) return -1;
  int lo = 0, hi = num_experts - 1;  // first e with offsets[e+1] > r
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (offsets[mid + 1] > r) hi = mid; else lo = mid + 1;
  }
  return lo;
}

__global__ void apply_scales_kernel(GroupedGemmScaleArgs p) {
  const int64_t r = blockIdx.x;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kVec;
  if (c0 >= p.n) return;
  const int e = expert_of_row(p.expert_offsets, p.num_experts, r);
  if (e < 0) return;  // rows the GEMM did not write stay as they are
  const float sa = p.a_scale[p.a_per_token ? r : 0];
  const float* sb = p.b_scale + (p.b_per_channel ? static_cast<int64_t>(e) * p.n + c0 : e);
  uint4 v = *reinterpret_cast<const uint4*>(static_cast<__nv_bfloat16*>(p.out) + r * p.n + c0);
  auto* h = reinterpret_cast<__nv_bfloat16*>(&v);
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    h[i] = __float2bfloat16(__bfloat162float(h[i]) * sa * sb[p.b_per_channel ? i : 0]);
  }
  *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + r * p.n + c0) = v;
}

}  // namespace

const char* launch_grouped_gemm_apply_scales(const GroupedGemmScaleArgs& p, cudaStream_t stream) {
  if (p.m == 0 || p.num_experts == 0) return "";
  const dim3 grid(static_cast<unsigned>(p.m), static_cast<unsigned>((p.n / kVec + kThreads - 1) / kThreads));
  apply_scales_kernel<<<grid, kThreads, 0, stream>>>(p);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  return "";
}

}  // namespace moe_kernels
