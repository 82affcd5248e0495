// Launcher of silu_and_mul_quant_fp8: y = act(gate, up) (silu, gelu or swigluoai; gate/up
// concatenated or interleaved; optional per-expert bias), quantized to e4m3 (kernels in
// fp8_quant.cuh, activations in gated_act.h), the activation between the two grouped GEMMs of an
// MoE layer. One kernel body: the activation is a functor and the layout a template flag of
// GatedInput.
#include "quant/fp8_quant_launch.cuh"

namespace moe_kernels {
namespace {

template <typename Act, bool kInterleaved>
struct Gated {
  template <typename T, int kVec>
  using Input = GatedInput<T, kVec, Act, kInterleaved>;
};

template <typename Act>
cudaError_t launch_activation(const Fp8QuantArgs& a, cudaStream_t stream) {
  if (a.act.interleaved) return launch_quant<Gated<Act, true>::template Input>(a, stream);
  return launch_quant<Gated<Act, false>::template Input>(a, stream);
}

}  // namespace

cudaError_t launch_silu_and_mul_quant_fp8(const Fp8QuantArgs& a, cudaStream_t stream) {
  switch (a.act.activation) {
    case GatedActivation::kSilu: return launch_activation<act::SiluMul>(a, stream);
    case GatedActivation::kGelu: return launch_activation<act::GeluMul>(a, stream);
    case GatedActivation::kSwigluOai: return launch_activation<act::SwigluOai>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace moe_kernels
