// The decode configurations of the FP8 grouped GEMM (grouped_gemv_fp8.cuh): gemv_rowwise (per
// tensor/token/channel scales) and block_gemv (block-scaled; the block_ prefix marks the kind, as
// for the CUTLASS block configurations). Named like the CUTLASS configurations so that the table in
// grouped_gemm_fp8.cpp declares them, and compiled for sm_90a only beside them (CMakeLists.txt
// filters csrc/gemm/grouped_gemm_fp8*; the op runs on compute capability 9.0 only). No scratch and
// no workspace: the kernel reads expert_offsets itself.
#include <cstdint>

#include "gemm/grouped_gemv_fp8.cuh"
#include "gemm/launchers.h"

namespace moe_kernels {
namespace {

namespace gv = grouped_gemv_fp8;

// Fewer CTAs than this many per SM (4 warps each): split K over 8 warps instead of 4, so that an
// expert with few columns still keeps enough loads in flight (Mixtral's GEMM2 at T = 1: N = 4096
// over 2 experts gives 256 CTAs for 132 SMs). Only where each of the 8 warps gets whole steps.
constexpr int64_t kFewCtasPerSm = 4;

template <int kWarps, bool kBlockScaled>
const char* launch_kernel(const gv::Params& p, dim3 grid, cudaStream_t stream) {
  gv::grouped_gemv_fp8_kernel<kWarps, kBlockScaled><<<grid, kWarps * gv::kWarpSize, 0, stream>>>(p);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return cudaGetErrorString(err);
  return "";
}

template <bool kBlockScaled>
const char* launch_gemv(const GroupedGemmFp8Args& a, cudaStream_t stream) {
  if (a.block_scaled != kBlockScaled) {
    return kBlockScaled ? "block_gemv takes block-scaled arguments only (gemv_rowwise takes the others)"
                        : "gemv_rowwise takes per tensor/token/channel scales only (block_gemv takes block-scaled ones)";
  }
  if (a.m == 0 || a.num_experts == 0) return "";
  // 16-byte vector loads of rows of K bytes (K is a multiple of 16).
  if (reinterpret_cast<uintptr_t>(a.a) % gv::kVecBytes != 0 || reinterpret_cast<uintptr_t>(a.b) % gv::kVecBytes != 0) {
    return "a and b must be 16-byte aligned";
  }
  if (a.k % gv::kVecBytes != 0 || a.n % 8 != 0) return "K must be a multiple of 16 and N of 8";
  if (kBlockScaled && (a.k % gv::kScaleBlock != 0 || a.n % gv::kScaleBlock != 0)) {
    return "block-scaled needs K and N multiples of 128";
  }
  // At most min(E, M) experts have rows: one slot of CTAs each (grid.y is limited to 65535).
  const int64_t slots = a.m < a.num_experts ? a.m : a.num_experts;
  if (slots > 65535) return "more than 65535 experts with rows";
  const dim3 grid(static_cast<unsigned>((a.n + gv::kColsPerCta - 1) / gv::kColsPerCta), static_cast<unsigned>(slots));
  const gv::Params p{static_cast<const uint8_t*>(a.a), static_cast<const uint8_t*>(a.b), a.a_scale, a.b_scale,
                     a.expert_offsets, static_cast<__nv_bfloat16*>(a.out), a.m, a.num_experts, a.n, a.k,
                     a.a_per_token, a.b_per_channel};
  const int64_t ctas = static_cast<int64_t>(grid.x) * grid.y;
  const int64_t steps = (a.k + gv::kStepK - 1) / gv::kStepK;
  const bool wide = ctas < kFewCtasPerSm * a.sm_count && steps >= 8 * gv::kUnroll;
  return wide ? launch_kernel<8, kBlockScaled>(p, grid, stream) : launch_kernel<4, kBlockScaled>(p, grid, stream);
}

}  // namespace

size_t grouped_gemm_fp8_gemv_rowwise_scratch_bytes(int) { return 0; }
size_t grouped_gemm_fp8_gemv_rowwise_workspace_bytes(int) { return 0; }
const char* launch_grouped_gemm_fp8_gemv_rowwise(const GroupedGemmFp8Args& a, cudaStream_t stream) {
  return launch_gemv<false>(a, stream);
}

size_t grouped_gemm_fp8_block_gemv_scratch_bytes(int) { return 0; }
size_t grouped_gemm_fp8_block_gemv_workspace_bytes(int) { return 0; }
const char* launch_grouped_gemm_fp8_block_gemv(const GroupedGemmFp8Args& a, cudaStream_t stream) {
  return launch_gemv<true>(a, stream);
}

}  // namespace moe_kernels
