"""Experts: (x [T,H], topk_weights [T,K], topk_ids [T,K], expert_map, num_local_experts) -> [T,H],
the weighted sum over each token's experts that live here (others contribute nothing)."""

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.permute import moe_permute, moe_unpermute


class Experts(Protocol):
    def __call__(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, expert_map: Optional[Tensor],
                 num_local_experts: int) -> Tensor: ...


class TorchExperts:
    """Plain PyTorch experts (the reference): SwiGLU MLPs over the moe_permute layout.

    w1: [E_local, 2I, H] (rows 0..I-1 gate, I..2I-1 up, vLLM's w13); w2: [E_local, H, I]; any float
    dtype and device. One matmul per local expert in fp32, so it is slow and syncs the host (it
    reads the expert offsets); it is the spec the fused experts are tested against.
    """

    def __init__(self, w1: Tensor, w2: Tensor):
        if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0] or w1.shape[1] != 2 * w2.shape[2] \
                or w1.shape[2] != w2.shape[1]:
            raise ValueError(f"TorchExperts: w1 [E, 2I, H] and w2 [E, H, I] expected, got {tuple(w1.shape)} "
                             f"and {tuple(w2.shape)}")
        self.w1, self.w2 = w1, w2

    def __call__(self, x, topk_weights, topk_ids, expert_map=None, num_local_experts=-1):
        E_local = self.w1.shape[0]
        E = E_local if expert_map is None else expert_map.shape[0]
        permuted, offsets, inv, _ = moe_permute(x, topk_ids, E, expert_map, E_local if expert_map is not None else -1)
        y = torch.empty(permuted.shape, dtype=torch.float32, device=x.device)
        bounds = offsets.tolist()
        for e in range(E_local):
            rows = permuted[bounds[e]:bounds[e + 1]].float()
            h = rows @ self.w1[e].float().t()
            gate, up = h.chunk(2, dim=-1)
            y[bounds[e]:bounds[e + 1]] = (F.silu(gate) * up) @ self.w2[e].float().t()
        y[bounds[-1]:] = 0  # unused rows: never read, but keep them finite
        return moe_unpermute(y.to(x.dtype), topk_weights, inv)
