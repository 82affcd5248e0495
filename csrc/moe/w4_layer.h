// The 4-bit expert layers (cutlass_moe_mxfp4, cutlass_moe_w4a8) composed from the library's ops,
// the format chosen once at the edge (which GEMM op, whether activations go to fp8):
//
//   [fp8: quantize hidden_states per token (or with the static a1_scale)]
//   -> moe_permute (rows, and their per-token scales in the same pass)
//   -> 4-bit GEMM1 with w1_bias and the gated activation fused in its epilogue -> [M, I] bf16
//   -> [fp8: quantize per token (or with the static a2_scale)]
//   -> 4-bit GEMM2 with w2_bias -> [M, H] bf16
//   -> moe_unpermute with topk_weights -> [T, H] bf16
//
// Registered for CUDA and CPU, as cutlass_moe_fp8: each step calls the C++ implementation of the
// inputs' device directly (the CUDA kernels, or the CPU references), with no boxed dispatcher call
// per step. Every argument is checked here first, so the messages name the layer's arguments.
#pragma once

#include <string>
#include <string_view>

#include "common/limits.h"
#include "common/stable_glue.h"
#include "gemm/w4_glue.h"
#include "permute/cpu_reference.h"
#include "permute/glue.h"
#include "quant/cpu_reference.h"
#include "quant/glue.h"

namespace moe_kernels::w4layer {
// Internal to each layer's translation unit (torch's stable Tensor has hidden visibility, so
// structs holding one must not be exported either).
namespace {

struct LayerFormat {
  const char* op;             // "cutlass_moe_mxfp4" (messages)
  w4::WeightFormat format;
  int64_t group;              // weight scale group along K: 32 (MXFP4) or 128 (INT4)
  ScalarType scale_dtype;     // uint8 (E8M0) or float32
  const char* scale_what;     // "uint8 (E8M0 exponents)" / "float32"
};

struct LayerArgs {
  const Tensor& hidden_states;
  const Tensor& w1;
  const Tensor& w2;
  const Tensor& topk_weights;
  const Tensor& topk_ids;
  const Tensor& w1_scale;
  const Tensor& w2_scale;
  const std::optional<Tensor>& a1_scale;  // static per-tensor scales (W4A8), or None: per token
  const std::optional<Tensor>& a2_scale;
  const std::string& activation;
  bool gate_up_interleaved;
  double swiglu_alpha;
  double swiglu_limit;
  const std::optional<Tensor>& w1_bias;
  const std::optional<Tensor>& w2_bias;
  bool fp8;  // quantize activations to float8_e4m3fn before each GEMM
  const std::optional<Tensor>& expert_map;
  int64_t num_local_experts;
};

void check_weight(const LayerFormat& f, const char* name, const char* what, const Tensor& w, int64_t E,
                         int64_t N, int64_t K, const Tensor& ref) {
  STD_TORCH_CHECK(w.dim() == 3 && w.size(0) == E && w.size(1) == N && w.size(2) == K / 2, f.op, ": ", name,
                  " must be uint8 ", what, " = [", E, ", ", N, ", ", K / 2, "], got shape ", shape_of(w));
  STD_TORCH_CHECK(w.scalar_type() == kByte, f.op, ": ", name, " must be uint8 (two 4-bit codes a byte), got ",
                  dtype_name(w.scalar_type()));
  check_contiguous(f.op, name, w);
  check_same_device(f.op, name, w, "hidden_states", ref);
}

// name [E, N, K/group] in the format's scale dtype; rows, cols name N and K in messages ("2I", "H").
void check_scale(const LayerFormat& f, const char* name, const char* rows, const char* cols, const Tensor& s, int64_t E,
                 int64_t N, int64_t K, const Tensor& ref) {
  STD_TORCH_CHECK(s.dim() == 3 && s.size(0) == E && s.size(1) == N && s.size(2) == K / f.group, f.op, ": ", name,
                  " must be [E, ", rows, ", ", cols, "/", f.group, "] = [", E, ", ", N, ", ", K / f.group,
                  "], got shape ", shape_of(s));
  STD_TORCH_CHECK(s.scalar_type() == f.scale_dtype, f.op, ": ", name, " must be ", f.scale_what, ", got ",
                  dtype_name(s.scalar_type()));
  check_contiguous(f.op, name, s);
  check_same_device(f.op, name, s, "hidden_states", ref);
}

void check_bias(const LayerFormat& f, const char* name, const char* what, const std::optional<Tensor>& b,
                       int64_t E, int64_t N, const Tensor& ref) {
  if (!b) return;
  STD_TORCH_CHECK(b->dim() == 2 && b->size(0) == E && b->size(1) == N, f.op, ": ", name, " must be ", what, " = [",
                  E, ", ", N, "], got shape ", shape_of(*b));
  STD_TORCH_CHECK(b->scalar_type() == kFloat, f.op, ": ", name, " must be float32, got ", dtype_name(b->scalar_type()));
  check_contiguous(f.op, name, *b);
  check_same_device(f.op, name, *b, "hidden_states", ref);
}

void check_static_scale(const LayerFormat& f, const char* name, const std::optional<Tensor>& s,
                               const Tensor& ref) {
  if (!s) return;
  STD_TORCH_CHECK(s->numel() == 1 && s->dim() <= 1, f.op, ": ", name,
                  " must be [1] (a static per-tensor scale) or None (dynamic per token), got shape ", shape_of(*s));
  STD_TORCH_CHECK(s->scalar_type() == kFloat, f.op, ": ", name, " must be float32, got ", dtype_name(s->scalar_type()));
  check_same_device(f.op, name, *s, "hidden_states", ref);
}

// Steps of the composition, on the implementation of the inputs' device.
struct Steps {
  bool on_cuda;
  std::tuple<Tensor, Tensor> quant_per_token(const Tensor& x, const std::optional<Tensor>& scale) const {
    return on_cuda ? cuda::scaled_fp8_quant(x, scale, true) : cpu::scaled_fp8_quant(x, scale, true);
  }
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> permute(const Tensor& x, const Tensor& ids, int64_t E,
                                                             const std::optional<Tensor>& map, int64_t local,
                                                             const std::optional<Tensor>& scales) const {
    return on_cuda ? cuda::moe_permute(x, ids, E, map, local, 0, scales)
                   : cpu::moe_permute(x, ids, E, map, local, 0, scales);
  }
  Tensor unpermute(const Tensor& rows, const Tensor& w, const Tensor& inv) const {
    return on_cuda ? cuda::moe_unpermute(rows, w, inv) : cpu::moe_unpermute(rows, w, inv);
  }
};

Tensor run(const LayerFormat& f, const LayerArgs& a) {
  const char* op = f.op;
  const Tensor& x = a.hidden_states;
  check_dim(op, "hidden_states", x, 2, "[T, H]");
  STD_TORCH_CHECK(x.scalar_type() == kBFloat16, op, ": hidden_states must be bfloat16, got ",
                  dtype_name(x.scalar_type()));
  check_contiguous(op, "hidden_states", x);
  const int64_t T = x.size(0);
  const int64_t H = x.size(1);
  STD_TORCH_CHECK(a.w1.dim() == 3 && a.w2.dim() == 3, op, ": w1 must be [E, 2I, H/2] and w2 [E, H, I/2], got ",
                  shape_of(a.w1), " and ", shape_of(a.w2));
  const int64_t E = a.w1.size(0);
  const int64_t I = a.w2.size(2) * 2;
  STD_TORCH_CHECK(H % f.group == 0 && H > 0, op, ": H (hidden_states.size(1)) must be a positive multiple of ",
                  f.group, ", got ", H);
  STD_TORCH_CHECK(I % f.group == 0 && I > 0, op, ": I (2 * w2.size(2)) must be a positive multiple of ", f.group,
                  ", got ", I);
  check_weight(f, "w1", "[E, 2I, H/2]", a.w1, E, 2 * I, H, x);
  check_weight(f, "w2", "[E, H, I/2]", a.w2, E, H, I, x);
  check_scale(f, "w1_scale", "2I", "H", a.w1_scale, E, 2 * I, H, x);
  check_scale(f, "w2_scale", "H", "I", a.w2_scale, E, H, I, x);
  check_bias(f, "w1_bias", "[E, 2I]", a.w1_bias, E, 2 * I, x);
  check_bias(f, "w2_bias", "[E, H]", a.w2_bias, E, H, x);
  const std::string_view act = a.activation;
  STD_TORCH_CHECK(act == "silu" || act == "gelu" || act == "swigluoai", op,
                  ": activation must be \"silu\", \"gelu\" or \"swigluoai\", got \"", a.activation, "\"");

  const Tensor& ids = a.topk_ids;
  check_dim(op, "topk_ids", ids, 2, "[T, K]");
  STD_TORCH_CHECK(ids.scalar_type() == kInt || ids.scalar_type() == kLong, op,
                  ": topk_ids must be int32 or int64, got ", dtype_name(ids.scalar_type()));
  STD_TORCH_CHECK(ids.size(0) == T && ids.size(1) >= 1 && ids.size(1) <= kMaxTopK, op,
                  ": topk_ids must be [T, K] with T=", T, " and 1 <= K <= ", kMaxTopK, ", got shape ", shape_of(ids));
  check_contiguous(op, "topk_ids", ids);
  check_same_device(op, "topk_ids", ids, "hidden_states", x);
  const Tensor& tw = a.topk_weights;
  STD_TORCH_CHECK(tw.dim() == 2 && tw.size(0) == T && tw.size(1) == ids.size(1), op,
                  ": topk_weights must be [T, K] as topk_ids ", shape_of(ids), ", got shape ", shape_of(tw));
  STD_TORCH_CHECK(tw.scalar_type() == kFloat, op, ": topk_weights must be float32, got ", dtype_name(tw.scalar_type()));
  check_contiguous(op, "topk_weights", tw);
  check_same_device(op, "topk_weights", tw, "hidden_states", x);

  int64_t num_experts = E;
  if (a.expert_map) {
    const Tensor& map = *a.expert_map;
    STD_TORCH_CHECK(map.dim() == 1 && map.size(0) >= E, op, ": expert_map must be [E_global] int32 with E_global >= ",
                    E, " (w1.size(0)), got shape ", shape_of(map));
    STD_TORCH_CHECK(map.scalar_type() == kInt, op, ": expert_map must be int32, got ", dtype_name(map.scalar_type()));
    check_contiguous(op, "expert_map", map);
    check_same_device(op, "expert_map", map, "hidden_states", x);
    num_experts = map.size(0);
  }
  STD_TORCH_CHECK(a.num_local_experts == -1 || a.num_local_experts == E, op, ": num_local_experts must be -1 or ", E,
                  " (w1.size(0)), got ", a.num_local_experts);
  STD_TORCH_CHECK(E <= kMaxSortExperts, op, ": at most ", kMaxSortExperts, " local experts are supported, got ", E);
  check_static_scale(f, "a1_scale", a.a1_scale, x);
  check_static_scale(f, "a2_scale", a.a2_scale, x);

  using Opt = std::optional<Tensor>;
  const Steps step{x.is_cuda()};
  if (step.on_cuda) check_w4_gemm_arch(op, x);
  const char* gemm_op = f.format == w4::WeightFormat::kMxfp4 ? "grouped_gemm_mxfp4" : "grouped_gemm_w4a8";
  auto gemm = [&](const Tensor& rows, const Tensor& w, const Tensor& s, const Tensor& offsets, const Opt& a_scale,
                  const Opt& bias, const std::string& act) {
    return grouped_gemm_w4(gemm_op, f.format, step.on_cuda, rows, w, s, offsets, a_scale, bias, act,
                           a.gate_up_interleaved, a.swiglu_alpha, a.swiglu_limit);
  };
  const int64_t local = a.expert_map ? E : -1;
  Tensor rows = x;
  Opt row_scales;  // per-token scales that travel with their rows
  Opt a1s_static;
  if (a.fp8) {
    // Per token unless a static scale is given.
    auto [x_q, a1s] = step.quant_per_token(x, a.a1_scale);
    rows = x_q;
    if (a.a1_scale) a1s_static = a1s; else row_scales = a1s;
  }
  auto [permuted, offsets, inv, perm, permuted_scales] =
      step.permute(rows, ids, num_experts, a.expert_map, local, row_scales);
  rows = Tensor();
  const Opt gemm1_scale = !a.fp8 ? Opt() : a.a1_scale ? a1s_static : Opt(permuted_scales);
  // [M, I] bf16: act(gate + bias, up + bias) of each row's expert.
  Tensor h = gemm(permuted, a.w1, a.w1_scale, offsets, gemm1_scale, a.w1_bias, a.activation);
  permuted = Tensor();  // released once consumed: the peak holds one intermediate, not all
  Opt gemm2_scale;
  if (a.fp8) {
    // Rows no local expert computed (expert_map) hold garbage; per-token scales keep it to them.
    auto [h_q, a2s] = step.quant_per_token(h, a.a2_scale);
    h = h_q;
    gemm2_scale = a2s;
  }
  Tensor y = gemm(h, a.w2, a.w2_scale, offsets, gemm2_scale, a.w2_bias, "none");
  h = Tensor();
  return step.unpermute(y, tw, inv);
}

}  // namespace
}  // namespace moe_kernels::w4layer
