"""The MXFP4 expert layer (cutlass_moe_mxfp4: gpt-oss's and DeepSeek-V4's checkpoint format) with
bf16 activations (W4A16, row `layer_mxfp4`) and with e4m3 activations quantized per token (W4A8,
row `layer_mxfp4_a8`), against our FP8 layer on the same routing (peer `ours_fp8`: speedup = its
time / ours; issue 18's targets: >= 1.6x at T <= 64 on DeepSeek-V3 and gpt-oss-120b, >= 0.9x at
T = 4096) and the bf16 torch layer. Each model's own activation, layout and biases (gpt-oss:
swigluoai, interleaved, fp32 biases).

Roofline: roofline.moe_layer with MXFP4 weights (half a byte per weight plus one E8M0 byte per 32)
of the experts the routing touches; FLOPs against the bf16 peak for W4A16 (its MMAs are bf16) and
the FP8 peak for W4A8. A build without cutlass_moe_mxfp4 gives rows marked skipped.
"""

import torch

import moe_kernels

from . import features, fourbit, roofline
from .harness import FP8, Context, Times
from .layer import biases, routing_sets

TOKENS = [1, 16, 64, 128, 1024, 4096]
QUICK_TOKENS = [16, 64, 4096]
VARIANTS = {"layer_mxfp4": (torch.bfloat16, "bf16"), "layer_mxfp4_a8": (FP8, "fp8")}  # op: (a_dtype, MMA peak)


def weights(m):
    """MXFP4 w1 [E, 2I, H] and w2 [E, H, I] (blocks, scales), their fp8 and bf16 peers' weights of
    the same shapes (random: only the time of the peers is used), the model's biases."""
    w1, s1 = fourbit.mxfp4_weight(m.E, 2 * m.I, m.H)
    w2, s2 = fourbit.mxfp4_weight(m.E, m.H, m.I)
    w1b = torch.randn(m.E, 2 * m.I, m.H, device="cuda", dtype=torch.bfloat16).mul_(0.05)
    w2b = torch.randn(m.E, m.H, m.I, device="cuda", dtype=torch.bfloat16).mul_(0.05)
    return dict(w1=w1, s1=s1, w2=w2, s2=s2, w1b=w1b, w2b=w2b, w18=w1b.to(FP8), w28=w2b.to(FP8),
                b=biases(m))


def rows(ctx, m, T, wt):
    E, K, H, I = m.E, m.K, m.H, m.I
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)

    def traffic_of(touched):
        return roofline.moe_layer(T, K, H, I, touched, roofline.MXFP4, biases=m.expert_bias)

    routings, touched = routing_sets(T, K, E, traffic_of)
    traffic = traffic_of(touched)
    sets = [(ids, w) for ids, w, _ in routings]
    why = features.missing("cutlass_moe_mxfp4", *features.layer_needs(m), "a_dtype", where="branch fp4")
    out = []
    if not why:
        b1, b2 = wt["b"]
        peers = fourbit.layer_peers(m, x, wt)
        kw = fourbit.layer_keywords(m, b1, b2)
    for op, (a_dtype, peak) in VARIANTS.items():
        if why:
            t = Times()
            t["ours"] = why
            out.append(ctx.row(op, m, T, t, peers=[], traffic=traffic, compute=peak))
            continue
        fns = {"ours": lambda ids, w, a_dtype=a_dtype: moe_kernels.cutlass_moe_mxfp4(
            x, wt["w1"], wt["w2"], w, ids, wt["s1"], wt["s2"], a_dtype=a_dtype, **kw)}
        fns.update({name: fn for name, fn in peers.items() if not isinstance(fn, str)})
        t = ctx.measure(fns, sets)
        t.update({name: fn for name, fn in peers.items() if isinstance(fn, str)})
        out.append(ctx.row(op, m, T, t, 6 * T * K * H * I, peak, peers=list(peers), traffic=traffic, compute=peak,
                           a_dtype=str(a_dtype).replace("torch.", ""), routings=len(sets), touched_experts=touched))
    return out


def run(ctx: Context) -> list:
    out = []
    # Without the op, no weights: the rows say why they were skipped.
    setup = weights if features.function("cutlass_moe_mxfp4") else (lambda m: None)
    for m, T, wt in ctx.grid_with(TOKENS, QUICK_TOKENS, setup, skip=lambda m: m.H % 32 or m.I % 32):
        out += rows(ctx, m, T, wt)
    return out
