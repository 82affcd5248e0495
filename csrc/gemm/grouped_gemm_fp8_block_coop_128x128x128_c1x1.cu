// Block-scaled trial configuration (built with MOE_KERNELS_GEMM_BLOCK_TRIAL=ON), measured against the
// defaults by python3 -m moe_kernels.bench --ops gemm_block --gemm-configs <names>.
#include "gemm/grouped_gemm_fp8_blockwise_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_BLOCKWISE_DEFINE(block_coop_128x128x128_c1x1, 128, 128, 128, 1, 1,
                                              cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative)
