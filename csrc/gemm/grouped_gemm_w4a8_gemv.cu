// INT4 weights (fp32 scale per 128 along K) with e4m3 activations, decode (about one row per
// expert): the GEMV of grouped_gemv_w4.cuh.
#include "gemm/grouped_gemv_w4.cuh"

MOE_KERNELS_W4_GEMV_DEFINE(int4_gemv, WeightFormat::kInt4, false)
