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
  // Measured on H100 (bench/bench_gemm.py, 2026-11-22): 64-row ping-pong tiles are 1-3% faster
  // at decode sizes (<= 32 rows per expert, weight-bandwidth bound) and 10-40% slower from 64 rows
  // per expert on (Qwen3 at 64 and 256 rows, DeepSeek-V3 at 128, Mixtral at 256).
  static const Row table[] = {
      {32, k_pingpong_64x128},
      {INT64_MAX, k_coop_128x128},
  };
  for (const Row& row : table) {
    if (avg_rows_per_expert <= row.max_avg_rows) return row.kernel;
  }
  return table[1].kernel;
}

}  // namespace moe_kernels
