// Many rows per expert and a short K (<= 1536): ping-pong 128x128x128 tiles (one warpgroup's
// epilogue hides under the other's MMAs, which matters when each tile has few K blocks), 1x2 clusters.
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(pingpong_128x128x128_c1x2, 128, 128, 128, 1, 2,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong, false)
