// MXFP4 weights, decode and small batches (few rows per expert): 16-row tiles, 64 weight rows per
// CTA (gated: 32 output columns) so that even one token's few experts spread over every SM, and
// six stages (five K tiles of copies in flight while one is decoded: about 75 KiB of shared memory,
// three CTAs per H100/H200 SM as with four stages) to keep the weight stream busy. bf16 (W4A16) or
// e4m3 (W4A8) activations.
#include "gemm/grouped_gemm_w4.cuh"

MOE_KERNELS_W4_GEMM_DEFINE(mxfp4_bm16, WeightFormat::kMxfp4, true, 16, 64, 1, 6)
