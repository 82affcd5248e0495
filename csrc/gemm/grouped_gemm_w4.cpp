// The configuration table of the 4-bit grouped GEMMs (plain C++: the .cu files hold the kernels).
#include "gemm/w4_launchers.h"

namespace moe_kernels::w4 {

// 16-row tiles while an expert gets at most 16 rows on average (decode and small batches: every
// expert's weight tile is streamed once, and 64-row weight tiles give twice the CTAs); 64-row
// tiles above, where a decoded weight tile is worth reusing across more rows. Not yet tuned on a
// GPU: the crossover is the first thing the GPU run should measure.
const W4GemmKernel& select_w4_gemm(WeightFormat format, int64_t avg_rows_per_expert) {
  const bool small = avg_rows_per_expert <= 16;
  if (format == WeightFormat::kMxfp4) return small ? mxfp4_bm16_kernel() : mxfp4_bm64_kernel();
  return small ? int4_bm16_kernel() : int4_bm64_kernel();
}

}  // namespace moe_kernels::w4
