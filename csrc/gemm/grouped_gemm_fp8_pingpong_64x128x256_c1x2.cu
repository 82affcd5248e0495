// Decode and mid-size batches (<= 64 rows per expert: weight-bandwidth bound): ping-pong 64x128
// tiles with 256-deep K blocks (256 contiguous bytes per weight row in each TMA box, half the
// barrier round trips of 128-deep blocks), 1x2 clusters.
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(pingpong_64x128x256_c1x2, 64, 128, 256, 1, 2,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong, false)
