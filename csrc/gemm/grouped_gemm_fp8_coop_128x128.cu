// Configuration for many rows per expert: 128x128x128 tiles, cooperative (two consumer warpgroups
// share each tile), 1x2 clusters (the A tile is multicast to the two CTAs along N).
#include "gemm/grouped_gemm_fp8_sm90.cuh"

namespace moe_kernels {

using GroupedGemmFp8Cooperative128x128 = grouped_gemm_fp8::Kernel<grouped_gemm_fp8::Config<
    cute::Shape<cute::_128, cute::_128, cute::_128>, cute::Shape<cute::_1, cute::_2, cute::_1>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum,
    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>>;

size_t grouped_gemm_fp8_coop_128x128_scratch_bytes(int E) { return GroupedGemmFp8Cooperative128x128::scratch_bytes(E); }
size_t grouped_gemm_fp8_coop_128x128_workspace_bytes(int sms) {
  return GroupedGemmFp8Cooperative128x128::workspace_bytes(sms);
}
const char* launch_grouped_gemm_fp8_coop_128x128(const GroupedGemmFp8Args& a, cudaStream_t stream) {
  return GroupedGemmFp8Cooperative128x128::launch(a, stream);
}

}  // namespace moe_kernels
