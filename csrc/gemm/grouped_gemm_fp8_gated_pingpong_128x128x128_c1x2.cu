// GEMM1 with the gated activation and fp8 quantization in its epilogue, ping-pong 128x128x128
// tiles: one warpgroup's epilogue (the activation's instructions) runs while the other's MMAs do,
// and K tiles of 128 keep the plain GEMM's accumulation order (the same bytes).
#include "gemm/grouped_gemm_fp8_gated_sm90.cuh"

MOE_KERNELS_GATED_GEMM_DEFINE(pingpong_128x128x128_c1x2, 128, 128, 128, 1, 2,
                              cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8FastAccum)
