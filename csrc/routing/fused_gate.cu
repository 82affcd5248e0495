// Launcher of moe_fused_gate (see fused_gate.cuh).
#include "common/cuda_utils.cuh"
#include "routing/fused_gate.cuh"
#include "routing/launchers.h"

namespace moe_kernels {
namespace {

template <typename T, typename B, int kPer>
cudaError_t launch_typed(const FusedGateArgs& a, cudaStream_t stream) {
  FusedGateParams<T, B> p{static_cast<const T*>(a.scores), static_cast<const B*>(a.bias), a.num_tokens,
                          a.num_experts, a.num_groups, a.topk_group, a.topk, a.softmax, a.renormalize,
                          a.num_shared, a.shared_weight, a.output_scale, a.topk_weights, a.topk_ids};
  const size_t smem = sizeof(float) * kGateWarps * (a.num_experts + a.num_groups);
  auto kernel = fused_gate_kernel<T, B, kPer>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = ceil_div(a.num_tokens, kGateWarps);
  kernel<<<static_cast<unsigned>(blocks), kGateWarps * 32, smem, stream>>>(p);
  return cudaGetLastError();
}

// Registers per lane for the token's experts: the smallest of 4, 8, 12, 16, 32 that holds E / 32
// (12: Kimi-K2's 384 experts).
template <typename T, typename B>
cudaError_t launch_per_lane(const FusedGateArgs& a, cudaStream_t stream) {
  const int per = (a.num_experts + 31) / 32;
  if (per <= 4) return launch_typed<T, B, 4>(a, stream);
  if (per <= 8) return launch_typed<T, B, 8>(a, stream);
  if (per <= 12) return launch_typed<T, B, 12>(a, stream);
  if (per <= 16) return launch_typed<T, B, 16>(a, stream);
  return launch_typed<T, B, 32>(a, stream);
}

template <typename T>
cudaError_t launch_scores(const FusedGateArgs& a, cudaStream_t stream) {
  if (a.bias == nullptr || a.bias_fp32) return launch_per_lane<T, float>(a, stream);
  return launch_per_lane<T, T>(a, stream);
}

}  // namespace

cudaError_t launch_fused_gate(const FusedGateArgs& a, cudaStream_t stream) {
  if (a.num_tokens == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return launch_scores<float>(a, stream);
    case DType::kFloat16: return launch_scores<__half>(a, stream);
    case DType::kBFloat16: return launch_scores<__nv_bfloat16>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace moe_kernels
