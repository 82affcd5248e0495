// The configuration table of the 4-bit grouped GEMMs (plain C++: the .cu files hold the kernels).
#include <cstdlib>
#include <cstring>

#include "gemm/w4_launchers.h"

namespace moe_kernels::w4 {

// 16-row tiles while an expert gets at most 16 rows on average (decode and small batches: every
// expert's weight tile is streamed once, and 64-row weight tiles give twice the CTAs); 64-row
// tiles above, where a decoded weight tile is worth reusing across more rows. Below both, at
// decode (about one row per expert, kGemvMaxAvgRowsPerExpert, measured on an H200), the GEMV: the
// bm16 tiles would be mostly zero rows, and the weight stream is all that counts. The bm16/bm64
// crossover at 16 rows is not tuned on a GPU yet.
const W4GemmKernel& select_w4_gemm(WeightFormat format, int64_t avg_rows_per_expert) {
  if (avg_rows_per_expert <= kGemvMaxAvgRowsPerExpert)
    return format == WeightFormat::kMxfp4 ? mxfp4_gemv_kernel() : int4_gemv_kernel();
  const bool small = avg_rows_per_expert <= 16;
  if (format == WeightFormat::kMxfp4) return small ? mxfp4_bm16_kernel() : mxfp4_bm64_kernel();
  return small ? int4_bm16_kernel() : int4_bm64_kernel();
}

const W4GemmKernel* find_w4_gemm(const char* name) {
  for (const W4GemmKernel* k : {&mxfp4_gemv_kernel(), &mxfp4_bm16_kernel(), &mxfp4_bm64_kernel(), &int4_gemv_kernel(),
                                &int4_bm16_kernel(), &int4_bm64_kernel()}) {
    if (std::strcmp(k->name, name) == 0) return k;
  }
  return nullptr;
}

const W4GemmKernel& pick_w4_gemm(WeightFormat format, int64_t avg_rows_per_expert, const char** unknown) {
  *unknown = nullptr;
  const W4GemmKernel& chosen = select_w4_gemm(format, avg_rows_per_expert);
  const char* forced = std::getenv("MOE_KERNELS_W4_GEMM_CONFIG");
  if (forced == nullptr || forced[0] == '\0') return chosen;
  const W4GemmKernel* k = find_w4_gemm(forced);
  if (k == nullptr) {
    *unknown = forced;
    return chosen;
  }
  return k->format == format ? *k : chosen;
}

}  // namespace moe_kernels::w4
