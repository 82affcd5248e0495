#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/portable_math.h"
#include "routing/checks.h"
#include "routing/cpu_reference.h"

namespace moe_kernels::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Index of the largest value among those allowed, NaN ranking as -inf (pmath::selection_rank);
// ties go to the lower index. Every allowed index is a candidate, -inf and NaN ones included.
int argmax(const std::vector<float>& v, const std::vector<bool>& allowed) {
  int best = -1;
  for (int i = 0; i < static_cast<int>(v.size()); ++i) {
    if (!allowed[i]) continue;
    if (best < 0 || pmath::selection_rank(v[i]) > pmath::selection_rank(v[best])) best = i;
  }
  return best;
}

}  // namespace

std::tuple<Tensor, Tensor> moe_fused_gate(const Tensor& scores, const std::optional<Tensor>& bias,
                                          int64_t num_expert_group, int64_t topk_group, int64_t topk,
                                          const std::string& scoring_func, bool renormalize,
                                                  int64_t num_fused_shared_experts, double routed_scaling_factor,
                                                  bool apply_routed_scaling_factor_on_output) {
  const GateConfig cfg =
      check_fused_gate_args(scores, bias, num_expert_group, topk_group, topk, scoring_func, num_fused_shared_experts,
                            routed_scaling_factor, apply_routed_scaling_factor_on_output);
  const int64_t T = scores.size(0);
  const int E = static_cast<int>(scores.size(1));
  const int G = static_cast<int>(num_expert_group);
  const int group_size = E / G;
  const int per = (E + pmath::kWarpLanes - 1) / pmath::kWarpLanes;  // experts per lane in the kernel
  const int64_t width = topk + num_fused_shared_experts;
  Tensor weights = empty_on({T, width}, kFloat, scores);
  Tensor ids = empty_on({T, width}, kInt, scores);
  // Inputs are read as float (exact for float16/bfloat16), as the kernel does.
  const void* xp = scores.const_data_ptr();
  const ScalarType xt = scores.scalar_type();
  std::vector<float> b;
  if (bias) {
    b.resize(E);
    for (int e = 0; e < E; ++e) b[e] = read_as_float(bias->const_data_ptr(), bias->scalar_type(), e);
  }
  const float* bp = bias ? b.data() : nullptr;
  float* wp = weights.mutable_data_ptr<float>();
  int32_t* ip = ids.mutable_data_ptr<int32_t>();

  std::vector<float> s(E), choice(E), group_score(G), row(E);
  for (int64_t t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) row[e] = read_as_float(xp, xt, t * E + e);
    // The kernel's arithmetic, step for step (common/portable_math.h; this file is compiled with
    // -ffp-contract=off): softmax sums per lane over its block of experts (lane = e / per, per =
    // ceil(E / 32)) in expert order, then a butterfly over the 32 lane sums.
    if (cfg.softmax) {
      float m = kNegInf;
      for (int e = 0; e < E; ++e) m = std::fmax(m, row[e]);
      float lane_sum[pmath::kWarpLanes] = {};
      for (int e = 0; e < E; ++e) {
        s[e] = pmath::exp_portable(pmath::add_rn(row[e], -m));
        lane_sum[e / per] = pmath::add_rn(lane_sum[e / per], s[e]);
      }
      for (int offset = pmath::kWarpLanes / 2; offset > 0; offset /= 2) {
        float next[pmath::kWarpLanes];
        for (int j = 0; j < pmath::kWarpLanes; ++j) next[j] = pmath::add_rn(lane_sum[j], lane_sum[j ^ offset]);
        std::copy(next, next + pmath::kWarpLanes, lane_sum);
      }
      const float inv_sum = pmath::div_rn(1.f, lane_sum[0]);
      for (int e = 0; e < E; ++e) s[e] = pmath::mul_rn(s[e], inv_sum);
    } else {
      for (int e = 0; e < E; ++e) s[e] = pmath::sigmoid(row[e]);
    }
    for (int e = 0; e < E; ++e) choice[e] = bp ? pmath::add_rn(s[e], bp[e]) : s[e];

    // Groups: top-2 sum with a bias (DeepSeek-V3), max without (DeepSeek-V2); keep topk_group.
    std::vector<bool> expert_allowed(E, true);
    if (topk_group < G) {
      for (int g = 0; g < G; ++g) {
        float best = kNegInf, second = kNegInf;
        for (int j = 0; j < group_size; ++j) {
          const float c = choice[g * group_size + j];
          if (c > best) {
            second = best;
            best = c;
          } else if (c > second) {
            second = c;
          }
        }
        group_score[g] = bp ? pmath::add_rn(best, second) : best;
      }
      std::vector<bool> group_open(G, true), kept(G, false);
      for (int r = 0; r < topk_group; ++r) {
        const int g = argmax(group_score, group_open);
        group_open[g] = false;
        kept[g] = true;
      }
      for (int e = 0; e < E; ++e) expert_allowed[e] = kept[e / group_size];
    }

    float sum = 0.f;
    for (int64_t k = 0; k < topk; ++k) {
      const int e = argmax(choice, expert_allowed);
      expert_allowed[e] = false;
      ip[t * width + k] = e;
      wp[t * width + k] = s[e];
      sum = pmath::add_rn(sum, s[e]);
    }
    const float scale = pmath::mul_rn(renormalize ? pmath::div_rn(1.f, sum) : 1.f, cfg.output_scale);
    for (int64_t k = 0; k < topk; ++k) wp[t * width + k] = pmath::mul_rn(wp[t * width + k], scale);
    for (int64_t j = 0; j < num_fused_shared_experts; ++j) {
      ip[t * width + topk + j] = static_cast<int32_t>(E + j);
      wp[t * width + topk + j] = cfg.shared_weight;
    }
  }
  return {weights, ids};
}

}  // namespace moe_kernels::cpu
