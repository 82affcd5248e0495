// INT4 weights with e4m3 activations, larger batches: 64-row tiles, 128 weight rows per CTA, two
// stages (as mxfp4_bm64).
#include "gemm/grouped_gemm_w4.cuh"

MOE_KERNELS_W4_GEMM_DEFINE(int4_bm64, WeightFormat::kInt4, false, 64, 128, 2, 2)
