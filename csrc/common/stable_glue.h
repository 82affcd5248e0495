// What the glue (.cpp files) needs from torch, on PyTorch's stable ABI (issue 16): _C.so is built with
// TORCH_TARGET_VERSION = 2.11, so it loads under every torch >= 2.11 of the same CUDA major.
//
// The pattern, for every engineer writing glue:
//   - Tensors are torch::stable::Tensor (`Tensor` here); no ATen/c10 header may be included (ATen's
//     headers #error under TORCH_TARGET_VERSION, which CMake sets for every .cpp file).
//   - Checks: STD_TORCH_CHECK(cond, op, ": x must be ...", ", got ", ...). Shapes, devices and dtypes
//     print through shape_of(t), device_of(t) and dtype names (ScalarType has operator<<); they are
//     only formatted when the check fails, so the success path allocates no string.
//   - Allocation: empty_like_device(sizes, dtype, like) (one unboxed shim call, not the boxed
//     aten::empty). CUDA launches: `CudaDeviceScope scope(t);` then launch on current_stream(t) and
//     check_launch(err, op).
//   - Registration: kernels take `const Tensor&`, `std::optional<Tensor>`, `int64_t`, `double`,
//     `bool`, `std::string` (for `str`), `std::optional<ScalarType>`; register with
//     STABLE_TORCH_LIBRARY_IMPL(moe_kernels, CPU|CUDA, m) { m.impl("op", TORCH_BOX(&fn)); }.
//     Schemas live in csrc/registration.cpp (STABLE_TORCH_LIBRARY).
//   - Calling another op: prefer the C++ function of our own op directly (no boxing, errors keep their
//     text). call_op<R>("ns::op", "overload", args...) goes through the dispatcher (boxed): on torch
//     < 2.13 an error raised inside the called op arrives without its text, so a composite checks
//     every argument itself before calling anything.
//   - CPU references read and write through pointers (read_as_float for float/half/bf16 inputs);
//     no aten op is needed to compute a reference.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Exception.h>
#include <torch/headeronly/util/Float8_e4m3fn.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <ostream>
#include <tuple>
#include <type_traits>

#include "common/dtype.h"

#ifdef MOE_KERNELS_WITH_CUDA
#include <cuda_runtime.h>
// Declared under USE_CUDA in the AOTI shim header; stable since torch 2.4 (the stable Stream's
// nativeHandle() that would replace it needs 2.13).
extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
#endif

namespace moe_kernels {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;
using Float8_e4m3fn = torch::headeronly::Float8_e4m3fn;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kFloat8 = ScalarType::Float8_e4m3fn;
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kLong = ScalarType::Long;
constexpr ScalarType kByte = ScalarType::Byte;

// ---- message formatting (only evaluated when a check fails) ----

// Prints as at::IntArrayRef did: [4, 2].
struct ShapeOf {
  const Tensor& t;
};
inline ShapeOf shape_of(const Tensor& t) { return {t}; }
inline std::ostream& operator<<(std::ostream& os, const ShapeOf& s) {
  os << '[';
  const int64_t d = s.t.dim();
  for (int64_t i = 0; i < d; ++i) os << (i ? ", " : "") << s.t.size(i);
  return os << ']';
}

// Strides, printed the same way.
struct StridesOf {
  const Tensor& t;
};
inline StridesOf strides_of(const Tensor& t) { return {t}; }
inline std::ostream& operator<<(std::ostream& os, const StridesOf& s) {
  os << '[';
  const int64_t d = s.t.dim();
  for (int64_t i = 0; i < d; ++i) os << (i ? ", " : "") << s.t.stride(i);
  return os << ']';
}
inline bool same_shape(const Tensor& a, const Tensor& b) {
  const int64_t d = a.dim();
  if (d != b.dim()) return false;
  for (int64_t i = 0; i < d; ++i)
    if (a.size(i) != b.size(i)) return false;
  return true;
}

// Prints as at::Device did: cpu, cuda:0.
struct DeviceOf {
  bool cuda;
  int index;
};
inline DeviceOf device_of(const Tensor& t) { return {t.is_cuda(), t.is_cuda() ? int(t.get_device_index()) : -1}; }
inline std::ostream& operator<<(std::ostream& os, const DeviceOf& d) {
  if (!d.cuda) return os << "cpu";
  return os << "cuda:" << d.index;
}
inline bool same_device(const Tensor& a, const Tensor& b) {
  const bool ca = a.is_cuda();
  return ca == b.is_cuda() && (!ca || a.get_device_index() == b.get_device_index());
}

// Strings in messages: std::string_view streams as is.
inline const char* dtype_name(ScalarType t) { return torch::headeronly::toString(t); }

// ---- small checks shared by every op (each names op and argument) ----

inline void check_contiguous(const char* op, const char* name, const Tensor& t) {
  STD_TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}
inline void check_dim(const char* op, const char* name, const Tensor& t, int64_t dim, const char* what) {
  STD_TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", what, ", got shape ", shape_of(t));
}
inline void check_same_device(const char* op, const char* name, const Tensor& t, const char* ref_name,
                              const Tensor& ref) {
  STD_TORCH_CHECK(same_device(t, ref), op, ": ", name, " must be on ", device_of(ref), " (as ", ref_name, "), got ",
                  device_of(t));
}

// Data pointer as T* without the typed accessor's dtype check (one shim call instead of three):
// for the glue, after the op's own checks established the dtype.
template <class T>
inline T* ptr(const Tensor& t) {
  return static_cast<T*>(t.mutable_data_ptr());
}
template <class T>
inline const T* cptr(const Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

// ---- allocation ----

namespace detail {
inline int32_t shim_dtype(ScalarType t) {
  return torch::stable::detail::to<int32_t>(torch::stable::detail::from(t));
}
}  // namespace detail

// An uninitialized tensor of `dtype` on `like`'s device, row-major unless `strides` are given: one
// call of the AOTI shim (unboxed at::empty_strided), cheaper on the host than the boxed aten::empty
// of torch::stable::empty.
inline Tensor empty_strided_on(int64_t ndim, const int64_t* sizes, const int64_t* strides, ScalarType dtype,
                               const Tensor& like) {
  int32_t dev_type = 0, dev_index = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &dev_type));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &dev_index));
  AtenTensorHandle h = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch_empty_strided(ndim, sizes, strides, detail::shim_dtype(dtype), dev_type, dev_index, &h));
  return Tensor(h);
}
template <size_t N>
inline Tensor empty_on(const int64_t (&sizes)[N], ScalarType dtype, const Tensor& like) {
  int64_t strides[N > 0 ? N : 1];
  int64_t s = 1;
  for (size_t i = N; i-- > 0;) {
    strides[i] = s;
    s *= sizes[i] > 1 ? sizes[i] : 1;
  }
  return empty_strided_on(static_cast<int64_t>(N), sizes, strides, dtype, like);
}
// Same, zero-filled.
template <size_t N>
inline Tensor zeros_on(const int64_t (&sizes)[N], ScalarType dtype, const Tensor& like) {
  Tensor t = empty_on(sizes, dtype, like);
  torch::stable::zero_(t);
  return t;
}

// Bytes per element of the dtypes our ops take (sizeof of the C++ type).
inline int64_t element_size_of(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short: return 2;
    case ScalarType::Float8_e4m3fn:
    case ScalarType::Float8_e5m2:
    case ScalarType::Byte:
    case ScalarType::Char:
    case ScalarType::Bool: return 1;
    default: STD_TORCH_CHECK(false, "moe_kernels: element size of unsupported dtype ", t);
  }
  return 0;
}

// A view of the contiguous tensor t with new (row-major) sizes, same element count: one unboxed shim
// call (aoti_torch__reinterpret_tensor); a non-contiguous t goes through the boxed aten::reshape.
template <size_t N>
inline Tensor reshape_to(const Tensor& t, const int64_t (&sizes)[N]) {
  if (!t.is_contiguous()) return torch::stable::reshape(t, torch::headeronly::IntHeaderOnlyArrayRef(sizes, N));
  int64_t strides[N > 0 ? N : 1];
  int64_t s = 1;
  for (size_t i = N; i-- > 0;) {
    strides[i] = s;
    s *= sizes[i] > 1 ? sizes[i] : 1;
  }
  AtenTensorHandle h = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(
      aoti_torch__reinterpret_tensor(t.get(), static_cast<int64_t>(N), sizes, strides, t.storage_offset(), &h));
  return Tensor(h);
}

// ---- element access of CPU references ----

// x[i] of a float32/float16/bfloat16 buffer, as float (exact for every such value).
inline float read_as_float(const void* p, ScalarType t, int64_t i) {
  switch (t) {
    case ScalarType::Float: return static_cast<const float*>(p)[i];
    case ScalarType::Half: return static_cast<float>(static_cast<const Half*>(p)[i]);
    case ScalarType::BFloat16: return static_cast<float>(static_cast<const BFloat16*>(p)[i]);
    default: STD_TORCH_CHECK(false, "moe_kernels: read_as_float of unsupported dtype ", t);
  }
  return 0.f;
}
// y[i] = v rounded to float32/float16/bfloat16 (round to nearest even, as a torch .to()).
inline void write_from_float(void* p, ScalarType t, int64_t i, float v) {
  switch (t) {
    case ScalarType::Float: static_cast<float*>(p)[i] = v; return;
    case ScalarType::Half: static_cast<Half*>(p)[i] = Half(v); return;
    case ScalarType::BFloat16: static_cast<BFloat16*>(p)[i] = BFloat16(v); return;
    default: STD_TORCH_CHECK(false, "moe_kernels: write_from_float of unsupported dtype ", t);
  }
}
// Integer index tensors (int32 or int64) read as int64.
inline int64_t read_index(const void* p, bool is_int64, int64_t i) {
  return is_int64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

// ---- dtype translation for the launchers (kernels are compiled without torch headers) ----

inline DType to_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return DType::kFloat32;
    case ScalarType::Half: return DType::kFloat16;
    case ScalarType::BFloat16: return DType::kBFloat16;
    case ScalarType::Float8_e4m3fn: return DType::kFloat8E4M3;
    default: STD_TORCH_CHECK(false, "moe_kernels: unsupported dtype ", t);
  }
  return DType::kFloat32;
}

// ---- CUDA: device, stream, launch errors ----

#ifdef MOE_KERNELS_WITH_CUDA
// Makes t's device current for the scope (what c10::cuda::CUDAGuard did) with plain CUDA runtime
// calls: no allocation and nothing to do when it already is (the common case).
class CudaDeviceScope {
 public:
  explicit CudaDeviceScope(const Tensor& t) : CudaDeviceScope(static_cast<int>(t.get_device_index())) {}
  explicit CudaDeviceScope(int device) {
    cudaGetDevice(&prev_);
    if (prev_ != device) {
      cudaError_t err = cudaSetDevice(device);
      STD_TORCH_CHECK(err == cudaSuccess, "moe_kernels: cudaSetDevice(", device, ") failed: ", cudaGetErrorString(err));
      restore_ = true;
    }
  }
  ~CudaDeviceScope() {
    if (restore_) cudaSetDevice(prev_);
  }
  CudaDeviceScope(const CudaDeviceScope&) = delete;
  CudaDeviceScope& operator=(const CudaDeviceScope&) = delete;

 private:
  int prev_ = 0;
  bool restore_ = false;
};

// torch's current stream on t's device (torch.cuda.current_stream(), honoring `with torch.cuda.stream`).
inline cudaStream_t current_stream(const Tensor& t) {
  void* s = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(static_cast<int32_t>(t.get_device_index()), &s));
  return static_cast<cudaStream_t>(s);
}

inline void check_launch(cudaError_t err, const char* op) {
  STD_TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// Compute capability (major * 10 + minor) of a CUDA device, cached per device: the GEMM ops check it
// on every call.
int compute_capability(int device);
#endif

// ---- calling another op through the dispatcher (boxed) ----

namespace detail {
template <class T>
struct ReturnCount {
  static constexpr size_t value = 1;
};
template <class... T>
struct ReturnCount<std::tuple<T...>> {
  static constexpr size_t value = sizeof...(T);
};
template <class Tuple, size_t... I>
Tuple unbox_tuple(StableIValue* stack, std::index_sequence<I...>) {
  return Tuple{torch::stable::detail::to<std::tuple_element_t<I, Tuple>>(stack[I])...};
}
[[noreturn]] void throw_call_failed(const char* op);
}  // namespace detail

// R: Tensor, a std::tuple of tensors, or void. Boxed: costs a few microseconds of host time, and on
// torch < 2.13 the called op's error text is lost (check arguments before calling).
template <class R, class... A>
R call_op(const char* op, const char* overload, const A&... args) {
  constexpr size_t n_ret = std::is_void_v<R> ? 0 : detail::ReturnCount<R>::value;
  constexpr size_t n = sizeof...(A) > n_ret ? sizeof...(A) : n_ret;
  std::array<StableIValue, n == 0 ? 1 : n> stack{};
  size_t i = 0;
  ((stack[i++] = torch::stable::detail::from(args)), ...);
  if (torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION) != TORCH_SUCCESS) {
    detail::throw_call_failed(op);
  }
  if constexpr (std::is_void_v<R>) {
    return;
  } else if constexpr (n_ret == 1 && !std::is_same_v<R, std::tuple<Tensor>>) {
    return torch::stable::detail::to<R>(stack[0]);
  } else {
    return detail::unbox_tuple<R>(stack.data(), std::make_index_sequence<n_ret>());
  }
}

}  // namespace moe_kernels
