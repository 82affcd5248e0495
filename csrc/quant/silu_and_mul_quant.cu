// Launcher of silu_and_mul_quant_fp8: y = silu(gate) * up, quantized to e4m3 (kernels in
// fp8_quant.cuh), the activation between the two grouped GEMMs of an MoE layer.
#include "quant/fp8_quant_launch.cuh"

namespace moe_kernels {

cudaError_t launch_silu_and_mul_quant_fp8(const Fp8QuantArgs& a, cudaStream_t stream) {
  return launch_quant<SiluAndMulInput>(a, stream);
}

}  // namespace moe_kernels
