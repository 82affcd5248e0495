// Host check of the 4-bit configuration table (csrc/gemm/grouped_gemm_w4.cpp): which kernel
// select_w4_gemm takes for how many rows per expert, that find_w4_gemm knows every configuration
// by name, and that pick_w4_gemm honours MOE_KERNELS_W4_GEMM_CONFIG (the override the GPU tests and
// benchmarks use to compare the GEMV with bm16). The kernels are stubs here: the table alone is
// linked. Built and run by tests/test_mxfp4_w4a8_gemv.py. Prints the failures and exits non-zero
// on any.
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "gemm/w4_launchers.h"

namespace moe_kernels::w4 {
#define STUB(name, format, block_m)                                           \
  const W4GemmKernel& name##_kernel() {                                       \
    static const W4GemmKernel k{#name, format, block_m, nullptr};             \
    return k;                                                                 \
  }
STUB(mxfp4_gemv, WeightFormat::kMxfp4, 1)
STUB(mxfp4_bm16, WeightFormat::kMxfp4, 16)
STUB(mxfp4_bm64, WeightFormat::kMxfp4, 64)
STUB(int4_gemv, WeightFormat::kInt4, 1)
STUB(int4_bm16, WeightFormat::kInt4, 16)
STUB(int4_bm64, WeightFormat::kInt4, 64)
#undef STUB
}  // namespace moe_kernels::w4

using namespace moe_kernels::w4;

namespace {
int failures = 0;

void expect(const char* got, const char* want, const char* what) {
  if (std::strcmp(got, want) != 0) {
    std::printf("FAIL %s: got %s, want %s\n", what, got, want);
    ++failures;
  }
}
}  // namespace

int main() {
  // Decode (M / E <= kGemvMaxAvgRowsPerExpert): the GEMV; then bm16 up to 16 rows, bm64 above.
  for (int64_t avg = 0; avg <= kGemvMaxAvgRowsPerExpert; ++avg) {
    expect(select_w4_gemm(WeightFormat::kMxfp4, avg).name, "mxfp4_gemv", "mxfp4 at decode");
    expect(select_w4_gemm(WeightFormat::kInt4, avg).name, "int4_gemv", "int4 at decode");
  }
  expect(select_w4_gemm(WeightFormat::kMxfp4, kGemvMaxAvgRowsPerExpert + 1).name, "mxfp4_bm16", "mxfp4 above");
  // Two rows per expert: measured on an H200, the GEMV loses (bf16 activations) or ties (fp8).
  expect(select_w4_gemm(WeightFormat::kMxfp4, 2).name, "mxfp4_bm16", "mxfp4 at 2 rows");
  expect(select_w4_gemm(WeightFormat::kInt4, 2).name, "int4_bm16", "int4 at 2 rows");
  expect(select_w4_gemm(WeightFormat::kInt4, 16).name, "int4_bm16", "int4 at 16");
  expect(select_w4_gemm(WeightFormat::kMxfp4, 17).name, "mxfp4_bm64", "mxfp4 at 17");
  for (const char* name : {"mxfp4_gemv", "mxfp4_bm16", "mxfp4_bm64", "int4_gemv", "int4_bm16", "int4_bm64"}) {
    const W4GemmKernel* k = find_w4_gemm(name);
    expect(k ? k->name : "(none)", name, "find_w4_gemm");
  }
  if (find_w4_gemm("bm32") != nullptr) {
    std::printf("FAIL find_w4_gemm(bm32) is not null\n");
    ++failures;
  }
  // The override: bm16 forced at decode; a name of the other format leaves the table's choice.
  const char* unknown = nullptr;
  setenv("MOE_KERNELS_W4_GEMM_CONFIG", "mxfp4_bm16", 1);
  expect(pick_w4_gemm(WeightFormat::kMxfp4, 0, &unknown).name, "mxfp4_bm16", "forced bm16");
  expect(pick_w4_gemm(WeightFormat::kInt4, 0, &unknown).name, "int4_gemv", "other format's name");
  setenv("MOE_KERNELS_W4_GEMM_CONFIG", "int4_gemv", 1);
  expect(pick_w4_gemm(WeightFormat::kInt4, 100, &unknown).name, "int4_gemv", "forced gemv");
  setenv("MOE_KERNELS_W4_GEMM_CONFIG", "bm32", 1);
  pick_w4_gemm(WeightFormat::kInt4, 0, &unknown);
  expect(unknown ? unknown : "(null)", "bm32", "unknown name reported");
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
