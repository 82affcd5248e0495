"""The INT4 x FP8 expert layer (cutlass_moe_w4a8: DeepSeek-R1's W4AFP8 release: signed int4 weights
with one fp32 scale per 1x128 group along K, e4m3 activations) with static per-tensor activation
scales (row `layer_w4a8`, as the checkpoint ships them) and dynamic per-token ones (row
`layer_w4a8_dynamic`), against our FP8 layer on the same routing (peer `ours_fp8`: speedup = its
time / ours; issue 18's targets: >= 1.6x at T <= 64 on DeepSeek-V3, >= 0.9x at T = 4096) and the
bf16 torch layer. Models whose H or I is no multiple of 128 (gpt-oss) have no 1x128 groups and are
skipped.

Roofline: roofline.moe_layer with INT4 weights (half a byte per weight plus 4 bytes per 128) of the
experts the routing touches; FLOPs against the FP8 peak (the weights become e4m3 in registers).
A build without cutlass_moe_w4a8 gives rows marked skipped.
"""

import torch

import moe_kernels

from . import features, fourbit, roofline
from .harness import FP8, Context, Times
from .layer import biases, routing_sets

TOKENS = [1, 16, 64, 128, 1024, 4096]
QUICK_TOKENS = [16, 64, 4096]
VARIANTS = ("layer_w4a8", "layer_w4a8_dynamic")
GROUP = 128


def weights(m):
    """INT4 w1 [E, 2I, H] and w2 [E, H, I] (packed, scales), the peers' fp8 and bf16 weights of the
    same shapes (random: only the peers' time is used), the model's biases."""
    w1, s1 = fourbit.int4_weight(m.E, 2 * m.I, m.H)
    w2, s2 = fourbit.int4_weight(m.E, m.H, m.I)
    w1b = torch.randn(m.E, 2 * m.I, m.H, device="cuda", dtype=torch.bfloat16).mul_(0.05)
    w2b = torch.randn(m.E, m.H, m.I, device="cuda", dtype=torch.bfloat16).mul_(0.05)
    return dict(w1=w1, s1=s1, w2=w2, s2=s2, w1b=w1b, w2b=w2b, w18=w1b.to(FP8), w28=w2b.to(FP8), b=biases(m))


def rows(ctx, m, T, wt):
    E, K, H, I = m.E, m.K, m.H, m.I
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

    def traffic_of(touched):
        return roofline.moe_layer(T, K, H, I, touched, roofline.W4A8, biases=m.expert_bias)

    routings, touched = routing_sets(T, K, E, traffic_of)
    traffic = traffic_of(touched)
    sets = [(ids, w) for ids, w, _ in routings]
    why = features.missing("cutlass_moe_w4a8", *features.layer_needs(m), where="branch fp4")
    out = []
    if not why:
        b1, b2 = wt["b"]
        peers = fourbit.layer_peers(m, x, wt)
        kw = fourbit.layer_keywords(m, b1, b2)
        a1, a2 = torch.tensor([0.02], device="cuda"), torch.tensor([0.02], device="cuda")
    for op in VARIANTS:
        if why:
            t = Times()
            t["ours"] = why
            out.append(ctx.row(op, m, T, t, peers=[], traffic=traffic))
            continue
        scales = (a1, a2) if op == "layer_w4a8" else (None, None)
        fns = {"ours": lambda ids, w, scales=scales: moe_kernels.cutlass_moe_w4a8(
            x, wt["w1"], wt["w2"], w, ids, wt["s1"], wt["s2"], *scales, **kw)}
        fns.update({name: fn for name, fn in peers.items() if not isinstance(fn, str)})
        t = ctx.measure(fns, sets)
        t.update({name: fn for name, fn in peers.items() if isinstance(fn, str)})
        out.append(ctx.row(op, m, T, t, 6 * T * K * H * I, "fp8", peers=list(peers), traffic=traffic,
                           act_scales="static per tensor" if op == "layer_w4a8" else "dynamic per token",
                           routings=len(sets), touched_experts=touched))
    return out


def run(ctx: Context) -> list:
    # Without the op, no weights: the rows say why they were skipped.
    setup = weights if features.function("cutlass_moe_w4a8") else (lambda m: None)
    out = []
    for m, T, wt in ctx.grid_with(TOKENS, QUICK_TOKENS, setup, skip=lambda m: m.H % GROUP or m.I % GROUP):
        out += rows(ctx, m, T, wt)
    return out
