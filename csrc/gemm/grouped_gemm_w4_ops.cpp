// Torch glue of the 4-bit grouped GEMMs grouped_gemm_mxfp4 and grouped_gemm_w4a8 (stable ABI, see
// common/stable_glue.h): checks shared by the CUDA and CPU implementations, allocation, the launch
// on the current stream, registration.
#include <string>
#include <string_view>

#include "common/stable_glue.h"
#include "gemm/w4_glue.h"
#include "gemm/w4_launchers.h"

namespace moe_kernels {
namespace {

using w4::Activation;
using w4::WeightFormat;

struct W4Problem {
  int64_t m, n, k, num_experts, out_cols;
};

Activation parse_activation(const char* op, std::string_view name, bool allow_none) {
  if (name == "silu") return Activation::kSilu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "swigluoai") return Activation::kSwigluOai;
  if (allow_none && name == "none") return Activation::kNone;
  STD_TORCH_CHECK(false, op, ": activation must be ", allow_none ? "\"none\", " : "",
                  "\"silu\", \"gelu\" or \"swigluoai\", got \"", std::string(name), "\"");
  return Activation::kNone;
}

// a [M, K] (bf16 or e4m3 for MXFP4, e4m3 for INT4), w uint8 [E, N, K/2], w_scale (uint8
// [E, N, K/32] | float32 [E, N, K/128]), expert_offsets int64 [E+1], a_scale float32 [1] / [M] /
// [M, 1] (required with e4m3 a, None with bf16 a), bias float32 [E, N]; all contiguous, one device.
W4Problem check_w4_gemm_args(const char* op, WeightFormat format, const Tensor& a, const Tensor& w,
                             const Tensor& w_scale, const Tensor& expert_offsets,
                             const std::optional<Tensor>& a_scale, const std::optional<Tensor>& bias,
                             Activation act) {
  const bool mxfp4 = format == WeightFormat::kMxfp4;
  const int64_t group = mxfp4 ? w4::kMxfp4Group : w4::kInt4Group;
  check_dim(op, "a", a, 2, "[M, K]");
  const bool a_fp8 = a.scalar_type() == kFloat8;
  if (mxfp4) {
    STD_TORCH_CHECK(a_fp8 || a.scalar_type() == kBFloat16, op, ": a must be bfloat16 or float8_e4m3fn, got ",
                    dtype_name(a.scalar_type()));
  } else {
    STD_TORCH_CHECK(a_fp8, op, ": a must be float8_e4m3fn, got ", dtype_name(a.scalar_type()));
  }
  check_contiguous(op, "a", a);
  check_dim(op, "w", w, 3, "[E, N, K/2]");
  STD_TORCH_CHECK(w.scalar_type() == kByte, op, ": w must be uint8 (two 4-bit codes a byte), got ",
                  dtype_name(w.scalar_type()));
  check_contiguous(op, "w", w);
  check_same_device(op, "w", w, "a", a);
  const int64_t M = a.size(0);
  const int64_t K = a.size(1);
  const int64_t E = w.size(0);
  const int64_t N = w.size(1);
  STD_TORCH_CHECK(w.size(2) * 2 == K, op, ": w must be [E, N, K/2] with K = a.size(1) = ", K, ", got shape ",
                  shape_of(w));
  STD_TORCH_CHECK(K % group == 0 && K > 0, op, ": K (a.size(1)) must be a positive multiple of ", group,
                  " (the weight scale group), got ", K);
  STD_TORCH_CHECK(E > 0 && E <= w4::kMaxW4Experts && N > 0 && N < (int64_t{1} << 30) && K < (int64_t{1} << 30), op,
                  ": w must have 1 to ", w4::kMaxW4Experts, " experts and 0 < N, K < 2^30, got shape ", shape_of(w));

  check_dim(op, "w_scale", w_scale, 3, mxfp4 ? "[E, N, K/32]" : "[E, N, K/128]");
  STD_TORCH_CHECK(w_scale.size(0) == E && w_scale.size(1) == N && w_scale.size(2) == K / group, op,
                  ": w_scale must be [E, N, K/", group, "] = [", E, ", ", N, ", ", K / group, "], got shape ",
                  shape_of(w_scale));
  if (mxfp4) {
    STD_TORCH_CHECK(w_scale.scalar_type() == kByte, op, ": w_scale must be uint8 (E8M0 exponents), got ",
                    dtype_name(w_scale.scalar_type()));
  } else {
    STD_TORCH_CHECK(w_scale.scalar_type() == kFloat, op, ": w_scale must be float32, got ",
                    dtype_name(w_scale.scalar_type()));
  }
  check_contiguous(op, "w_scale", w_scale);
  check_same_device(op, "w_scale", w_scale, "a", a);

  STD_TORCH_CHECK(expert_offsets.dim() == 1 && expert_offsets.size(0) == E + 1, op,
                  ": expert_offsets must be [E + 1] = [", E + 1, "], got shape ", shape_of(expert_offsets));
  STD_TORCH_CHECK(expert_offsets.scalar_type() == kLong, op, ": expert_offsets must be int64, got ",
                  dtype_name(expert_offsets.scalar_type()));
  check_contiguous(op, "expert_offsets", expert_offsets);
  check_same_device(op, "expert_offsets", expert_offsets, "a", a);

  if (a_fp8) {
    STD_TORCH_CHECK(a_scale.has_value(), op, ": a_scale is required with float8_e4m3fn a (the scale of its rows)");
    const Tensor& s = *a_scale;
    const bool per_tensor = s.numel() == 1 && s.dim() <= 1;
    const bool per_row = (s.dim() == 1 && s.size(0) == M) || (s.dim() == 2 && s.size(0) == M && s.size(1) == 1);
    STD_TORCH_CHECK(per_tensor || per_row, op, ": a_scale must be [1] (per tensor) or [M] / [M, 1] (per row, M=", M,
                    "), got shape ", shape_of(s));
    STD_TORCH_CHECK(s.scalar_type() == kFloat, op, ": a_scale must be float32, got ", dtype_name(s.scalar_type()));
    check_contiguous(op, "a_scale", s);
    check_same_device(op, "a_scale", s, "a", a);
  } else {
    STD_TORCH_CHECK(!a_scale.has_value(), op, ": a_scale must be None with bfloat16 a");
  }
  if (bias) {
    STD_TORCH_CHECK(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N, op, ": bias must be [E, N] = [", E,
                    ", ", N, "], got shape ", shape_of(*bias));
    STD_TORCH_CHECK(bias->scalar_type() == kFloat, op, ": bias must be float32, got ",
                    dtype_name(bias->scalar_type()));
    check_contiguous(op, "bias", *bias);
    check_same_device(op, "bias", *bias, "a", a);
  }
  const bool gated = act != Activation::kNone;
  STD_TORCH_CHECK(!gated || N % 2 == 0, op, ": a gated activation needs an even N (gate and up halves), got N=", N);
  return {M, N, K, E, gated ? N / 2 : N};
}

w4::W4GemmArgs make_args(WeightFormat format, const Tensor& a, const Tensor& w, const Tensor& w_scale,
                         const Tensor& expert_offsets, const std::optional<Tensor>& a_scale,
                         const std::optional<Tensor>& bias, Activation act, bool interleaved, double alpha,
                         double limit, const W4Problem& s, Tensor& out) {
  w4::W4GemmArgs p{};
  p.format = format;
  p.a = a.const_data_ptr();
  p.a_dtype = to_dtype(a.scalar_type());
  p.a_scale = a_scale ? static_cast<const float*>(a_scale->const_data_ptr()) : nullptr;
  p.a_scale_per_row = a_scale && !(a_scale->numel() == 1 && a_scale->dim() <= 1);
  p.w = static_cast<const uint8_t*>(w.const_data_ptr());
  p.w_scale = w_scale.const_data_ptr();
  p.bias = bias ? static_cast<const float*>(bias->const_data_ptr()) : nullptr;
  p.expert_offsets = static_cast<const int64_t*>(expert_offsets.const_data_ptr());
  p.out = out.mutable_data_ptr();
  p.m = s.m;
  p.num_experts = static_cast<int>(s.num_experts);
  p.n = static_cast<int>(s.n);
  p.k = static_cast<int>(s.k);
  p.activation = act;
  p.gate_up_interleaved = interleaved;
  p.swiglu_alpha = static_cast<float>(alpha);
  p.swiglu_limit = static_cast<float>(limit);
  return p;
}

}  // namespace

void check_w4_gemm_arch(const char* op, const Tensor& t) {
#ifdef MOE_KERNELS_WITH_CUDA
  const int device = static_cast<int>(t.get_device_index());
  const int cc = compute_capability(device);
  STD_TORCH_CHECK(cc >= 80, op, ": needs a GPU of compute capability 8.0 or newer (bf16 tensor cores, cp.async), "
                  "cuda:", device, " has ", cc / 10, ".", cc % 10);
#else
  STD_TORCH_CHECK(false, op, ": built without CUDA");
#endif
}

Tensor grouped_gemm_w4(const char* op, WeightFormat format, bool cuda, const Tensor& a, const Tensor& w,
                       const Tensor& w_scale, const Tensor& expert_offsets, const std::optional<Tensor>& a_scale,
                       const std::optional<Tensor>& bias, const std::string& activation, bool interleaved,
                       double alpha, double limit) {
  const Activation act = parse_activation(op, activation, /*allow_none=*/true);
  const W4Problem s = check_w4_gemm_args(op, format, a, w, w_scale, expert_offsets, a_scale, bias, act);
  if (!cuda) {
    Tensor out = empty_on({s.m, s.out_cols}, kBFloat16, a);
    const w4::W4GemmArgs p =
        make_args(format, a, w, w_scale, expert_offsets, a_scale, bias, act, interleaved, alpha, limit, s, out);
    w4::grouped_gemm_w4_reference(p);
    return out;
  }
#ifdef MOE_KERNELS_WITH_CUDA
  check_w4_gemm_arch(op, a);
  // The kernel copies a and w in 16-byte vectors and MXFP4 scales in aligned 4-byte words (a view
  // that starts mid-allocation may break that; fresh allocations are 512-byte aligned).
  auto aligned = [](const Tensor& t, uintptr_t n) { return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % n == 0; };
  STD_TORCH_CHECK(aligned(a, 16), op, ": a's data must be 16-byte aligned (a view at an odd offset?)");
  STD_TORCH_CHECK(aligned(w, 16), op, ": w's data must be 16-byte aligned (a view at an odd offset?)");
  STD_TORCH_CHECK(aligned(w_scale, 4), op, ": w_scale's data must be 4-byte aligned (a view at an odd offset?)");
  const CudaDeviceScope scope(a);
  Tensor out = empty_on({s.m, s.out_cols}, kBFloat16, a);
  const w4::W4GemmArgs p =
      make_args(format, a, w, w_scale, expert_offsets, a_scale, bias, act, interleaved, alpha, limit, s, out);
  const char* unknown = nullptr;
  const w4::W4GemmKernel& kernel = w4::pick_w4_gemm(format, s.m / s.num_experts, &unknown);
  STD_TORCH_CHECK(unknown == nullptr, op, ": MOE_KERNELS_W4_GEMM_CONFIG=", unknown, " names no configuration ",
                  "(mxfp4_gemv, mxfp4_bm16, mxfp4_bm64, int4_gemv, int4_bm16, int4_bm64)");
  check_launch(kernel.launch(p, current_stream(a)), op);
  return out;
#else
  STD_TORCH_CHECK(false, op, ": built without CUDA");
  return a;
#endif
}

namespace {

// One function per (op, device) for TORCH_BOX.
#define MOE_KERNELS_W4_GEMM_ENTRY(fn, op, format, cuda)                                                         \
  Tensor fn(const Tensor& a, const Tensor& w, const Tensor& w_scale, const Tensor& expert_offsets,              \
            const std::optional<Tensor>& a_scale, const std::optional<Tensor>& bias, const std::string& activation, \
            bool gate_up_interleaved, double swiglu_alpha, double swiglu_limit) {                                 \
    return grouped_gemm_w4(op, format, cuda, a, w, w_scale, expert_offsets, a_scale, bias, activation,              \
                       gate_up_interleaved, swiglu_alpha, swiglu_limit);                                         \
  }
MOE_KERNELS_W4_GEMM_ENTRY(mxfp4_cuda, "grouped_gemm_mxfp4", WeightFormat::kMxfp4, true)
MOE_KERNELS_W4_GEMM_ENTRY(mxfp4_cpu, "grouped_gemm_mxfp4", WeightFormat::kMxfp4, false)
MOE_KERNELS_W4_GEMM_ENTRY(w4a8_cuda, "grouped_gemm_w4a8", WeightFormat::kInt4, true)
MOE_KERNELS_W4_GEMM_ENTRY(w4a8_cpu, "grouped_gemm_w4a8", WeightFormat::kInt4, false)
#undef MOE_KERNELS_W4_GEMM_ENTRY

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CUDA, m) {
  m.impl("grouped_gemm_mxfp4", TORCH_BOX(&mxfp4_cuda));
  m.impl("grouped_gemm_w4a8", TORCH_BOX(&w4a8_cuda));
}

STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU, m) {
  m.impl("grouped_gemm_mxfp4", TORCH_BOX(&mxfp4_cpu));
  m.impl("grouped_gemm_w4a8", TORCH_BOX(&w4a8_cpu));
}

}  // namespace moe_kernels
