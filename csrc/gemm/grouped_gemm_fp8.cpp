// The compiled grouped-GEMM configurations and the choice among them by rows per expert. Plain
// C++: each configuration is compiled in its own .cu file (grouped_gemm_fp8_<name>.cu). Trial
// configurations (CMake option MOE_KERNELS_GEMM_TRIAL) are only built to measure them.
#include <cstdint>
#include <cstring>

#include "gemm/launchers.h"

namespace moe_kernels {

// Each configuration is named once in these lists (and once in CMakeLists.txt, which compiles
// its .cu file); the declarations and the table below are generated from them.
// gemv_rowwise and block_gemv are not CUTLASS: the decode kernel of grouped_gemv_fp8.cuh, both in
// grouped_gemm_fp8_gemv.cu.
#define MOE_KERNELS_DEFAULT_CONFIGS(X) \
  X(pingpong_64x128x256_c1x2) X(coop_128x256x128_c1x2) X(pingpong_128x128x128_c1x2) X(gemv_rowwise)
// Block-scaled configurations (grouped_gemm_fp8_block_<name>.cu, grouped_gemm_fp8_blockwise_sm90.cuh).
#define MOE_KERNELS_BLOCK_CONFIGS(X) \
  X(block_pingpong_64x128x128_c1x1) X(block_coop_128x128x128_c1x2) X(block_gemv)
#ifdef MOE_KERNELS_GEMM_TRIAL
#define MOE_KERNELS_TRIAL_CONFIGS(X)                                                                \
  X(pingpong_64x128x128_c1x2) X(coop_128x128x128_c1x2) X(pingpong_64x256x128_c1x2)                  \
  X(coop_128x128x128_c2x1) X(coop_256x128x128_c1x2) X(pingpong_64x128x128_c1x1)                     \
  X(coop_128x128x128_c1x1) X(swap_pingpong_128x16x128_c1x1) X(swap_pingpong_128x32x128_c1x1)        \
  X(pingpong_128x128x128_c2x1) X(coop_128x256x128_c2x1)
#else
#define MOE_KERNELS_TRIAL_CONFIGS(X)
#endif
#ifdef MOE_KERNELS_GEMM_BLOCK_TRIAL
#define MOE_KERNELS_BLOCK_TRIAL_CONFIGS(X)                                                         \
  X(block_coop_128x128x128_c2x1) X(block_coop_128x128x128_c1x1) X(block_pingpong_64x128x128_c1x2)   \
  X(block_pingpong_64x128x128_c2x1)
#else
#define MOE_KERNELS_BLOCK_TRIAL_CONFIGS(X)
#endif

#define MOE_KERNELS_DECLARE_KIND(name, block)                                                     \
  size_t grouped_gemm_fp8_##name##_scratch_bytes(int);                                           \
  size_t grouped_gemm_fp8_##name##_workspace_bytes(int);                                         \
  const char* launch_grouped_gemm_fp8_##name(const GroupedGemmFp8Args&, cudaStream_t);          \
  constexpr GroupedGemmFp8Kernel k_##name{#name, block, grouped_gemm_fp8_##name##_scratch_bytes, \
                                          grouped_gemm_fp8_##name##_workspace_bytes,              \
                                          launch_grouped_gemm_fp8_##name};
#define MOE_KERNELS_DECLARE_CONFIG(name) MOE_KERNELS_DECLARE_KIND(name, false)
#define MOE_KERNELS_DECLARE_BLOCK_CONFIG(name) MOE_KERNELS_DECLARE_KIND(name, true)
MOE_KERNELS_DEFAULT_CONFIGS(MOE_KERNELS_DECLARE_CONFIG)
MOE_KERNELS_TRIAL_CONFIGS(MOE_KERNELS_DECLARE_CONFIG)
MOE_KERNELS_BLOCK_CONFIGS(MOE_KERNELS_DECLARE_BLOCK_CONFIG)
MOE_KERNELS_BLOCK_TRIAL_CONFIGS(MOE_KERNELS_DECLARE_BLOCK_CONFIG)
#undef MOE_KERNELS_DECLARE_BLOCK_CONFIG
#undef MOE_KERNELS_DECLARE_CONFIG
#undef MOE_KERNELS_DECLARE_KIND

namespace {
#define MOE_KERNELS_CONFIG_ADDRESS(name) &k_##name,
const GroupedGemmFp8Kernel* const kConfigs[] = {MOE_KERNELS_DEFAULT_CONFIGS(MOE_KERNELS_CONFIG_ADDRESS)
                                                    MOE_KERNELS_TRIAL_CONFIGS(MOE_KERNELS_CONFIG_ADDRESS)
                                                        MOE_KERNELS_BLOCK_CONFIGS(MOE_KERNELS_CONFIG_ADDRESS)
                                                            MOE_KERNELS_BLOCK_TRIAL_CONFIGS(MOE_KERNELS_CONFIG_ADDRESS)};
#undef MOE_KERNELS_CONFIG_ADDRESS
}  // namespace

int grouped_gemm_fp8_config_count() { return static_cast<int>(sizeof(kConfigs) / sizeof(kConfigs[0])); }
const GroupedGemmFp8Kernel& grouped_gemm_fp8_config(int i) { return *kConfigs[i]; }

const GroupedGemmFp8Kernel* find_grouped_gemm_fp8(const char* name) {
  for (const GroupedGemmFp8Kernel* k : kConfigs) {
    if (std::strcmp(k->name, name) == 0) return k;
  }
  return nullptr;
}

// Decode: the GEMV (grouped_gemv_fp8.cuh) while the rows are this few. The kernel handles 8 rows
// of an expert per pass over its weights; an average of 2 leaves room for routing skew, and M
// bounds the experts with rows (grid slots) and the rows of the most loaded one. Measured on an
// H200 (2026-12-04, bench --ops gemm,layer,layer_block --T 1,4,16,64 against
// MOE_KERNELS_GEMM_CONFIG=pingpong_64x128x256_c1x2 / block_pingpong_64x128x128_c1x1; fractions of
// each row's roofline, which counts the experts its own routing touched):
// - per-channel/tensor: the GEMV wins at T = 1 and 4 (GEMMs 1.06-1.84x, layers 1.09-1.29x at T = 1;
//   Qwen3-30B-A3B GEMM2 0.43 against 0.23 of its roofline) and loses a little at M = 128 (T = 16
//   on DeepSeek-V3 and Qwen3-235B: GEMM2 0.92 against 0.97 and 0.83 against 0.88), so up to 64 rows;
// - block-scaled: wins at T = 1 and 4 (layers 1.07-1.32x) and ties or wins at M = 128 (DeepSeek-V3
//   layer 0.95 against 0.92), so up to 256 rows.
struct GemvWhen {
  int64_t max_avg_rows_per_expert;
  int64_t max_rows;
};
constexpr GemvWhen kGemvWhen{2, 64};
constexpr GemvWhen kBlockGemvWhen{2, 256};

bool use_gemv(const GemvWhen& when, int64_t rows, int64_t avg_rows_per_expert) {
  return avg_rows_per_expert <= when.max_avg_rows_per_expert && rows <= when.max_rows;
}

// Measured on H100 with every trial configuration forced in turn (bench/bench_gemm.py --configs,
// results in bench/results/gemm_configs*_*.json), rowwise scales, ratios to
// torch._scaled_grouped_mm on the same inputs, Mixtral-8x7B / Qwen3-235B / DeepSeek-V3 shapes:
// - <= 64 rows per expert (decode, and Qwen3 at T=1024) the GEMM streams the weights once and is
//   bandwidth bound; every 64-row or swap-AB configuration lands within a few percent of torch,
//   64x128x256 ping-pong is the best or tied (1.02-1.12x at <= 32 rows, 0.99-1.01x at 64).
// - above, 128x256x128 cooperative wins (DeepSeek T=4096 1.07-1.17x, Qwen3 GEMM1 1.35-1.5x,
//   Mixtral 1.03-1.55x, 1150-1380 TFLOP/s at >= 1024 rows per expert), except for the shortest K
//   (Qwen3 GEMM2, K=1536: 12 K blocks per tile), where 128x128 ping-pong hides each tile's
//   epilogue under the other warpgroup's MMAs: 1.29-1.35x against 1.18-1.28x. At K=2048
//   (DeepSeek GEMM2) cooperative is already ahead (1.48-1.62x against 1.30-1.48x at T=16384).
// - 2x1 clusters (the weight tile multicast to an expert's two row tiles) were tied or slower.
// - Re-measured on an H200 (2026-12-05, bench --ops gemm --T 1024,4096 with each default
//   configuration forced; bench/results/bench_gemm_config_*_NVIDIA_H200_2026-12-05.json): at exactly
//   64 rows per expert (Qwen3-235B and Qwen3-30B-A3B at T = 1024) the 128-row tiles beat 64x128x256
//   ping-pong by 7-9% (Qwen3-235B GEMM1 425 us against 458, GEMM2 228 against 249; Qwen3-30B-A3B
//   GEMM1 119-125 against 129), so the 64-row tiles keep at most 32 rows, where H100 measured them
//   best (1.02-1.12x); 33-63 rows were not measured and take the 128-row tiles. Checked after the
//   change against 64x128x256 forced (bench_fp8_tiles_*): every 64-row case gained, layers 1.02-1.18x
//   (DeepSeek-V3 T = 2048 3179 us against 3757), the <= 32-row ones unchanged (0.99-1.01x).
const GroupedGemmFp8Kernel& select_grouped_gemm_fp8(int64_t rows, int64_t avg_rows_per_expert, int64_t k) {
  if (use_gemv(kGemvWhen, rows, avg_rows_per_expert)) return k_gemv_rowwise;
  if (avg_rows_per_expert <= 32) return k_pingpong_64x128x256_c1x2;
  if (k <= 1536) return k_pingpong_128x128x128_c1x2;
  return k_coop_128x256x128_c1x2;
}

// Block-scaled: 64-row ping-pong tiles while an expert's rows fit one of them (decode: the GEMM
// streams the weights), 128x128 cooperative above. Measured on H100 against four trial
// configurations (MOE_KERNELS_GEMM_BLOCK_TRIAL; bench/results/gemm_block_configs_*.json), DeepSeek-V3
// and Qwen3-235B shapes, T = 16 .. 16384: at <= 64 rows per expert every configuration streams the
// weights at the same rate (within ~5%, 2x1 clusters slower); above, 128x128 cooperative with 1x2
// clusters is the fastest everywhere (DeepSeek T=16384 GEMM1 8.3 ms against 9.0 (1x1 cluster),
// 9.5 (2x1) and 10.9-20 ms (64-row ping-pong)). Wider tiles are not an option: the blockwise
// mainloop holds a second fp32 accumulator for the per-K-block promotion, so a 64x256 warpgroup
// tile would need ~256 registers per thread, and N tiles must be whole 128-wide scale blocks.
const GroupedGemmFp8Kernel& select_grouped_gemm_fp8_block(int64_t rows, int64_t avg_rows_per_expert, int64_t /*k*/) {
  if (use_gemv(kBlockGemvWhen, rows, avg_rows_per_expert)) return k_block_gemv;
  if (avg_rows_per_expert <= 64) return k_block_pingpong_64x128x128_c1x1;
  return k_block_coop_128x128x128_c1x2;
}

}  // namespace moe_kernels
