// The compiled grouped-GEMM configurations and the choice among them by rows per expert. Plain
// C++: each configuration is compiled in its own .cu file (grouped_gemm_fp8_<name>.cu). Trial
// configurations (CMake option MOE_KERNELS_GEMM_TRIAL) are only built to measure them.
#include <cstdint>
#include <cstring>

#include "gemm/launchers.h"

namespace moe_kernels {

#define MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(name)                                   \
  size_t grouped_gemm_fp8_##name##_scratch_bytes(int);                              \
  size_t grouped_gemm_fp8_##name##_workspace_bytes(int);                            \
  const char* launch_grouped_gemm_fp8_##name(const GroupedGemmFp8Args&, cudaStream_t); \
  constexpr GroupedGemmFp8Kernel k_##name{#name, grouped_gemm_fp8_##name##_scratch_bytes, \
                                          grouped_gemm_fp8_##name##_workspace_bytes,       \
                                          launch_grouped_gemm_fp8_##name};

MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(pingpong_64x128x128_c1x2)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(coop_128x128x128_c1x2)
#ifdef MOE_KERNELS_GEMM_TRIAL
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(pingpong_64x128x256_c1x2)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(pingpong_64x256x128_c1x2)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(coop_128x256x128_c1x2)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(coop_128x128x128_c2x1)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(coop_256x128x128_c1x2)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(pingpong_128x128x128_c1x2)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(pingpong_64x128x128_c1x1)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(coop_128x128x128_c1x1)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(swap_pingpong_128x16x128_c1x1)
MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG(swap_pingpong_128x32x128_c1x1)
#endif
#undef MOE_KERNELS_GROUPED_GEMM_FP8_CONFIG

namespace {
const GroupedGemmFp8Kernel* const kConfigs[] = {
    &k_pingpong_64x128x128_c1x2, &k_coop_128x128x128_c1x2,
#ifdef MOE_KERNELS_GEMM_TRIAL
    &k_pingpong_64x128x256_c1x2, &k_pingpong_64x256x128_c1x2, &k_coop_128x256x128_c1x2,
    &k_coop_128x128x128_c2x1,    &k_coop_256x128x128_c1x2,    &k_pingpong_128x128x128_c1x2,
    &k_pingpong_64x128x128_c1x1, &k_coop_128x128x128_c1x1,    &k_swap_pingpong_128x16x128_c1x1,
    &k_swap_pingpong_128x32x128_c1x1,
#endif
};
}  // namespace

int grouped_gemm_fp8_config_count() { return static_cast<int>(sizeof(kConfigs) / sizeof(kConfigs[0])); }
const GroupedGemmFp8Kernel& grouped_gemm_fp8_config(int i) { return *kConfigs[i]; }

const GroupedGemmFp8Kernel* find_grouped_gemm_fp8(const char* name) {
  for (const GroupedGemmFp8Kernel* k : kConfigs) {
    if (std::strcmp(k->name, name) == 0) return k;
  }
  return nullptr;
}

const GroupedGemmFp8Kernel& select_grouped_gemm_fp8(int64_t avg_rows_per_expert) {
  struct Row {
    int64_t max_avg_rows;  // use this configuration up to this many rows per expert
    const GroupedGemmFp8Kernel& kernel;
  };
  // Measured on H100 (bench/bench_gemm.py, 2026-11-22): 64-row ping-pong tiles are 1-3% faster
  // at decode sizes (<= 32 rows per expert, weight-bandwidth bound) and 10-40% slower from 64 rows
  // per expert on (Qwen3 at 64 and 256 rows, DeepSeek-V3 at 128, Mixtral at 256).
  static const Row table[] = {
      {32, k_pingpong_64x128x128_c1x2},
      {INT64_MAX, k_coop_128x128x128_c1x2},
  };
  for (const Row& row : table) {
    if (avg_rows_per_expert <= row.max_avg_rows) return row.kernel;
  }
  return table[1].kernel;
}

}  // namespace moe_kernels
