"""scaled_fp8_quant (static, dynamic per-tensor, dynamic per-token scales) on the layer input
[T, H], and silu_and_mul_quant_fp8 on GEMM1's output [T*K, 2I], against the PyTorch formulas,
and the copy bandwidth.

Bytes counted (bf16 in, e4m3 out; scales negligible): quant reads T*H*2 and writes T*H;
silu_quant reads T*K*2I*2 and writes T*K*I. The dynamic per-tensor scale needs a second read of
x (amax, then quantize): its fraction is of the single-pass bytes, the least any kernel moves.

Also: the 1x128 group scales of block-scaled checkpoints (quant_dyn_group on x, silu_quant_dyn_group
on GEMM1's output; models whose H, resp. I, is a multiple of 128), and act_quant_dyn_token, the
per-token op in the model's own activation, layout and expert biases (gpt-oss: swigluoai,
interleaved, biases: the layer's activation step), on the rows of a random routing.
"""

import torch
import torch.nn.functional as F

import moe_kernels

from . import features
from ..modular.experts import gated_activation
from .gemm import routed_offsets
from .harness import FP8, Context, sets_for

TOKENS = [16, 128, 1024, 4096, 16384]
QUICK_TOKENS = [16, 1024, 4096]
FP8_MAX = 448.0
SCALE_FLOOR = 1.0 / (FP8_MAX * 512)  # vLLM's floor for dynamic scales
GROUP = 128  # the activation groups of block-scaled FP8 checkpoints (1x128)


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


def torch_group_quant(y):
    """vLLM's and SGLang's per_token_group_quant_fp8: scale = max(amax, 1e-10) / 448 per group of
    128 columns, q = e4m3(clamp(y / scale))."""
    y = y.float()
    g = y.view(y.shape[0], -1, GROUP)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
    return (g / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(y.shape), scale.squeeze(-1)


def torch_silu_group_quant(h):
    gate, up = h.float().chunk(2, dim=-1)
    return torch_group_quant(F.silu(gate) * up)


def torch_act_quant(h, act, bias, offsets):
    """The model's gated activation with each row's expert bias, then per-token quantization."""
    if bias is not None:
        rows = torch.arange(h.shape[0], device=h.device)
        expert = torch.searchsorted(offsets[1:], rows, right=True).clamp(max=bias.shape[0] - 1)
        h = h.float() + bias.index_select(0, expert)
    y = gated_activation(h.float(), act.get("activation", "silu"), act.get("gate_up_interleaved", False), 1.702, 7.0)
    return torch_quant(y, None, True)


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
        rows += _group_and_model_act_rows(ctx, m, T, shapes)
    return rows


def _group_and_model_act_rows(ctx, m, T, shapes) -> list:
    """The group-scaled variants and the model's own activation (see the module docstring)."""
    out = []
    ops = {}  # op: (input, ours, torch peer)
    if m.H % GROUP == 0:
        ops["quant_dyn_group"] = ("x", lambda y: moe_kernels.per_token_group_quant_fp8(y, GROUP), torch_group_quant)
    if m.I % GROUP == 0:
        ops["silu_quant_dyn_group"] = ("h", lambda y: moe_kernels.silu_and_mul_quant_fp8(y, None, False, GROUP),
                                       torch_silu_group_quant)
    act = m.layer_kwargs()
    if (act or m.expert_bias) and features.accepts("silu_and_mul_quant_fp8", "activation", "gate_up_interleaved",
                                                   *(("bias", "expert_offsets") if m.expert_bias else ())):
        offsets, _ = routed_offsets(T, m.K, m.E)
        bias = torch.randn(m.E, 2 * m.I, device="cuda") if m.expert_bias else None
        kw = dict(act, **({"bias": bias, "expert_offsets": offsets} if bias is not None else {}))
        ops["act_quant_dyn_token"] = ("h", lambda y: moe_kernels.silu_and_mul_quant_fp8(y, None, True, **kw),
                                      lambda y: torch_act_quant(y, act, bias, offsets))
    for op, (inp, ours, peer) in ops.items():
        rows_, cols = shapes[inp]
        in_bytes = rows_ * cols * 2
        out_bytes = rows_ * cols if inp == "x" else rows_ * cols // 2
        sets = [(torch.randn(rows_, cols, device="cuda", dtype=torch.bfloat16),)
                for _ in range(sets_for(in_bytes + out_bytes))]
        t = ctx.measure({"ours": ours, "torch": peer}, sets)
        out.append(ctx.row(op, m, T, t, in_bytes + out_bytes, "copy", rows=rows_, cols=cols))
        del sets
    return out
