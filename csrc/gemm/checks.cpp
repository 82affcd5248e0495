#include "gemm/checks.h"

#include <utility>

namespace moe_kernels {

void check_grouped_gemm_fp8_args(const Tensor& a, const Tensor& b, const Tensor& a_scales,
                                 const Tensor& b_scales, const Tensor& expert_offsets,
                                 std::optional<ScalarType> out_dtype, const char* op) {
  STD_TORCH_CHECK(a.dim() == 2, op, ": a must be 2-D [M, K], got shape ", shape_of(a));
  STD_TORCH_CHECK(b.dim() == 3, op, ": b must be 3-D [E, N, K], got shape ", shape_of(b));
  STD_TORCH_CHECK(a.scalar_type() == kFloat8, op, ": a must be float8_e4m3fn, got ", a.scalar_type());
  STD_TORCH_CHECK(b.scalar_type() == kFloat8, op, ": b must be float8_e4m3fn, got ", b.scalar_type());
  const std::pair<const char*, const Tensor*> named[] = {
      {"a", &a}, {"b", &b}, {"a_scales", &a_scales}, {"b_scales", &b_scales}, {"expert_offsets", &expert_offsets}};
  for (const auto& [name, t] : named) {
    STD_TORCH_CHECK(same_device(*t, a), op, ": ", name, " must be on ", device_of(a), " (as a), got ", device_of(*t));
    STD_TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  }
  const int64_t K = a.size(1);
  STD_TORCH_CHECK(b.size(2) == K, op, ": b must have K=", K, " columns (as a), got shape ", shape_of(b));
  // TMA needs 16-byte aligned rows: K e4m3 elements for a and b, N bf16 elements for the output.
  STD_TORCH_CHECK(K % 16 == 0 && K > 0, op, ": K must be a positive multiple of 16, got ", K);
  STD_TORCH_CHECK(b.size(1) % 8 == 0 && b.size(1) > 0, op, ": N must be a positive multiple of 8, got ", b.size(1));
  const int64_t E = b.size(0);
  STD_TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) == E + 1, op,
              ": expert_offsets must have shape [", E + 1, "] (E + 1), got ", shape_of(expert_offsets));
  STD_TORCH_CHECK(expert_offsets.scalar_type() == kLong, op, ": expert_offsets must be int64, got ",
              expert_offsets.scalar_type());
  STD_TORCH_CHECK(a_scales.scalar_type() == kFloat, op, ": a_scales must be float32, got ", a_scales.scalar_type());
  STD_TORCH_CHECK(b_scales.scalar_type() == kFloat, op, ": b_scales must be float32, got ", b_scales.scalar_type());
  const int64_t M = a.size(0);
  const int64_t N = b.size(1);
  if (b_scales.dim() == 3) {
    // Block-scaled (the DeepSeek-V3 / Qwen3-FP8 checkpoint format): 128x128 weight blocks and
    // 1x128 activation groups, so both GEMM extents that carry scales are whole blocks.
    STD_TORCH_CHECK(K % 128 == 0, op, ": block-scaled (3-D b_scales) needs K to be a multiple of 128, got K=", K);
    STD_TORCH_CHECK(N % 128 == 0, op, ": block-scaled (3-D b_scales) needs N to be a multiple of 128, got N=", N);
    STD_TORCH_CHECK(b_scales.size(0) == E && b_scales.size(1) == N / 128 && b_scales.size(2) == K / 128, op,
                ": b_scales must be [E, N/128, K/128] = [", E, ", ", N / 128, ", ", K / 128,
                "] (one per 128x128 weight block), got shape ", shape_of(b_scales));
    STD_TORCH_CHECK(a_scales.dim() == 2 && a_scales.size(0) == M && a_scales.size(1) == K / 128, op,
                ": with block-scaled b_scales, a_scales must be [M, K/128] = [", M, ", ", K / 128,
                "] (one per row per 128 columns), got shape ", shape_of(a_scales));
  } else {
    STD_TORCH_CHECK(a_scales.numel() == 1 || (a_scales.numel() == M && (a_scales.dim() == 1 ||
                                                                     (a_scales.dim() == 2 && a_scales.size(1) == 1))),
                op, ": a_scales must be [1] (per tensor) or [M] / [M, 1] (per token, M=", M, "), got shape ",
                shape_of(a_scales), " (or [M, K/128] with 3-D block-scaled b_scales)");
    const bool b_per_expert =
        b_scales.numel() == E && (b_scales.dim() == 1 || (b_scales.dim() == 2 && b_scales.size(1) == 1));
    const bool b_per_channel = b_scales.dim() == 2 && b_scales.size(0) == E && b_scales.size(1) == N;
    STD_TORCH_CHECK(b_per_expert || b_per_channel, op, ": b_scales must be [E] = [", E, "] (per expert), [E, N] = [", E,
                ", ", N, "] (per output channel) or [E, N/128, K/128] (per 128x128 block), got shape ",
                shape_of(b_scales));
  }
  STD_TORCH_CHECK(!out_dtype || *out_dtype == kBFloat16, op, ": out_dtype must be bfloat16, got ", *out_dtype);
}

}  // namespace moe_kernels
