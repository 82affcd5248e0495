"""Without a GPU: the modular layer on the CPU ops (moe_fused_gate, moe_permute, moe_unpermute
references and TorchExperts) against the MoE formula in plain torch, on a small fp32 shape."""

import torch
import torch.nn.functional as F

T, E, K, H, I = 32, 8, 2, 64, 32
TOLERANCE = 1e-4  # fp32 throughout; outputs are O(1) and the two sides differ in summation order only


def torch_moe(x, logits, w1, w2, k):
    """softmax top-k with renormalized weights, SwiGLU experts, weighted sum."""
    weights, ids = logits.float().softmax(-1).topk(k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for j in range(k):
        h = torch.einsum("th,tnh->tn", x, w1[ids[:, j]])
        gate, up = h.chunk(2, dim=-1)
        out += weights[:, j, None] * torch.einsum("ti,thi->th", F.silu(gate) * up, w2[ids[:, j]])
    return out


def run() -> bool:
    from ..modular import FusedGateRouter, MoELayer, SingleGpu, TorchExperts

    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    w1 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    layer = MoELayer(FusedGateRouter(topk=K, scoring_func="softmax"), SingleGpu(E), TorchExperts(w1, w2))
    err = (layer(x, logits) - torch_moe(x, logits, w1, w2, K)).abs().max().item()
    ok = err <= TOLERANCE
    print(f"CPU check: modular MoELayer (moe_fused_gate, moe_permute, moe_unpermute CPU ops, TorchExperts) "
          f"vs the torch formula, T={T} E={E} K={K} H={H} I={I} fp32: max abs error {err:.2e} "
          f"(tolerance {TOLERANCE:.0e}): {'PASS' if ok else 'FAIL'}")
    return ok
