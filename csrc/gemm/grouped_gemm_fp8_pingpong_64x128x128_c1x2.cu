// Trial: ping-pong 64x128x128 tiles, 1x2 clusters.
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(pingpong_64x128x128_c1x2, 64, 128, 128, 1, 2,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong, false)
