// GEMM1 with the gated activation and fp8 quantization in its epilogue, cooperative 128x256x128
// tiles (the plain GEMM1's configuration at K > 1536): both warpgroups share a tile, so the
// epilogue does not overlap any MMA.
#include "gemm/grouped_gemm_fp8_gated_sm90.cuh"

MOE_KERNELS_GATED_GEMM_DEFINE(coop_128x256x128_c1x2, 128, 256, 128, 1, 2,
                              cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8FastAccum)
