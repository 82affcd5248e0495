// GEMM1 with the gated activation and fp8 quantization in its epilogue: the tile, cluster and
// mainloop schedule of grouped_gemm_fp8_coop_128x256x128_c1x2.cu (the configuration the layer's
// GEMM1 takes above 32 rows per expert at K > 1536), so that the accumulators are the same.
#include "gemm/grouped_gemm_fp8_gated_sm90.cuh"

namespace moe_kernels {
using GroupedGemmFp8Gated = grouped_gemm_fp8::GatedKernel<grouped_gemm_fp8::Config<
    cute::Shape<cute::_128, cute::_256, cute::_128>, cute::Shape<cute::_1, cute::_2, cute::_1>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum,
    cutlass::epilogue::PtrArrayNoSmemWarpSpecialized>>;

size_t grouped_gemm_fp8_gated_scratch_bytes(int E) {
  return grouped_gemm_launch::scratch_bytes<GroupedGemmFp8Gated>(E);
}
size_t grouped_gemm_fp8_gated_workspace_bytes(int sms) {
  return grouped_gemm_launch::workspace_bytes<GroupedGemmFp8Gated, GroupedGemmFp8GatedArgs>(sms);
}
const char* launch_grouped_gemm_fp8_gated(const GroupedGemmFp8GatedArgs& a, cudaStream_t stream) {
  return grouped_gemm_launch::launch<GroupedGemmFp8Gated>(a, stream);
}
}  // namespace moe_kernels
