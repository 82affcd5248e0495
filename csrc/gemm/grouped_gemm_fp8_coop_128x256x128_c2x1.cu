// Trial: cooperative 128x256x128 tiles, 2x1 clusters (the weight tile is multicast to two row tiles of an expert).
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(coop_128x256x128_c2x1, 128, 256, 128, 2, 1,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, false)
