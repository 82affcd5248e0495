// Many rows per expert: cooperative 128x256x128 tiles (two consumer warpgroups share each tile;
// each weight tile feeds 128 rows), 1x2 clusters (the A tile is multicast to the two CTAs along N).
#include "gemm/grouped_gemm_fp8_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_DEFINE(coop_128x256x128_c1x2, 128, 256, 128, 1, 2,
                                    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum,
                                    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, false)
