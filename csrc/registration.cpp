// Every schema of the library, in one place (the schemas are public API: unchanged by the move to
// the stable ABI). Implementations register per dispatch key beside their glue
// (csrc/<capability>/ops.cpp, STABLE_TORCH_LIBRARY_IMPL); fake (meta) kernels live in
// python/moe_kernels/ops/.
#include "common/stable_glue.h"

STABLE_TORCH_LIBRARY(moe_kernels, m) {
  // permute/
  m.def("moe_sort_tokens(Tensor topk_ids, int num_experts, Tensor? expert_map=None, int num_local_experts=-1, "
        "int align_block_size=0) -> (Tensor expert_offsets, Tensor inv_permuted_idx, Tensor permuted_idx)");
  m.def("moe_permute(Tensor hidden_states, Tensor topk_ids, int num_experts, Tensor? expert_map=None, "
        "int num_local_experts=-1, int align_block_size=0, Tensor? scales=None) -> (Tensor permuted, "
        "Tensor expert_offsets, Tensor inv_permuted_idx, Tensor permuted_idx, Tensor permuted_scales)");
  m.def("moe_unpermute(Tensor permuted, Tensor topk_weights, Tensor inv_permuted_idx, Tensor? bias=None, "
        "Tensor? expert_offsets=None) -> Tensor");
  m.def("compute_problem_sizes(Tensor expert_offsets, int n, int k, bool swap_ab=False) -> (Tensor, Tensor)");

  // quant/
  m.def("scaled_fp8_quant(Tensor x, Tensor? scale=None, bool per_token=False) -> (Tensor q, Tensor scale)");
  m.def("per_token_group_quant_fp8(Tensor x, int group_size=128, bool column_major_scales=False) "
        "-> (Tensor q, Tensor scales)");
  m.def("silu_and_mul_quant_fp8(Tensor x, Tensor? scale=None, bool per_token=False, int group_size=0, "
        "str activation=\"silu\", bool gate_up_interleaved=False, float swiglu_alpha=1.702, "
        "float swiglu_limit=7.0, Tensor? bias=None, Tensor? expert_offsets=None) -> (Tensor q, Tensor scale)");

  // ep/
  m.def("ep_pre_reorder(Tensor hidden_states, Tensor src2dst, Tensor topk_ids, int start_expert_id, "
        "int end_expert_id, Tensor? scale=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("ep_post_reorder(Tensor down_output, Tensor src2dst, Tensor topk_ids, Tensor topk_weights, "
        "int start_expert_id, int end_expert_id) -> Tensor");
  m.def("ep_dispatch_plan(Tensor topk_ids, int experts_per_rank, int world_size, int capacity=-1) "
        "-> (Tensor slots, Tensor counts, Tensor dropped)");
  m.def("ep_pack_records(Tensor x, Tensor? scales, Tensor topk_weights, Tensor topk_ids, Tensor slots, "
        "Tensor counts, int num_records, int experts_per_rank, int capacity=-1) -> Tensor");
  m.def("ep_unpack_records(Tensor records, int hidden, ScalarType dtype, int num_scales, int topk) "
        "-> (Tensor x, Tensor scales, Tensor topk_weights, Tensor topk_ids)");
  // routing/
  m.def("moe_fused_gate(Tensor scores, Tensor? bias, int num_expert_group, int topk_group, int topk, "
        "str scoring_func=\"sigmoid\", bool renormalize=True, int num_fused_shared_experts=0, "
        "float routed_scaling_factor=1.0, bool apply_routed_scaling_factor_on_output=False) "
        "-> (Tensor topk_weights, Tensor topk_ids)");
  // gemm/ and moe/
  m.def("cutlass_grouped_gemm_fp8(Tensor a, Tensor b, Tensor a_scales, Tensor b_scales, Tensor expert_offsets, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("cutlass_grouped_gemm_fp8_act_quant(Tensor a, Tensor b, Tensor a_scales, Tensor b_scales, "
        "Tensor expert_offsets, Tensor out_scale, str activation=\"silu\", float swiglu_alpha=1.702, "
        "float swiglu_limit=7.0, Tensor? bias=None) -> Tensor");
  // No tensors, hence no dispatch key: one kernel for every backend (CompositeExplicitAutograd, in
  // gemm/ops.cpp; the stable def takes no function).
  m.def("grouped_gemm_fp8_configs() -> str[]");
  m.def("grouped_gemm_fp8_choice(int rows, int num_experts, int k, bool block_scaled=False) -> str");
  m.def("cutlass_moe_fp8(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
        "Tensor w1_scale, Tensor w2_scale, Tensor? a1_scale=None, Tensor? a2_scale=None, bool per_act_token=False, "
        "bool per_out_ch=False, Tensor? expert_map=None, int num_local_experts=-1, "
        "bool apply_router_weight_on_input=False, str activation=\"silu\", bool gate_up_interleaved=False, "
        "float swiglu_alpha=1.702, float swiglu_limit=7.0, Tensor? w1_bias=None, Tensor? w2_bias=None) -> Tensor");
  // gemm/ and moe/, 4-bit weights
  m.def("grouped_gemm_mxfp4(Tensor a, Tensor w, Tensor w_scale, Tensor expert_offsets, Tensor? a_scale=None, "
        "Tensor? bias=None, str activation=\"none\", bool gate_up_interleaved=False, float swiglu_alpha=1.702, "
        "float swiglu_limit=7.0) -> Tensor");
  m.def("grouped_gemm_w4a8(Tensor a, Tensor w, Tensor w_scale, Tensor expert_offsets, Tensor? a_scale=None, "
        "Tensor? bias=None, str activation=\"none\", bool gate_up_interleaved=False, float swiglu_alpha=1.702, "
        "float swiglu_limit=7.0) -> Tensor");
  m.def("cutlass_moe_mxfp4(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
        "Tensor w1_scale, Tensor w2_scale, *, str activation=\"silu\", bool gate_up_interleaved=False, "
        "float swiglu_alpha=1.702, float swiglu_limit=7.0, Tensor? w1_bias=None, Tensor? w2_bias=None, "
        "ScalarType? a_dtype=None, Tensor? expert_map=None, int num_local_experts=-1) -> Tensor");
  m.def("cutlass_moe_w4a8(Tensor hidden_states, Tensor w1, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
        "Tensor w1_scale, Tensor w2_scale, Tensor? a1_scale=None, Tensor? a2_scale=None, *, "
        "str activation=\"silu\", bool gate_up_interleaved=False, float swiglu_alpha=1.702, "
        "float swiglu_limit=7.0, Tensor? w1_bias=None, Tensor? w2_bias=None, Tensor? expert_map=None, "
        "int num_local_experts=-1) -> Tensor");
}
