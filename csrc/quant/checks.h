// Argument checks of the quant ops, shared by the CUDA and the CPU implementations so that both
// reject the same inputs with the same messages.
#pragma once

#include "common/stable_glue.h"

#include <optional>
#include <string_view>

#include "quant/gated_act.h"

namespace moe_kernels {

struct QuantShape {
  int64_t rows;  // M
  int64_t cols;  // columns of q: K, or I for silu_and_mul (x has 2I)
};

// x [M, K] (or [M, 2I] with silu_and_mul) bfloat16, float16 or float32, contiguous; scale, when
// given, a float32 tensor of one element ([1] or a scalar) on x's device.
QuantShape check_quant_args(const char* op, const Tensor& x, const std::optional<Tensor>& scale,
                            bool silu_and_mul);

// Dynamic per-group scales: group_size positive and dividing the columns of q (K, or I with
// silu_and_mul). Returns the number of groups per row.
int64_t check_group_size(const char* op, const QuantShape& s, int64_t group_size, bool silu_and_mul);

// silu_and_mul_quant_fp8's scale mode: group_size > 0 (dynamic per group) excludes a static scale
// and per_token; group_size < 0 is an error.
// The per-group scales [rows, groups] float32 on like's device; column_major: strides (1, rows) (the
// [groups, rows] buffer seen transposed, as DeepGEMM wants them).
inline Tensor empty_group_scales(int64_t rows, int64_t groups, bool column_major, const Tensor& like) {
  const int64_t sizes[2] = {rows, groups};
  const int64_t strides[2] = {column_major ? 1 : groups, column_major ? rows : 1};
  return empty_strided_on(2, sizes, strides, kFloat, like);
}

void check_silu_and_mul_mode(const std::optional<Tensor>& scale, bool per_token, int64_t group_size);

// "silu", "gelu" or "swigluoai" -> the enum; any other name is an error naming it.
GatedActivation parse_activation(const char* op, std::string_view name);

// silu_and_mul_quant_fp8's activation arguments: the activation, and the bias [E, 2I] float32
// contiguous on x's device with expert_offsets [E + 1] int64 (both or neither). Returns the spec
// for the launcher / reference, pointers filled from the tensors.
GatedActSpec check_gated_act_args(const char* op, const QuantShape& s, const Tensor& x, std::string_view activation,
                                  bool gate_up_interleaved, double swiglu_alpha, double swiglu_limit,
                                  const std::optional<Tensor>& bias, const std::optional<Tensor>& expert_offsets);

}  // namespace moe_kernels
