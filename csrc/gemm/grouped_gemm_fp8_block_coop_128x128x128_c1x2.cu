// Block-scaled, many rows per expert: cooperative 128x128x128 tiles (a 128-wide N tile matches one
// weight scale block; the blockwise mainloop keeps a second accumulator for the per-K-block
// promotion, which rules out 128x256 without spilling), 1x2 clusters (A multicast along N).
#include "gemm/grouped_gemm_fp8_blockwise_sm90.cuh"

MOE_KERNELS_GROUPED_GEMM_FP8_BLOCKWISE_DEFINE(block_coop_128x128x128_c1x2, 128, 128, 128, 1, 2,
                                              cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                              cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative)
