// MXFP4 weights, larger batches: 64-row tiles and 128 weight rows per CTA (each decoded weight
// tile serves 64 rows), two stages (the 99 KiB shared-memory budget of sm_86/89/120). bf16 (W4A16)
// or e4m3 (W4A8) activations.
#include "gemm/grouped_gemm_w4.cuh"

MOE_KERNELS_W4_GEMM_DEFINE(mxfp4_bm64, WeightFormat::kMxfp4, true, 64, 128, 2, 2)
