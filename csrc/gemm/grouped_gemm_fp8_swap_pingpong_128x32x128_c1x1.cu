// Trial, decode sizes: swap-AB, ping-pong; 128 weight rows x 32 token rows x 128 per tile, no clusters.
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(swap_pingpong_128x32x128_c1x1, 128, 32, 128, 1, 1,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong, true)
