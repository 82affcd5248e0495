// Configuration for few rows per expert (decode and mid-size batches): 64x128x128 tiles, ping-pong
// (two consumer warpgroups on alternate tiles, so one's epilogue hides under the other's MMAs;
// 64-row tiles waste less on experts with a few dozen rows), 1x2 clusters.
#include "gemm/grouped_gemm_fp8_sm90.cuh"

namespace moe_kernels {

using GroupedGemmFp8Pingpong64x128 = grouped_gemm_fp8::Kernel<grouped_gemm_fp8::Config<
    cute::Shape<cute::_64, cute::_128, cute::_128>, cute::Shape<cute::_1, cute::_2, cute::_1>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum,
    cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>>;

size_t grouped_gemm_fp8_pingpong_64x128_scratch_bytes(int E) { return GroupedGemmFp8Pingpong64x128::scratch_bytes(E); }
size_t grouped_gemm_fp8_pingpong_64x128_workspace_bytes(int sms) {
  return GroupedGemmFp8Pingpong64x128::workspace_bytes(sms);
}
const char* launch_grouped_gemm_fp8_pingpong_64x128(const GroupedGemmFp8Args& a, cudaStream_t stream) {
  return GroupedGemmFp8Pingpong64x128::launch(a, stream);
}

}  // namespace moe_kernels
