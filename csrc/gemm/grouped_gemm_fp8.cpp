// The choice of grouped-GEMM configuration by rows per expert. Plain C++: the configurations are
// compiled in their own .cu files (grouped_gemm_fp8_<name>.cu).
#include <cstdint>

#include "gemm/launchers.h"

namespace moe_kernels {

#define MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(name)                                   \
  size_t grouped_gemm_fp8_##name##_scratch_bytes(int);                              \
  size_t grouped_gemm_fp8_##name##_workspace_bytes(int);                            \
  const char* launch_grouped_gemm_fp8_##name(const GroupedGemmFp8Args&, cudaStream_t); \
  constexpr GroupedGemmFp8Kernel k_##name{#name, grouped_gemm_fp8_##name##_scratch_bytes, \
                                          grouped_gemm_fp8_##name##_workspace_bytes,       \
                                          launch_grouped_gemm_fp8_##name};

MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(pingpong_64x128)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(coop_128x128)
#undef MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG

const GroupedGemmFp8Kernel& select_grouped_gemm_fp8(int64_t avg_rows_per_expert) {
  struct Row {
    int64_t max_avg_rows;  // use this configuration up to this many rows per expert
    const GroupedGemmFp8Kernel& kernel;
  };
  // Routing spreads rows unevenly (an expert with avg rows gets avg +- sqrt(avg)): with 128-row
  // tiles an expert of 130 rows pays for 256, so 64-row tiles win until experts are large.
  static const Row table[] = {
      {256, k_pingpong_64x128},
      {INT64_MAX, k_coop_128x128},
  };
  for (const Row& row : table) {
    if (avg_rows_per_expert <= row.max_avg_rows) return row.kernel;
  }
  return table[1].kernel;
}

}  // namespace moe_kernels
