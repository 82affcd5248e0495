// The check of a per-expert fp32 bias [E, cols] whose rows are grouped by expert_offsets [E + 1]:
// the gated activation's bias (silu_and_mul_quant_fp8, [E, 2I]) and moe_unpermute's ([E, H]). One
// function so that both ops reject the same things with the same messages. Glue only (torch).
#pragma once

#include <cstdint>
#include <optional>

#include "common/stable_glue.h"

namespace moe_kernels {

// bias and expert_offsets come together or not at all; returns E (0 without a bias). `ref` is the
// tensor both must share a device with (named ref_name in messages); `shape` ("[E, H]") and
// `cols_from` ("H from permuted") say in messages what the bias's shape is and where cols comes from.
inline int64_t check_expert_bias(const char* op, const std::optional<Tensor>& bias,
                                 const std::optional<Tensor>& expert_offsets, const Tensor& ref, const char* ref_name,
                                 int64_t cols, const char* shape, const char* cols_from) {
  STD_TORCH_CHECK(bias.has_value() == expert_offsets.has_value(), op, ": bias and expert_offsets go together (bias ",
                  shape, " per expert, expert_offsets [E + 1] its rows), got ",
                  bias.has_value() ? "bias without expert_offsets" : "expert_offsets without bias");
  if (!bias.has_value()) return 0;
  const Tensor& b = *bias;
  const Tensor& off = *expert_offsets;
  STD_TORCH_CHECK(off.dim() == 1 && off.size(0) >= 1, op, ": expert_offsets must be 1-D [E + 1], got shape ",
                  shape_of(off));
  STD_TORCH_CHECK(off.scalar_type() == kLong, op, ": expert_offsets must be int64, got ", off.scalar_type());
  check_contiguous(op, "expert_offsets", off);
  check_same_device(op, "expert_offsets", off, ref_name, ref);
  const int64_t E = off.size(0) - 1;
  STD_TORCH_CHECK(b.dim() == 2 && b.size(0) == E && b.size(1) == cols, op, ": bias must be ", shape, " = [", E, ", ",
                  cols, "] (E from expert_offsets, ", cols_from, "), got shape ", shape_of(b));
  STD_TORCH_CHECK(b.scalar_type() == kFloat, op, ": bias must be float32, got ", b.scalar_type());
  check_contiguous(op, "bias", b);
  check_same_device(op, "bias", b, ref_name, ref);
  return E;
}

}  // namespace moe_kernels
