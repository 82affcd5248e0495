// cutlass_moe_fp8: the FP8 expert computation of an MoE layer composed from the library's ops
// (quantize -> permute rows with their scales -> grouped GEMM1 -> (+ w1_bias) gated activation
// (silu, gelu or swigluoai; gate/up halves or interleaved) + quantize -> grouped GEMM2 -> (+
// w2_bias) weighted unpermute), with per-tensor / per-token activation scales and per-expert /
// per-channel weight scales, or in block mode (3-D weight scales: one per 128x128 block;
// activations quantized per token per 128 columns). Registered for CUDA and CPU: each step calls
// the C++ implementation of that device directly (no boxed dispatcher call per step; on torch <
// 2.13 an error raised inside an op called through the dispatcher would lose its text). Every
// argument is checked here first anyway, so the messages name cutlass_moe_fp8's own arguments.
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "common/stable_glue.h"
#include "gemm/glue.h"
#include "permute/cpu_reference.h"
#include "permute/glue.h"
#include "quant/checks.h"
#include "quant/cpu_reference.h"
#include "quant/glue.h"

namespace moe_kernels {
namespace {

// Block-scaled FP8 (DeepSeek-V3, Qwen3-FP8, Kimi-K2): weight scales per 128x128 block, activation
// scales per token per 128 columns.
constexpr int64_t kBlock = 128;

// Block mode: w1_scale [E, 2I/128, H/128] and w2_scale [E, H/128, I/128] float32, the checkpoints'
// weight_scale_inv as stored (gate blocks first, as w1's rows); H and I multiples of 128.
void check_block_mode(const char* op, const Tensor& w1_scale, const Tensor& w2_scale, int64_t E, int64_t H,
                      int64_t I, const std::optional<Tensor>& a2_scale, bool per_act_token, bool per_out_ch) {
  // One weight scale per whole 128x128 block (the other modes need multiples of 16 only).
  STD_TORCH_CHECK(H % kBlock == 0, op, ": block mode (3-D weight scales) needs H (hidden_states.size(1)) to be a ",
                  "multiple of 128, got H=", H, " (whole 128x128 weight blocks; the per-tensor, per-token and ",
                  "per-channel modes need multiples of 16 only)");
  STD_TORCH_CHECK(I % kBlock == 0, op, ": block mode (3-D weight scales) needs I (w2.size(2)) to be a multiple of ",
                  "128, got I=", I, " (whole 128x128 weight blocks; the per-tensor, per-token and per-channel modes ",
                  "need multiples of 16 only)");
  const auto is = [](const Tensor& t, int64_t a, int64_t b, int64_t c) {
    return t.dim() == 3 && t.size(0) == a && t.size(1) == b && t.size(2) == c;
  };
  STD_TORCH_CHECK(is(w1_scale, E, 2 * I / kBlock, H / kBlock), op, ": in block mode w1_scale must be [E, 2I/128, H/128] = [",
                  E, ", ", 2 * I / kBlock, ", ", H / kBlock, "], got shape ", shape_of(w1_scale));
  STD_TORCH_CHECK(is(w2_scale, E, H / kBlock, I / kBlock), op, ": in block mode w2_scale must be [E, H/128, I/128] = [",
                  E, ", ", H / kBlock, ", ", I / kBlock, "], got shape ", shape_of(w2_scale));
  STD_TORCH_CHECK(w1_scale.scalar_type() == kFloat && w2_scale.scalar_type() == kFloat, op,
              ": w1_scale and w2_scale must be float32, got ", w1_scale.scalar_type(), " and ", w2_scale.scalar_type());
  STD_TORCH_CHECK(!a2_scale.has_value(), op, ": a2_scale must be None in block mode (the activations of GEMM2 get ",
              "dynamic scales per token per 128 columns)");
  STD_TORCH_CHECK(!per_act_token, op, ": per_act_token must be False in block mode (activation scales are per token ",
              "per 128 columns)");
  STD_TORCH_CHECK(!per_out_ch, op, ": per_out_ch must be False in block mode (weight scales are per 128x128 block)");
}

// The scale that comes with float8_e4m3fn hidden_states [T, H]: [1] per tensor, [T] / [T, 1] per
// token (not in block mode), [T, H/128] per group (block mode only). Returns whether it is one
// scale per tensor.
bool check_prequantized_scale(const char* op, const std::optional<Tensor>& a1_scale, int64_t T, int64_t H,
                              bool block) {
  STD_TORCH_CHECK(a1_scale.has_value(), op, ": a1_scale is required with float8_e4m3fn hidden_states (it is their ",
              "scale)");
  const Tensor& s = *a1_scale;
  STD_TORCH_CHECK(s.scalar_type() == kFloat, op, ": a1_scale must be float32, got ", s.scalar_type());
  STD_TORCH_CHECK(s.is_contiguous(), op, ": a1_scale must be contiguous");
  if (block) {
    STD_TORCH_CHECK(s.dim() == 2 && s.size(0) == T && s.size(1) == H / kBlock, op,
                ": in block mode a1_scale must be [T, H/128] = [", T, ", ", H / kBlock,
                "] (the scales of per_token_group_quant_fp8) with float8_e4m3fn hidden_states, got shape ", shape_of(s));
    return false;
  }
  const bool per_tensor = s.numel() == 1 && s.dim() <= 1;
  const bool per_token = (s.dim() == 1 && s.size(0) == T) || (s.dim() == 2 && s.size(0) == T && s.size(1) == 1);
  STD_TORCH_CHECK(per_tensor || per_token, op, ": a1_scale must be [1] (per tensor) or [T] / [T, 1] (per token, T=", T,
              ") with float8_e4m3fn hidden_states (per-group scales need block mode: 3-D weight scales), got shape ",
              shape_of(s));
  return per_tensor;
}

// The weight scales as the GEMM takes them: [E] per expert, or [E, N] per channel (given as [E, N] or
// [E, N, 1]); a view, made only when the shape differs (the common [E] case costs nothing).
Tensor gemm_scales(const Tensor& s, bool per_out_ch, int64_t E) {
  if (per_out_ch) {
    if (s.dim() == 2) return s;
    return reshape_to(s, {E, E > 0 ? s.numel() / E : 0});
  }
  if (s.dim() == 1) return s;
  return reshape_to(s, {s.numel()});
}

// w1_bias [E_local, 2I] and w2_bias [E_local, H], float32 on the weights' device. They are not
// added in the GEMM epilogues (that would recompile every CUTLASS translation unit): w1_bias inside
// the activation kernel (before the activation) and w2_bias inside the weighted unpermute (before
// the routing weight), both in fp32, on GEMM outputs already rounded to bf16 (the one difference
// from an in-epilogue bias).
void check_bias(const char* op, const char* name, const std::optional<Tensor>& bias, int64_t E, int64_t N,
                const char* shape, const Tensor& w) {
  if (!bias.has_value()) return;
  const Tensor& b = *bias;
  STD_TORCH_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == N, op, ": ", name, " must be ", shape, " = [", E,
                  ", ", N, "], got shape ", shape_of(b));
  STD_TORCH_CHECK(b.scalar_type() == kFloat, op, ": ", name, " must be float32, got ", b.scalar_type());
  STD_TORCH_CHECK(same_device(b, w), op, ": ", name, " must be on ", device_of(w), " (as the weights), got ",
                  device_of(b));
  check_contiguous(op, name, b);
}

// Steps of the composition, on the implementation of the inputs' device (CUDA or the CPU references).
struct Steps {
  bool on_cuda;
  std::tuple<Tensor, Tensor> group_quant(const Tensor& x, int64_t g) const {
    return on_cuda ? cuda::per_token_group_quant_fp8(x, g, false) : cpu::per_token_group_quant_fp8(x, g, false);
  }
  std::tuple<Tensor, Tensor> quant(const Tensor& x, const std::optional<Tensor>& scale, bool per_token) const {
    return on_cuda ? cuda::scaled_fp8_quant(x, scale, per_token) : cpu::scaled_fp8_quant(x, scale, per_token);
  }
  std::tuple<Tensor, Tensor> act_quant(const Tensor& x, const std::optional<Tensor>& scale, bool per_token, int64_t g,
                                       const std::string& act, bool interleaved, double alpha, double limit,
                                       const std::optional<Tensor>& bias, const std::optional<Tensor>& offsets) const {
    return on_cuda ? cuda::silu_and_mul_quant_fp8(x, scale, per_token, g, act, interleaved, alpha, limit, bias, offsets)
                   : cpu::silu_and_mul_quant_fp8(x, scale, per_token, g, act, interleaved, alpha, limit, bias, offsets);
  }
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> permute(const Tensor& x, const Tensor& ids, int64_t E,
                                                             const std::optional<Tensor>& map, int64_t local,
                                                             const std::optional<Tensor>& scales) const {
    return on_cuda ? cuda::moe_permute(x, ids, E, map, local, 0, scales)
                   : cpu::moe_permute(x, ids, E, map, local, 0, scales);
  }
  Tensor gemm(const Tensor& a, const Tensor& b, const Tensor& as, const Tensor& bs, const Tensor& off) const {
    return on_cuda ? cuda::cutlass_grouped_gemm_fp8(a, b, as, bs, off, std::nullopt)
                   : cpu::cutlass_grouped_gemm_fp8(a, b, as, bs, off, std::nullopt);
  }
  Tensor unpermute(const Tensor& rows, const Tensor& w, const Tensor& inv, const std::optional<Tensor>& bias,
                   const std::optional<Tensor>& offsets) const {
    return on_cuda ? cuda::moe_unpermute(rows, w, inv, bias, offsets) : cpu::moe_unpermute(rows, w, inv, bias, offsets);
  }
};

// Whether GEMM1 runs with the activation and the quantization in its epilogue
// (cutlass_grouped_gemm_fp8_act_quant) instead of the GEMM and silu_and_mul_quant_fp8 apart. The
// default wherever it applies: measured on an H100 (2026-12-05, bench --ops layer) the layer is
// faster with it (gpt-oss-20b T = 4096: 950 us against 1106; Qwen3-235B T = 4096, w1 read as
// interleaved: 1598 against 1722). It needs gate/up interleaved rows (each thread holds a gate and
// its up value), a static per-tensor output scale (a dynamic one needs the maximum over columns
// other tiles hold), per-expert or per-channel weight scales and > 32 rows per expert (where the
// plain GEMM1's tiles, as the fused ones, have K tiles of 128: the same accumulation order, so the
// layer's bytes do not depend on the path). MOE_KERNELS_FUSED_GEMM1=0 turns it off; a plain
// configuration forced through MOE_KERNELS_GEMM_CONFIG runs the plain path, a gated one forces
// the fused configuration.
bool gemm1_epilogue_applies(bool block, bool gate_up_interleaved, const std::optional<Tensor>& a2_scale, int64_t rows,
                            int64_t num_local_experts) {
  const char* fused = std::getenv("MOE_KERNELS_FUSED_GEMM1");
  if (fused != nullptr && std::strcmp(fused, "0") == 0) return false;
  const char* forced = std::getenv("MOE_KERNELS_GEMM_CONFIG");
  if (forced != nullptr && *forced != '\0' && std::strncmp(forced, "gated_", 6) != 0) return false;
  if (block || !gate_up_interleaved || !a2_scale.has_value()) return false;
  if (a2_scale->numel() != 1 || a2_scale->scalar_type() != kFloat) return false;  // the plain path's checks say why
  constexpr int64_t kMinRowsPerExpert = 33;  // below, the plain GEMM takes 64-row tiles or the GEMV
  return num_local_experts > 0 && rows / num_local_experts >= kMinRowsPerExpert;
}

Tensor cutlass_moe_fp8_impl(const Tensor& hidden_states, const Tensor& w1, const Tensor& w2,
                                const Tensor& topk_weights, const Tensor& topk_ids, const Tensor& w1_scale,
                                const Tensor& w2_scale, const std::optional<Tensor>& a1_scale,
                                const std::optional<Tensor>& a2_scale, bool per_act_token, bool per_out_ch,
                                const std::optional<Tensor>& expert_map, int64_t num_local_experts,
                                bool apply_router_weight_on_input, const std::string& activation,
                                bool gate_up_interleaved, double swiglu_alpha, double swiglu_limit,
                                const std::optional<Tensor>& w1_bias, const std::optional<Tensor>& w2_bias) {
  const char* op = "cutlass_moe_fp8";
  parse_activation(op, activation);  // an unknown name fails here, naming this op
  STD_TORCH_CHECK(hidden_states.dim() == 2, op, ": hidden_states must be 2-D [T, H], got shape ", shape_of(hidden_states));
  const auto in_dtype = hidden_states.scalar_type();
  const bool prequantized = in_dtype == kFloat8;
  STD_TORCH_CHECK(in_dtype == kBFloat16 || in_dtype == kHalf || prequantized, op,
              ": hidden_states must be bfloat16, float16 or float8_e4m3fn (already quantized, a1_scale its scale), "
              "got ", in_dtype);
  STD_TORCH_CHECK(w1.dim() == 3 && w2.dim() == 3, op, ": w1 must be [E, 2I, H] and w2 [E, H, I], got ", shape_of(w1),
              " and ", shape_of(w2));
  const int64_t E_local = w1.size(0);
  const int64_t T = hidden_states.size(0);
  const int64_t H = hidden_states.size(1);
  const int64_t I = w2.size(2);
  STD_TORCH_CHECK(w1.size(1) == 2 * I && w1.size(2) == H && w2.size(0) == E_local && w2.size(1) == H, op,
              ": w1 must be [E, 2I, H] = [", E_local, ", ", 2 * I, ", ", H, "] and w2 [E, H, I] = [", E_local, ", ", H,
              ", ", I, "], got ", shape_of(w1), " and ", shape_of(w2));
  STD_TORCH_CHECK(same_shape(topk_weights, topk_ids) && topk_ids.dim() == 2 && topk_ids.size(0) == T, op,
              ": topk_weights and topk_ids must be [T, K] with T=", T, ", got ", shape_of(topk_weights), " and ",
              shape_of(topk_ids));
  check_bias(op, "w1_bias", w1_bias, E_local, 2 * I, "[E_local, 2I]", w1);
  check_bias(op, "w2_bias", w2_bias, E_local, H, "[E_local, H]", w2);

  // Block mode is chosen by 3-D weight scales; otherwise [E] per expert or [E, N] per channel.
  const bool block = w1_scale.dim() == 3 || w2_scale.dim() == 3;
  Tensor w1s = w1_scale;
  Tensor w2s = w2_scale;
  if (block) {
    check_block_mode(op, w1_scale, w2_scale, E_local, H, I, a2_scale, per_act_token, per_out_ch);
    STD_TORCH_CHECK(prequantized || !a1_scale.has_value(), op, ": a1_scale must be None in block mode with ",
                in_dtype, " hidden_states (activation scales are computed per token per 128 columns)");
  } else {
    // The grouped GEMM's TMA loads need 16-byte aligned rows: K (H for GEMM1, I for GEMM2) a
    // multiple of 16 e4m3 values; its bf16 outputs (2I and H columns) then are too. No other rule:
    // tiles cover partial blocks (gpt-oss's H = I = 2880 is 22.5 tiles of 128).
    STD_TORCH_CHECK(H % 16 == 0 && H > 0, op, ": H (hidden_states.size(1)) must be a positive multiple of 16 ",
                    "(16-byte aligned rows of e4m3 for the grouped GEMM's TMA loads), got H=", H);
    STD_TORCH_CHECK(I % 16 == 0 && I > 0, op, ": I (w2.size(2)) must be a positive multiple of 16 (16-byte aligned ",
                    "rows of e4m3 for the grouped GEMM's TMA loads), got I=", I);
    // [E] per expert, or [E, N] per output channel (as [E, N] or [E, N, 1]).
    STD_TORCH_CHECK(w1_scale.numel() == (per_out_ch ? 2 * I : 1) * E_local &&
                        w2_scale.numel() == (per_out_ch ? H : 1) * E_local,
                op, ": w1_scale and w2_scale must be [E] per expert, or [E, 2I] and [E, H] with per_out_ch, or ",
                "[E, 2I/128, H/128] and [E, H/128, I/128] per 128x128 block, got ", shape_of(w1_scale), " and ",
                shape_of(w2_scale));
    w1s = gemm_scales(w1_scale, per_out_ch, E_local);
    w2s = gemm_scales(w2_scale, per_out_ch, E_local);
  }

  int64_t num_experts = E_local;
  if (expert_map) {
    num_experts = expert_map->size(0);
    STD_TORCH_CHECK(num_local_experts == -1 || num_local_experts == E_local, op, ": num_local_experts must be -1 or ",
                E_local, " (w1.size(0)), got ", num_local_experts);
    // Rows of other ranks' experts are never computed, so a dynamic per-tensor scale of GEMM1's
    // output would include rows nobody wrote: the second quantization needs a static, a per-token
    // or (block mode) a per-group scale here.
    STD_TORCH_CHECK(block || a2_scale.has_value() || per_act_token, op,
                ": with expert_map, a2_scale (static) or per_act_token=True is required");
  }

  Tensor x = hidden_states;
  Tensor weights = topk_weights;
  if (apply_router_weight_on_input) {
    STD_TORCH_CHECK(topk_ids.size(1) == 1, op, ": apply_router_weight_on_input needs topk == 1, got ", topk_ids.size(1));
    STD_TORCH_CHECK(!prequantized, op, ": apply_router_weight_on_input needs bfloat16 or float16 hidden_states (the ",
                "weight multiplies them before quantization), got float8_e4m3fn");
    // A rare path (Llama-4 style top-1 routing): aten's ops through the dispatcher.
    const Tensor prod = call_op<Tensor>("aten::mul", "Tensor", torch::stable::to(hidden_states, kFloat),
                                        torch::stable::to(topk_weights, kFloat));
    x = torch::stable::to(prod, in_dtype);
    weights = empty_on({topk_ids.size(0), int64_t{1}}, kFloat, topk_weights);
    torch::stable::fill_(weights, 1.0);
  }
  const Steps step{hidden_states.is_cuda()};
  if (step.on_cuda) check_gemm_arch(op, hidden_states);

  // Quantize once per token (or take the rows as they came, quantized), then move fp8 rows (half
  // the bytes of bf16) with their per-token or per-group scales in the same pass.
  Tensor x_q;
  Tensor a1s;
  bool a1_per_tensor = false;
  if (prequantized) {
    a1_per_tensor = check_prequantized_scale(op, a1_scale, T, H, block);
    x_q = hidden_states;
    a1s = *a1_scale;
  } else if (block) {
    std::tie(x_q, a1s) = step.group_quant(x, kBlock);  // a1s [T, H/128]
  } else {
    std::tie(x_q, a1s) = step.quant(x, a1_scale, per_act_token);  // a1s [1] or [T, 1]
    a1_per_tensor = !per_act_token || a1_scale.has_value();
  }
  auto [permuted, offsets, inv, perm, permuted_scales] =
      step.permute(x_q, topk_ids, num_experts, expert_map, expert_map ? E_local : -1,
                   a1_per_tensor ? std::nullopt : std::optional<Tensor>(a1s));
  const Tensor gemm1_scales = a1_per_tensor ? a1s : permuted_scales;  // [1], [M, 1] or [M, H/128]

  const auto with_offsets = [&](const std::optional<Tensor>& b) {
    return b ? std::optional<Tensor>(offsets) : std::nullopt;
  };
  Tensor y_q;
  Tensor a2s;
  if (step.on_cuda && gemm1_epilogue_applies(block, gate_up_interleaved, a2_scale, permuted.size(0), E_local)) {
    // GEMM1 with the activation and the quantization in its epilogue: no [M, 2I] bf16 in memory.
    y_q = cuda::cutlass_grouped_gemm_fp8_act_quant(permuted, w1, gemm1_scales, w1s, offsets, *a2_scale, activation,
                                                   swiglu_alpha, swiglu_limit, w1_bias);
    a2s = *a2_scale;
    x_q = Tensor();
    x = Tensor();
    permuted = Tensor();
  } else {
    Tensor h1 = step.gemm(permuted, w1, gemm1_scales, w1s, offsets);  // [M, 2I] bf16
    // Each intermediate is released once consumed, so that the caching allocator reuses its memory
    // for the next one: the peak holds GEMM1's output or GEMM2's, not every step's at once.
    x_q = Tensor();
    x = Tensor();
    permuted = Tensor();
    // The activation of GEMM1's rows (+ w1_bias of each row's expert) fused with their
    // quantization: [M, I] e4m3 with [M, I/128] (block), [1] or [M, 1] scales.
    std::tie(y_q, a2s) = step.act_quant(h1, block ? std::nullopt : a2_scale, block ? false : per_act_token,
                                        block ? kBlock : 0, activation, gate_up_interleaved, swiglu_alpha,
                                        swiglu_limit, w1_bias, with_offsets(w1_bias));
  }
  Tensor h2 = step.gemm(y_q, w2, a2s, w2s, offsets);  // [M, H] bf16
  Tensor out = step.unpermute(h2, weights, inv, w2_bias, with_offsets(w2_bias));
  // Quantized input has no dtype of its own to return to: the output stays bfloat16.
  return prequantized || in_dtype == kBFloat16 ? out : torch::stable::to(out, in_dtype);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) { m.impl("cutlass_moe_fp8", TORCH_BOX(&cutlass_moe_fp8_impl)); }
STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) { m.impl("cutlass_moe_fp8", TORCH_BOX(&cutlass_moe_fp8_impl)); }

}  // namespace moe_kernels
