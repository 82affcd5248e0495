"""Experts: (x [T,H], topk_weights [T,K], topk_ids [T,K], expert_map, num_local_experts, x_scale) -> [T,H],
the weighted sum over each token's experts that live here (others contribute nothing).

x is float (bf16, fp16, fp32), or float8_e4m3fn quantized by the dispatch with x_scale [T] (per token)
or [T, H/128] (per 1x128 group); the output is then bfloat16."""

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.gemm import cutlass_moe_fp8
from ..ops.permute import moe_permute, moe_unpermute

FP8 = torch.float8_e4m3fn


class Experts(Protocol):
    def __call__(self, x: Tensor, topk_weights: Tensor, topk_ids: Tensor, expert_map: Optional[Tensor],
                 num_local_experts: int, x_scale: Optional[Tensor] = None) -> Tensor: ...


def dequantize_rows(x: Tensor, x_scale: Optional[Tensor], who: str) -> Tensor:
    """e4m3 rows times their scales, in fp32: x_scale [1] (per tensor), [T] or [T, 1] (per token), or
    [T, G] (per group of H/G columns)."""
    if x_scale is None:
        raise ValueError(f"{who}: float8_e4m3fn x needs x_scale")
    T, H = x.shape
    s = x_scale.float()
    if s.numel() == 1 or (s.dim() == 1 and s.shape[0] == T):
        return x.float() * s.reshape(-1, 1)
    if s.dim() == 2 and s.shape[0] == T and H % s.shape[1] == 0:
        G = s.shape[1]
        return (x.float().view(T, G, H // G) * s.unsqueeze(-1)).view(T, H)
    raise ValueError(f"{who}: x_scale must be [1], [T], [T, 1] or [T, G] with G dividing H={H} (T={T}), "
                     f"got shape {tuple(x_scale.shape)}")


class TorchExperts:
    """Plain PyTorch experts (the reference): SwiGLU MLPs over the moe_permute layout.

    w1: [E_local, 2I, H] (rows 0..I-1 gate, I..2I-1 up, vLLM's w13); w2: [E_local, H, I]; any float
    dtype and device. One matmul per local expert in fp32, so it is slow and syncs the host (it
    reads the expert offsets); it is the spec the fused experts are tested against. e4m3 rows are
    dequantized with their scales first (the output is then bfloat16).
    """

    def __init__(self, w1: Tensor, w2: Tensor):
        if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0] or w1.shape[1] != 2 * w2.shape[2] \
                or w1.shape[2] != w2.shape[1]:
            raise ValueError(f"TorchExperts: w1 [E, 2I, H] and w2 [E, H, I] expected, got {tuple(w1.shape)} "
                             f"and {tuple(w2.shape)}")
        self.w1, self.w2 = w1, w2

    def __call__(self, x, topk_weights, topk_ids, expert_map=None, num_local_experts=-1, x_scale=None):
        out_dtype = x.dtype
        if x.dtype == FP8:
            x, out_dtype = dequantize_rows(x, x_scale, "TorchExperts"), torch.bfloat16
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
        return moe_unpermute(y.to(out_dtype), topk_weights, inv)


class CutlassFp8Experts:
    """The CUTLASS FP8 experts (:func:`moe_kernels.cutlass_moe_fp8`) as modular Experts.

    Args:
        w1: [E_local, 2I, H] float8_e4m3fn (gate rows, then up rows); w2: [E_local, H, I] float8_e4m3fn.
        w1_scale, w2_scale: float32 weight scales (multiplied to dequantize): [E_local] per expert,
            [E_local, 2I] and [E_local, H] per output channel, or [E_local, 2I/128, H/128] and
            [E_local, H/128, I/128] per 128x128 block (block-scaled checkpoints; the activations are
            then quantized per 1x128 group).
        a2_scale: optional static [1] scale of the second GEMM's input; None: dynamic per token (per
            1x128 group in block mode, which takes no a2_scale).

    Activations are quantized per token (per 1x128 group in block mode) with dynamic scales. They
    may arrive quantized from the dispatch (AllToAll(dispatch_dtype=torch.float8_e4m3fn), with
    ``quant_group_size=128`` in block mode): e4m3 x with x_scale [T] (per token) or [T, H/128] (per
    group). Float x ([T, H] bfloat16 or float16) is quantized the same way inside cutlass_moe_fp8,
    so both give the same bytes. Output: [T, H] bfloat16 (x's dtype for float16 x).
    """

    def __init__(self, w1: Tensor, w2: Tensor, w1_scale: Tensor, w2_scale: Tensor, a2_scale: Optional[Tensor] = None):
        if w1.dim() != 3 or w2.dim() != 3 or w1.shape[0] != w2.shape[0] or w1.shape[1] != 2 * w2.shape[2] \
                or w1.shape[2] != w2.shape[1]:
            raise ValueError(f"CutlassFp8Experts: w1 [E, 2I, H] and w2 [E, H, I] expected, got {tuple(w1.shape)} "
                             f"and {tuple(w2.shape)}")
        if w1.dtype != FP8 or w2.dtype != FP8:
            raise ValueError(f"CutlassFp8Experts: w1 and w2 must be float8_e4m3fn, got {w1.dtype} and {w2.dtype}")
        E = w1.shape[0]
        self.block = w1_scale.dim() == 3
        if self.block:
            self.per_out_ch = False
        elif w1_scale.numel() == E and w2_scale.numel() == E:
            self.per_out_ch = False
        elif w1_scale.numel() == E * w1.shape[1] and w2_scale.numel() == E * w2.shape[1]:
            self.per_out_ch = True
        else:
            raise ValueError(f"CutlassFp8Experts: w1_scale and w2_scale must be [E], [E, 2I] and [E, H], or "
                             f"3-D block scales; got {tuple(w1_scale.shape)} and {tuple(w2_scale.shape)} for "
                             f"w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}")
        if self.block and a2_scale is not None:
            raise ValueError("CutlassFp8Experts: a2_scale must be None with block scales (the second GEMM's "
                             "input is quantized per 1x128 group)")
        self.w1, self.w2, self.w1_scale, self.w2_scale, self.a2_scale = w1, w2, w1_scale, w2_scale, a2_scale
        #: The activation quantization the dispatch should use: None per token, 128 per 1x128 group.
        self.quant_group_size = 128 if self.block else None

    def _check_scale(self, x: Tensor, x_scale: Optional[Tensor]) -> Tensor:
        T, H = x.shape
        if x_scale is None:
            raise ValueError("CutlassFp8Experts: float8_e4m3fn x needs x_scale")
        if self.block:
            if x_scale.dim() != 2 or tuple(x_scale.shape) != (T, H // 128):
                raise ValueError(f"CutlassFp8Experts: block-scaled experts need per-group x_scale [T, H/128] = "
                                 f"[{T}, {H // 128}] (dispatch with quant_group_size=128), got "
                                 f"{tuple(x_scale.shape)}")
            return x_scale
        if x_scale.numel() != T or (x_scale.dim() == 2 and x_scale.shape[1] != 1) or x_scale.dim() > 2:
            raise ValueError(f"CutlassFp8Experts: x_scale must be per token, [T] or [T, 1] with T={T} (dispatch "
                             f"without quant_group_size), got {tuple(x_scale.shape)}")
        return x_scale.reshape(-1)

    def __call__(self, x, topk_weights, topk_ids, expert_map=None, num_local_experts=-1, x_scale=None):
        a1_scale = self._check_scale(x, x_scale) if x.dtype == FP8 else None
        return cutlass_moe_fp8(x, self.w1, self.w2, topk_weights, topk_ids, self.w1_scale, self.w2_scale,
                               # Dynamic per-token scales (per-group ones in block mode, where the
                               # group size implies them): with expert_map, a per-tensor scale would
                               # span rows that no local expert computes.
                               a1_scale=a1_scale, a2_scale=self.a2_scale, per_act_token=not self.block,
                               per_out_ch=self.per_out_ch, expert_map=expert_map)
