// Trial: pingpong 128x128x128 tiles, 2x1 clusters (the weight tile is multicast to two row tiles of an expert).
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(pingpong_128x128x128_c2x1, 128, 128, 128, 2, 1,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong, false)
