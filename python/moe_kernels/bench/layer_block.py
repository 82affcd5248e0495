"""The block-scaled FP8 layer (cutlass_moe_fp8 with 128x128 weight-block scales and 1x128 activation
groups: the DeepSeek-V3 / Qwen3-FP8 checkpoint format) against our per-channel FP8 layer and the
bf16 torch layer (torch._grouped_mm) on the same routing, and the new quantize + permute step
(per_token_group_quant_fp8, then moe_permute moving rows and scales in one pass) against the old
one (per-token scaled_fp8_quant, moe_permute, index_select of the scales).

FLOPs of a layer: 6*M*H*I, M = T*K. Roofline of a layer: roofline.moe_layer with the experts the
routing touches (128x128 block scales counted). Bytes of quantize + permute: what its two kernels read and
write (bf16 rows in, e4m3 rows out and back in, K e4m3 copies out, fp32 scales and int32 indices).
"""

import torch

import moe_kernels

from . import roofline
from .harness import FP8, Context, kernel_times_us
from .layer import routing_sets, torch_bf16_layer

TOKENS = [16, 1024, 4096]
QUICK_TOKENS = [16, 4096]
BLOCK = 128


def weights(m):
    w1b = torch.randn(m.E, 2 * m.I, m.H, device="cuda", dtype=torch.bfloat16).mul_(0.05)
    w2b = torch.randn(m.E, m.H, m.I, device="cuda", dtype=torch.bfloat16).mul_(0.05)
    s1 = torch.rand(m.E, 2 * m.I // BLOCK, m.H // BLOCK, device="cuda") * 1e-3 + 1e-3
    s2 = torch.rand(m.E, m.H // BLOCK, m.I // BLOCK, device="cuda") * 1e-3 + 1e-3
    return w1b, w2b, w1b.to(FP8), w2b.to(FP8), s1, s2


def rows(ctx, m, T, w1b, w2b, w1, w2, s1, s2):
    E, K, H, I = m.E, m.K, m.H, m.I
    G = H // BLOCK
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

    def traffic_of(touched):
        return roofline.moe_layer(T, K, H, I, touched, roofline.FP8_BLOCK)

    routings, touched = routing_sets(T, K, E, traffic_of)
    sets = [(i, wt) for i, wt, _ in routings]
    ids = sets[0][0]
    c1, c2 = torch.ones(E, 2 * I, device="cuda"), torch.ones(E, H, device="cuda")
    layer = moe_kernels.cutlass_moe_fp8
    t = ctx.measure({
        "block": lambda i, wt: layer(x, w1, w2, wt, i, s1, s2),
        "ours_per_channel": lambda i, wt: layer(x, w1, w2, wt, i, c1, c2, per_act_token=True, per_out_ch=True),
        "torch_bf16": lambda i, wt: torch_bf16_layer(x, w1b, w2b, wt, i, E),
    }, sets)
    M = T * K
    out = [ctx.row("layer_block", m, T, t, 6 * M * H * I, "fp8", ours="block", traffic=traffic_of(touched),
                   routings=len(sets), touched_experts=touched,
                   kernels_us=kernel_times_us(lambda: layer(x, w1, w2, sets[0][1], ids, s1, s2)))]

    def new_step():
        q, s = moe_kernels.per_token_group_quant_fp8(x, BLOCK)
        return moe_kernels.moe_permute(q, ids, E, scales=s)

    def old_step():
        q, s = moe_kernels.scaled_fp8_quant(x, None, per_token=True)
        permuted, offsets, inv, perm = moe_kernels.moe_permute(q, ids, E)
        return s.reshape(-1).index_select(0, perm.clamp_min(0).div(K, rounding_mode="floor").long())

    t = ctx.measure({"quant_permute": new_step, "old_quant_permute_index_select": old_step})
    moved = (2 * T * H + T * H + 4 * T * G      # quantize: bf16 in, e4m3 + group scales out
             + T * H + 4 * T * G + 4 * T * K    # permute reads rows, scales, ids
             + M * H + 4 * M * G + 8 * M)       # and writes K copies, their scales, two indices
    out.append(ctx.row("quant_permute_block", m, T, t, moved, "copy", ours="quant_permute"))
    return out


def run(ctx: Context) -> list:
    out = []
    for m, T, w in ctx.grid_with(TOKENS, QUICK_TOKENS, weights, skip=lambda m: m.H % BLOCK or m.I % BLOCK):
        out += rows(ctx, m, T, *w)
    return out
