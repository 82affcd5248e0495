// Launcher of scaled_fp8_quant: y = x, quantized to e4m3 (kernels in fp8_quant.cuh).
#include "quant/fp8_quant_launch.cuh"

namespace moe_kernels {

cudaError_t launch_scaled_fp8_quant(const Fp8QuantArgs& a, cudaStream_t stream) {
  return launch_quant<PlainInput>(a, stream);
}

}  // namespace moe_kernels
