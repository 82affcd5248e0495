// Trial: cooperative 128x128x128 tiles (two consumer warpgroups share each tile), 1x2 clusters.
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(coop_128x128x128_c1x2, 128, 128, 128, 1, 2,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, false)
