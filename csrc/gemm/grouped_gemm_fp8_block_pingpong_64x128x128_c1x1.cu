// Block-scaled, few rows per expert (decode): 64-row ping-pong tiles, so an expert's handful of rows
// pads to 64, not 128, while the GEMM streams each routed expert's weights once.
#include "gemm/grouped_gemm_fp8_blockwise_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_BLOCKWISE_DEFINE(block_pingpong_64x128x128_c1x1, 64, 128, 128, 1, 1,
                                              cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong)
