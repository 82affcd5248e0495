// Element types as the launchers see them: kernels are compiled without torch headers, so the glue
// translates at::ScalarType into this enum before calling a launcher.
#pragma once

namespace moe_kernels {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat8E4M3 };

inline int dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat16: return 2;
    case DType::kBFloat16: return 2;
    case DType::kFloat8E4M3: return 1;
  }
  return 0;
}

}  // namespace moe_kernels
