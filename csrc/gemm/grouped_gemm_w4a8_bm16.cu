// INT4 weights (fp32 scale per 128 along K) with e4m3 activations, decode and small batches:
// 16-row tiles, 64 weight rows per CTA, six stages (as mxfp4_bm16).
#include "gemm/grouped_gemm_w4.cuh"

MOE_KERNELS_W4_GEMM_DEFINE(int4_bm16, WeightFormat::kInt4, false, 16, 64, 1, 6)
