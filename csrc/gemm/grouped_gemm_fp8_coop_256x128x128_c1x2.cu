// Trial: cooperative 256x128x128 tiles (an expert of <= 256 rows reads its weights once), 1x2 clusters.
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(coop_256x128x128_c1x2, 256, 128, 128, 1, 2,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, false)
