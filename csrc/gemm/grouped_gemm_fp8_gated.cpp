// Torch glue of cutlass_grouped_gemm_fp8_act_quant: GEMM1 of the FP8 layer with the gated
// activation and the static fp8 quantization of its output in the epilogue
// (grouped_gemm_fp8_gated_sm90.cuh). The CPU implementation is the unfused composition of the
// references it must equal: the grouped GEMM's, then silu_and_mul_quant_fp8's on interleaved rows.
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include "common/expert_bias_checks.h"
#include "common/stable_glue.h"
#include "gemm/checks.h"
#include "gemm/glue.h"
#include "gemm/launchers.h"
#include "quant/checks.h"
#include "quant/cpu_reference.h"

namespace moe_kernels {

#define MOE_KERNELS_GATED_CONFIGS(X) X(pingpong_128x128x128_c1x2) X(coop_128x256x128_c1x2)
#define MOE_KERNELS_DECLARE_GATED(name)                                                                    \
  size_t grouped_gemm_fp8_gated_##name##_scratch_bytes(int);                                              \
  size_t grouped_gemm_fp8_gated_##name##_workspace_bytes(int);                                            \
  const char* launch_grouped_gemm_fp8_gated_##name(const GroupedGemmFp8GatedArgs&, cudaStream_t);         \
  constexpr GroupedGemmFp8GatedKernel k_gated_##name{"gated_" #name, grouped_gemm_fp8_gated_##name##_scratch_bytes, \
                                                     grouped_gemm_fp8_gated_##name##_workspace_bytes,     \
                                                     launch_grouped_gemm_fp8_gated_##name};
MOE_KERNELS_GATED_CONFIGS(MOE_KERNELS_DECLARE_GATED)
#undef MOE_KERNELS_DECLARE_GATED

// The configuration by K, from the layer bench on an H100 (2026-12-05, bench/results/
// bench_layer_fused_gemm1_quad_stores_*.json): ping-pong, whose one warpgroup's epilogue (the
// activation, ~30 instructions per value) runs under the other warpgroup's MMAs, wins where the
// K loop is short (K <= 3072: gpt-oss-20b T = 4096 layer 950 us against 1044 us cooperative,
// Qwen3-30B-A3B 559 against 571); the cooperative 128x256 tile, whose larger tile feeds the tensor
// cores better, wins where it is long (Qwen3-235B K = 4096 T = 4096: 1598 against 1954 us,
// DeepSeek-V3 K = 7168: 5035 against 6327 us), the epilogue then a small share of each tile.
const GroupedGemmFp8GatedKernel* select_grouped_gemm_fp8_gated(const char* forced, int64_t k) {
  if (forced != nullptr && std::strncmp(forced, "gated_", 6) == 0) {
    const GroupedGemmFp8GatedKernel* const kernels[] = {
#define MOE_KERNELS_GATED_ADDRESS(name) &k_gated_##name,
        MOE_KERNELS_GATED_CONFIGS(MOE_KERNELS_GATED_ADDRESS)
#undef MOE_KERNELS_GATED_ADDRESS
    };
    for (const GroupedGemmFp8GatedKernel* kernel : kernels) {
      if (std::strcmp(kernel->name, forced) == 0) return kernel;
    }
    return nullptr;
  }
  constexpr int64_t kLongK = 3072;
  return k <= kLongK ? &k_gated_pingpong_128x128x128_c1x2 : &k_gated_coop_128x256x128_c1x2;
}

namespace {

constexpr const char* kOp = "cutlass_grouped_gemm_fp8_act_quant";

// The GEMM's own checks (a, b, scales, offsets: per tensor/token/channel only), then the output
// scale, the activation and the bias.
GatedActivation check_act_quant_args(const Tensor& a, const Tensor& b, const Tensor& a_scales, const Tensor& b_scales,
                                     const Tensor& expert_offsets, const Tensor& out_scale,
                                     const std::string& activation, const std::optional<Tensor>& bias) {
  STD_TORCH_CHECK(b_scales.dim() != 3, kOp, ": block-scaled weights (3-D b_scales) are not supported: their "
                  "activations need a per-group output scale; use cutlass_grouped_gemm_fp8 + silu_and_mul_quant_fp8");
  check_grouped_gemm_fp8_args(a, b, a_scales, b_scales, expert_offsets, std::nullopt, kOp);
  STD_TORCH_CHECK(b.size(1) % 2 == 0, kOp, ": b must have an even number of rows N (gate and up interleaved), got ",
                  b.size(1));
  STD_TORCH_CHECK(out_scale.numel() == 1, kOp, ": out_scale must hold one value (a static per-tensor scale), got shape ",
                  shape_of(out_scale));
  STD_TORCH_CHECK(out_scale.scalar_type() == kFloat, kOp, ": out_scale must be float32, got ", out_scale.scalar_type());
  check_same_device(kOp, "out_scale", out_scale, "a", a);
  const GatedActivation act = parse_activation(kOp, activation);
  // [E, N]: E from expert_offsets, which the GEMM's checks hold to b's E + 1.
  check_expert_bias(kOp, bias, bias ? std::optional<Tensor>(expert_offsets) : std::nullopt, a, "a", b.size(1),
                    "[E, N]", "N from b");
  return act;
}

}  // namespace

namespace cuda {

Tensor cutlass_grouped_gemm_fp8_act_quant(const Tensor& a, const Tensor& b, const Tensor& a_scales,
                                          const Tensor& b_scales, const Tensor& expert_offsets, const Tensor& out_scale,
                                          const std::string& activation, double swiglu_alpha, double swiglu_limit,
                                          const std::optional<Tensor>& bias) {
  const GatedActivation act =
      check_act_quant_args(a, b, a_scales, b_scales, expert_offsets, out_scale, activation, bias);
  check_gemm_arch(kOp, a);
  const CudaDeviceScope scope(a);
  const int E = static_cast<int>(b.size(0));
  Tensor out = empty_on({a.size(0), b.size(1) / 2}, kFloat8, a);
  if (a.size(0) == 0 || E == 0) return out;
  const char* forced = std::getenv("MOE_KERNELS_GEMM_CONFIG");
  const GroupedGemmFp8GatedKernel* kernel = select_grouped_gemm_fp8_gated(forced, a.size(1));
  STD_TORCH_CHECK(kernel != nullptr, kOp, ": MOE_KERNELS_GEMM_CONFIG=", forced, " names no compiled configuration "
                  "(gated ones: gated_pingpong_128x128x128_c1x2, gated_coop_128x256x128_c1x2)");
  const int sms = grouped_gemm_sm_count(static_cast<int>(a.get_device_index()));
  Tensor scratch = empty_on({static_cast<int64_t>(kernel->scratch_bytes(E))}, kByte, a);
  Tensor workspace = empty_on({static_cast<int64_t>(kernel->workspace_bytes(sms)) + 1}, kByte, a);
  GroupedGemmFp8GatedArgs args{};
  args.a = a.data_ptr();
  args.b = b.data_ptr();
  args.a_scale = cptr<float>(a_scales);
  args.b_scale = cptr<float>(b_scales);
  args.expert_offsets = cptr<int64_t>(expert_offsets);
  args.out = out.data_ptr();
  args.m = a.size(0);
  args.num_experts = E;
  args.n = static_cast<int>(b.size(1));
  args.k = static_cast<int>(a.size(1));
  args.scratch = scratch.data_ptr();
  args.workspace = workspace.data_ptr();
  args.sm_count = sms;
  args.a_per_token = a_scales.numel() != 1;
  args.b_per_channel = b_scales.numel() != E;
  args.block_scaled = false;
  args.out_scale = cptr<float>(out_scale);
  args.bias = bias ? cptr<float>(*bias) : nullptr;
  args.activation = static_cast<int>(act);
  args.swiglu_alpha = static_cast<float>(swiglu_alpha);
  args.swiglu_limit = static_cast<float>(swiglu_limit);
  const char* err = kernel->launch(args, current_stream(a));
  STD_TORCH_CHECK(err[0] == '\0', kOp, " (", kernel->name, "): ", err);
  return out;
}

}  // namespace cuda

namespace cpu {

Tensor cutlass_grouped_gemm_fp8_act_quant(const Tensor& a, const Tensor& b, const Tensor& a_scales,
                                          const Tensor& b_scales, const Tensor& expert_offsets, const Tensor& out_scale,
                                          const std::string& activation, double swiglu_alpha, double swiglu_limit,
                                          const std::optional<Tensor>& bias) {
  check_act_quant_args(a, b, a_scales, b_scales, expert_offsets, out_scale, activation, bias);
  const Tensor h = cutlass_grouped_gemm_fp8(a, b, a_scales, b_scales, expert_offsets, std::nullopt);
  auto [q, scale] = silu_and_mul_quant_fp8(h, out_scale, /*per_token=*/false, /*group_size=*/0, activation,
                                           /*gate_up_interleaved=*/true, swiglu_alpha, swiglu_limit, bias,
                                           bias ? std::optional<Tensor>(expert_offsets) : std::nullopt);
  return q;
}

}  // namespace cpu

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("cutlass_grouped_gemm_fp8_act_quant", TORCH_BOX(&cuda::cutlass_grouped_gemm_fp8_act_quant));
}
STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("cutlass_grouped_gemm_fp8_act_quant", TORCH_BOX(&cpu::cutlass_grouped_gemm_fp8_act_quant));
}

}  // namespace moe_kernels
