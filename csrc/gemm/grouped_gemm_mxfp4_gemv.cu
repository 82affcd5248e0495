// MXFP4 weights, decode (about one row per expert): the GEMV of grouped_gemv_w4.cuh, weights
// streamed into registers and decoded there. bf16 (W4A16) or e4m3 (W4A8) activations.
#include "gemm/grouped_gemv_w4.cuh"

MOE_KERNELS_W4_GEMV_DEFINE(mxfp4_gemv, WeightFormat::kMxfp4, true)
