// compute_problem_sizes: the per-expert GEMM shapes of the grouped GEMMs, from the expert offsets,
// on the device (no host sync, so the MoE layer stays capturable in a CUDA graph).
#include "permute/launchers.h"

namespace moe_kernels {
namespace {

__global__ void problem_sizes_kernel(ProblemSizesArgs a) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= a.num_local_experts) return;
  const int32_t m = static_cast<int32_t>(a.expert_offsets[e + 1] - a.expert_offsets[e]);
  // GEMM1: [m, k] x [2n, k]^T -> [m, 2n];  GEMM2: [m, n] x [k, n]^T -> [m, k].
  // swap_ab computes the transposed products (weights as A), which suits small m.
  int32_t* p1 = a.problem_sizes1 + 3 * e;
  int32_t* p2 = a.problem_sizes2 + 3 * e;
  if (a.swap_ab) {
    p1[0] = 2 * a.n; p1[1] = m; p1[2] = a.k;
    p2[0] = a.k;     p2[1] = m; p2[2] = a.n;
  } else {
    p1[0] = m; p1[1] = 2 * a.n; p1[2] = a.k;
    p2[0] = m; p2[1] = a.k;     p2[2] = a.n;
  }
}

}  // namespace

cudaError_t launch_problem_sizes(const ProblemSizesArgs& a, cudaStream_t stream) {
  if (a.num_local_experts == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int blocks = (a.num_local_experts + kThreads - 1) / kThreads;
  problem_sizes_kernel<<<blocks, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace moe_kernels
