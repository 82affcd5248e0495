"""scaled_fp8_quant (static, dynamic per-tensor, dynamic per-token scales) on the layer input
[T, H], and silu_and_mul_quant_fp8 on GEMM1's output [T*K, 2I], against the PyTorch formulas,
and the copy bandwidth.

Bytes counted (bf16 in, e4m3 out; scales negligible): quant reads T*H*2 and writes T*H;
silu_quant reads T*K*2I*2 and writes T*K*I. The dynamic per-tensor scale needs a second read of
x (amax, then quantize): its fraction is of the single-pass bytes, the least any kernel moves.
"""

import torch
import torch.nn.functional as F

import moe_kernels

from .harness import FP8, Context, sets_for

TOKENS = [16, 128, 1024, 4096, 16384]
QUICK_TOKENS = [16, 1024, 4096]
FP8_MAX = 448.0
SCALE_FLOOR = 1.0 / (FP8_MAX * 512)  # vLLM's floor for dynamic scales


def torch_quant(y, scale=None, per_token=False):
    """vLLM's formula in plain torch: a dynamic scale is amax / 448 (floored), q = e4m3(clamp(y / s))."""
    y = y.float()
    if scale is None:
        amax = y.abs().amax(dim=1, keepdim=True) if per_token else y.abs().amax()
        scale = (amax / FP8_MAX).clamp(min=SCALE_FLOOR)
    return (y * (1.0 / scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def torch_silu_quant(h, scale=None, per_token=False):
    gate, up = h.float().chunk(2, dim=-1)
    return torch_quant(F.silu(gate) * up, scale, per_token)


VARIANTS = {  # op: (ours, peer, scale kind, input)
    "quant_static": (moe_kernels.scaled_fp8_quant, torch_quant, "static", "x"),
    "quant_dyn_tensor": (moe_kernels.scaled_fp8_quant, torch_quant, "tensor", "x"),
    "quant_dyn_token": (moe_kernels.scaled_fp8_quant, torch_quant, "token", "x"),
    "silu_quant_static": (moe_kernels.silu_and_mul_quant_fp8, torch_silu_quant, "static", "h"),
    "silu_quant_dyn_token": (moe_kernels.silu_and_mul_quant_fp8, torch_silu_quant, "token", "h"),
}


def _call(fn, kind, scale):
    if kind == "static":
        return lambda y: fn(y, scale)
    return lambda y: fn(y, None, kind == "token")


def run(ctx: Context) -> list:
    rows = []
    scale = torch.tensor([0.02], device="cuda")
    for m, T in ctx.grid(TOKENS, QUICK_TOKENS):
        shapes = {"x": (T, m.H), "h": (T * m.K, 2 * m.I)}
        for op, (ours, peer, kind, inp) in VARIANTS.items():
            rows_, cols = shapes[inp]
            in_bytes = rows_ * cols * 2
            out_bytes = rows_ * cols if inp == "x" else rows_ * cols // 2
            sets = [(torch.randn(rows_, cols, device="cuda", dtype=torch.bfloat16),)
                    for _ in range(sets_for(in_bytes + out_bytes))]
            t = ctx.measure({"ours": _call(ours, kind, scale), "torch": _call(peer, kind, scale)}, sets)
            rows.append(ctx.row(op, m, T, t, in_bytes + out_bytes, "copy", rows=rows_, cols=cols))
            del sets
    return rows
