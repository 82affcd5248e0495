// Torch glue of the FP8 grouped GEMM: checks, scratch and workspace from the caching allocator,
// the launch on the current stream; and the CPU reference (dequantize, matmul per expert).
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/torch_glue.h"
#include "gemm/checks.h"
#include "gemm/launchers.h"
#include "moe_kernels/gemm.h"

namespace moe_kernels {
namespace {

int sm_count(int device) {
  static std::array<int, 64> cached{};
  if (cached[device] == 0) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
    cached[device] = n;
  }
  return cached[device];
}

// The configuration by rows per expert, unless MOE_KERNELS_GEMM_CONFIG names one (a tuning and
// testing override, read at each call: it is a host-side getenv, no device work). A forced
// configuration applies to the calls of its kind (block-scaled or not); calls of the other kind
// keep the table's choice, so that forcing one kind leaves a layer mixing both runnable.
const GroupedGemmFp8Kernel& pick_kernel(int64_t avg_rows_per_expert, int64_t depth, bool block_scaled) {
  const GroupedGemmFp8Kernel& chosen = block_scaled ? select_grouped_gemm_fp8_block(avg_rows_per_expert, depth)
                                                    : select_grouped_gemm_fp8(avg_rows_per_expert, depth);
  const char* forced = std::getenv("MOE_KERNELS_GEMM_CONFIG");
  if (forced == nullptr || forced[0] == '\0') return chosen;
  const GroupedGemmFp8Kernel* k = find_grouped_gemm_fp8(forced);
  TORCH_CHECK(k != nullptr, "cutlass_grouped_gemm_fp8: MOE_KERNELS_GEMM_CONFIG=", forced,
              " names no compiled configuration; see moe_kernels.grouped_gemm_fp8_configs()");
  return k->block_scaled == block_scaled ? *k : chosen;
}

at::Tensor grouped_gemm_fp8_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scales,
                                 const at::Tensor& b_scales, const at::Tensor& expert_offsets,
                                 std::optional<at::ScalarType> out_dtype) {
  check_grouped_gemm_fp8_args(a, b, a_scales, b_scales, expert_offsets, out_dtype);
  const c10::cuda::CUDAGuard guard(a.device());
  const int E = static_cast<int>(b.size(0));
  auto out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kBFloat16));
  if (a.size(0) == 0 || E == 0) return out;
  const int sms = sm_count(a.get_device());
  const bool block_scaled = b_scales.dim() == 3;
  const GroupedGemmFp8Kernel& kernel = pick_kernel(a.size(0) / E, a.size(1), block_scaled);
  auto bytes = a.options().dtype(at::kByte);
  at::Tensor scratch = at::empty({static_cast<int64_t>(kernel.scratch_bytes(E))}, bytes);
  at::Tensor workspace = at::empty({static_cast<int64_t>(kernel.workspace_bytes(sms)) + 1}, bytes);
  GroupedGemmFp8Args args{a.data_ptr(),
                          b.data_ptr(),
                          a_scales.data_ptr<float>(),
                          b_scales.data_ptr<float>(),
                          expert_offsets.data_ptr<int64_t>(),
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
  const char* err = kernel.launch(args, current_stream());
  TORCH_CHECK(err[0] == '\0', "cutlass_grouped_gemm_fp8 (", kernel.name, "): ", err);
  return out;
}

// The specification: rows of expert e times its dequantized weight, in fp32, rounded once to bf16.
at::Tensor grouped_gemm_fp8_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scales,
                                const at::Tensor& b_scales, const at::Tensor& expert_offsets,
                                std::optional<at::ScalarType> out_dtype) {
  check_grouped_gemm_fp8_args(a, b, a_scales, b_scales, expert_offsets, out_dtype);
  const int64_t E = b.size(0);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kBFloat16));
  const int64_t* off = expert_offsets.data_ptr<int64_t>();
  // The reference can afford to read the offsets: it rejects what the CUDA path only clamps.
  for (int64_t e = 0; e <= E; ++e) {
    TORCH_CHECK(off[e] >= (e == 0 ? 0 : off[e - 1]) && off[e] <= a.size(0),
                "cutlass_grouped_gemm_fp8: expert_offsets must be non-decreasing within [0, M=", a.size(0), "], got ",
                off[e], " at index ", e);
  }
  if (b_scales.dim() == 3) {
    // Block-scaled: dequantize each 128-column group of a row and each 128x128 block of a weight,
    // then one fp32 matmul (the same sum as scaling each K block's partial sum).
    const at::Tensor a_deq = a.to(at::kFloat) * a_scales.repeat_interleave(128, 1);
    for (int64_t e = 0; e < E; ++e) {
      if (off[e + 1] <= off[e]) continue;
      const at::Tensor w = b[e].to(at::kFloat) * b_scales[e].repeat_interleave(128, 0).repeat_interleave(128, 1);
      out.slice(0, off[e], off[e + 1]).copy_(at::matmul(a_deq.slice(0, off[e], off[e + 1]), w.t()));
    }
    return out;
  }
  // a_scale: [1, 1] or [M, 1]; b_scale of expert e: [1] or [N] (broadcast over rows).
  const at::Tensor as = a_scales.reshape({-1, 1});
  const bool per_token = a_scales.numel() != 1;
  const bool per_channel = b_scales.numel() != E;
  for (int64_t e = 0; e < E; ++e) {
    if (off[e + 1] <= off[e]) continue;
    const at::Tensor rows = a.slice(0, off[e], off[e + 1]).to(at::kFloat);
    const at::Tensor w = b[e].to(at::kFloat);
    const at::Tensor sa = per_token ? as.slice(0, off[e], off[e + 1]) : as;
    const at::Tensor sb = per_channel ? b_scales[e] : b_scales.reshape({-1}).slice(0, e, e + 1);
    out.slice(0, off[e], off[e + 1]).copy_(at::matmul(rows, w.t()).mul_(sa).mul_(sb));
  }
  return out;
}

}  // namespace

at::Tensor cutlass_grouped_gemm_fp8(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scales,
                                    const at::Tensor& b_scales, const at::Tensor& expert_offsets,
                                    std::optional<at::ScalarType> out_dtype) {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("moe_kernels::cutlass_grouped_gemm_fp8", "")
                           .typed<decltype(cutlass_grouped_gemm_fp8)>();
  return handle.call(a, b, a_scales, b_scales, expert_offsets, out_dtype);
}

std::vector<std::string> grouped_gemm_fp8_configs() {
  std::vector<std::string> names;
  for (int i = 0; i < grouped_gemm_fp8_config_count(); ++i) names.emplace_back(grouped_gemm_fp8_config(i).name);
  return names;
}

TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) { m.impl("cutlass_grouped_gemm_fp8", &grouped_gemm_fp8_cuda); }
TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) { m.impl("cutlass_grouped_gemm_fp8", &grouped_gemm_fp8_cpu); }

}  // namespace moe_kernels
