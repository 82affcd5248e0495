// Torch glue of the FP8 grouped GEMM: checks, scratch and workspace from the caching allocator,
// the launch on the current stream; and the CPU reference (dequantize, fp32 dot products per
// expert). Stable ABI, see common/stable_glue.h.
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "common/stable_glue.h"
#include "gemm/checks.h"
#include "gemm/glue.h"
#include "gemm/launchers.h"

namespace moe_kernels {

int grouped_gemm_sm_count(int device) {
  static std::array<int, 64> cached{};
  if (cached[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cached[device] = n;
  }
  return cached[device];
}

namespace {

// The configuration by rows (in all and per expert), unless MOE_KERNELS_GEMM_CONFIG names one (a
// tuning and testing override, read at each call: it is a host-side getenv, no device work). A
// forced configuration applies to the calls of its kind (block-scaled or not); calls of the other
// kind keep the table's choice, so that forcing one kind leaves a layer mixing both runnable.
const GroupedGemmFp8Kernel& pick_kernel(int64_t rows, int64_t num_experts, int64_t depth, bool block_scaled) {
  const int64_t avg_rows_per_expert = num_experts > 0 ? rows / num_experts : rows;
  const GroupedGemmFp8Kernel& chosen = block_scaled ? select_grouped_gemm_fp8_block(rows, avg_rows_per_expert, depth)
                                                    : select_grouped_gemm_fp8(rows, avg_rows_per_expert, depth);
  const char* forced = std::getenv("MOE_KERNELS_GEMM_CONFIG");
  // A gated name forces the fused GEMM1 (grouped_gemm_fp8_gated.cpp); the plain GEMMs keep their table.
  if (forced == nullptr || forced[0] == '\0' || std::strncmp(forced, "gated_", 6) == 0) return chosen;
  const GroupedGemmFp8Kernel* k = find_grouped_gemm_fp8(forced);
  STD_TORCH_CHECK(k != nullptr, "cutlass_grouped_gemm_fp8: MOE_KERNELS_GEMM_CONFIG=", forced,
                  " names no compiled configuration; see moe_kernels.grouped_gemm_fp8_configs()");
  return k->block_scaled == block_scaled ? *k : chosen;
}

}  // namespace

void check_gemm_arch(const char* op, const Tensor& t) {
  const int device = static_cast<int>(t.get_device_index());
  const int cc = compute_capability(device);
  // sm_90a code runs on compute capability 9.0 only (arch-specific features: wgmma, TMA multicast).
  STD_TORCH_CHECK(cc == 90, op, ": the CUTLASS FP8 grouped GEMMs are built for sm_90a (Hopper: H100, H200, H20) "
                  "only; cuda:", device, " has compute capability ", cc / 10, ".", cc % 10, ". On this GPU the "
                  "routing, permute/unpermute, quantization and expert-parallel ops and the 4-bit layers "
                  "(cutlass_moe_mxfp4, cutlass_moe_w4a8) work (sm_80 and newer), and the HF \"moe_kernels\" "
                  "implementation runs its GEMMs through torch._grouped_mm");
}

namespace cuda {

Tensor cutlass_grouped_gemm_fp8(const Tensor& a, const Tensor& b, const Tensor& a_scales, const Tensor& b_scales,
                                const Tensor& expert_offsets, std::optional<ScalarType> out_dtype) {
  const char* op = "cutlass_grouped_gemm_fp8";
  check_grouped_gemm_fp8_args(a, b, a_scales, b_scales, expert_offsets, out_dtype);
  check_gemm_arch(op, a);
  const CudaDeviceScope scope(a);
  const int E = static_cast<int>(b.size(0));
  Tensor out = empty_on({a.size(0), b.size(1)}, kBFloat16, a);
  if (a.size(0) == 0 || E == 0) return out;
  const int sms = grouped_gemm_sm_count(static_cast<int>(a.get_device_index()));
  const bool block_scaled = b_scales.dim() == 3;
  const GroupedGemmFp8Kernel& kernel = pick_kernel(a.size(0), E, a.size(1), block_scaled);
  Tensor scratch = empty_on({static_cast<int64_t>(kernel.scratch_bytes(E))}, kByte, a);
  Tensor workspace = empty_on({static_cast<int64_t>(kernel.workspace_bytes(sms)) + 1}, kByte, a);
  GroupedGemmFp8Args args{a.data_ptr(),
                          b.data_ptr(),
                          cptr<float>(a_scales),
                          cptr<float>(b_scales),
                          cptr<int64_t>(expert_offsets),
                          out.data_ptr(),
                          a.size(0),
                          E,
                          static_cast<int>(b.size(1)),
                          static_cast<int>(a.size(1)),
                          scratch.data_ptr(),
                          workspace.data_ptr(),
                          sms,
                          /*a_per_token=*/a_scales.numel() != 1,
                          /*b_per_channel=*/b_scales.numel() != E,
                          block_scaled};
  const char* err = kernel.launch(args, current_stream(a));
  STD_TORCH_CHECK(err[0] == '\0', op, " (", kernel.name, "): ", err);
  return out;
}

}  // namespace cuda

namespace cpu {

// The specification: rows of expert e times its dequantized weight, dot products in fp32 (K order),
// rounded once to bf16. Per tensor/token/channel: bf16(sa * sb * sum_k a*b); block-scaled: the sum
// of the dequantized products (a * a_scale of its 128-column group) * (b * scale of its 128x128 block).
Tensor cutlass_grouped_gemm_fp8(const Tensor& a, const Tensor& b, const Tensor& a_scales, const Tensor& b_scales,
                                const Tensor& expert_offsets, std::optional<ScalarType> out_dtype) {
  check_grouped_gemm_fp8_args(a, b, a_scales, b_scales, expert_offsets, out_dtype);
  const int64_t E = b.size(0), M = a.size(0), N = b.size(1), K = a.size(1);
  Tensor out = empty_on({M, N}, kBFloat16, a);
  const int64_t* off = cptr<int64_t>(expert_offsets);
  // The reference can afford to read the offsets: it rejects what the CUDA path only clamps.
  for (int64_t e = 0; e <= E; ++e) {
    STD_TORCH_CHECK(off[e] >= (e == 0 ? 0 : off[e - 1]) && off[e] <= M,
                    "cutlass_grouped_gemm_fp8: expert_offsets must be non-decreasing within [0, M=", M, "], got ",
                    off[e], " at index ", e);
  }
  const auto* ap = cptr<Float8_e4m3fn>(a);
  const auto* bp = cptr<Float8_e4m3fn>(b);
  const float* as = cptr<float>(a_scales);
  const float* bs = cptr<float>(b_scales);
  BFloat16* op = ptr<BFloat16>(out);
  const bool block = b_scales.dim() == 3;
  const bool per_token = a_scales.numel() != 1;
  const bool per_channel = b_scales.numel() != E;
  const int64_t KB = K / 128, NB = N / 128;
  std::vector<float> x(K), w(N * K);
  for (int64_t e = 0; e < E; ++e) {
    if (off[e + 1] <= off[e]) continue;
    // Expert e's weight as fp32, dequantized per 128x128 block in block mode.
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const float v = static_cast<float>(bp[(e * N + n) * K + k]);
        w[n * K + k] = block ? v * bs[(e * NB + n / 128) * KB + k / 128] : v;
      }
    for (int64_t m = off[e]; m < off[e + 1]; ++m) {
      for (int64_t k = 0; k < K; ++k) {
        const float v = static_cast<float>(ap[m * K + k]);
        x[k] = block ? v * as[m * KB + k / 128] : v;
      }
      const float sa = block ? 1.f : as[per_token ? m : 0];
      for (int64_t n = 0; n < N; ++n) {
        float acc = 0.f;
        const float* wr = w.data() + n * K;
        for (int64_t k = 0; k < K; ++k) acc += x[k] * wr[k];
        if (!block) acc = acc * sa * bs[per_channel ? e * N + n : e];
        op[m * N + n] = BFloat16(acc);
      }
    }
  }
  return out;
}

}  // namespace cpu

std::vector<std::string> grouped_gemm_fp8_configs() {
  std::vector<std::string> names;
  for (int i = 0; i < grouped_gemm_fp8_config_count(); ++i) names.emplace_back(grouped_gemm_fp8_config(i).name);
  return names;
}

// The configuration a call with M = rows, E = num_experts and this K runs (MOE_KERNELS_GEMM_CONFIG
// included): what the tests and the benchmark read to know which kernel ran.
std::string grouped_gemm_fp8_choice(int64_t rows, int64_t num_experts, int64_t k, bool block_scaled) {
  STD_TORCH_CHECK(rows >= 0 && num_experts >= 0 && k > 0, "grouped_gemm_fp8_choice: rows and num_experts must be "
                  ">= 0 and k > 0, got rows=", rows, ", num_experts=", num_experts, ", k=", k);
  return pick_kernel(rows, num_experts, k, block_scaled).name;
}

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("cutlass_grouped_gemm_fp8", TORCH_BOX(&cuda::cutlass_grouped_gemm_fp8));
}
STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("cutlass_grouped_gemm_fp8", TORCH_BOX(&cpu::cutlass_grouped_gemm_fp8));
}
// No tensor argument, hence no dispatch key to pick a backend: one kernel for all.
STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CompositeExplicitAutograd, m) {
  m.impl("grouped_gemm_fp8_configs", TORCH_BOX(&grouped_gemm_fp8_configs));
  m.impl("grouped_gemm_fp8_choice", TORCH_BOX(&grouped_gemm_fp8_choice));
}

}  // namespace moe_kernels
