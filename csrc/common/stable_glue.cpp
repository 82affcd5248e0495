// Out-of-line parts of common/stable_glue.h (the rare paths: failures, the capability cache).
#include "common/stable_glue.h"

#include <string>

#ifndef MOE_KERNELS_CUDA_ARCHS
#define MOE_KERNELS_CUDA_ARCHS "unknown"
#endif

namespace moe_kernels {

// The architectures the build compiled the portable kernels for (CMakeLists.txt), kept in the binary
// so that `strings _C.so | grep MOE_KERNELS_CUDA_ARCHS=` tells, and tests/test_stable_abi.py checks
// them against cuobjdump's listing.
[[gnu::used]] static const char kBuildArchs[] = "MOE_KERNELS_CUDA_ARCHS=" MOE_KERNELS_CUDA_ARCHS;

namespace detail {

namespace {
const char* no_message() { return nullptr; }
}  // namespace

void throw_call_failed(const char* op) {
  // torch >= 2.13 keeps the called op's message for us (looked up at run time: our target is 2.11).
  const char* what = TORCH_DYNAMIC_VERSION_CALL_2_13_0(torch_exception_get_what_without_backtrace, no_message);
  std::string msg = std::string("moe_kernels: the call of ") + op + " failed";
  if (what != nullptr) {
    msg += ": ";
    msg += what;
  } else {
    msg += " (torch < 2.13 does not pass the called op's error message on; the arguments were checked before "
           "the call, so this is an internal error: please report it)";
  }
  throw std::runtime_error(msg);
}

}  // namespace detail

#ifdef MOE_KERNELS_WITH_CUDA
int compute_capability(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};  // 0: not yet asked
  STD_TORCH_CHECK(device >= 0 && device < kMaxDevices, "moe_kernels: CUDA device index ", device, " out of range");
  int cc = __atomic_load_n(&cache[device], __ATOMIC_RELAXED);
  if (cc == 0) {
    int major = 0, minor = 0;
    cudaError_t e1 = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaError_t e2 = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    STD_TORCH_CHECK(e1 == cudaSuccess && e2 == cudaSuccess, "moe_kernels: cannot read the compute capability of "
                    "cuda:", device, ": ", cudaGetErrorString(e1 != cudaSuccess ? e1 : e2));
    cc = major * 10 + minor;
    __atomic_store_n(&cache[device], cc, __ATOMIC_RELAXED);
  }
  return cc;
}
#endif

}  // namespace moe_kernels
