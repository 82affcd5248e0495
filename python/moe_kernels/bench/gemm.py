"""The FP8 grouped GEMM (per-tensor and rowwise scales) against torch._scaled_grouped_mm (FP8,
rowwise scales) and torch._grouped_mm (bf16), on the two GEMMs of each model's MoE layer, and the
FP8 dense peak.

FLOPs: 2*M*N*K per grouped GEMM, M = T*K rows spread over E experts by random routing.
Roofline: roofline.grouped_gemm over the experts that own rows (e4m3 A and its scales in, the touched
experts' e4m3 weights and scales, bf16 out). gemm1: N = 2I, K = H; gemm2: N = H, K = I. Context.gemm_configs forces compiled configurations
(MOE_KERNELS_GEMM_CONFIG, read on the host at capture time); None is the automatic choice.
"""

import torch

import moe_kernels

from . import roofline
from .harness import FP8, ROTATION_MAX_SETS, Context, forced_gemm_config, sets_for

TOKENS = [16, 128, 1024, 4096, 16384]
QUICK_TOKENS = [16, 1024, 4096]


def routed_offsets(T, K, E):
    """Expert offsets [E+1] int64 and ids [T, K] int32 of a random routing."""
    ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :K]
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, ids.int()


def weights(m):
    """bf16 and fp8 weights of both GEMMs: {name: (N, K, bf16 [E,N,K], fp8 [E,N,K])}."""
    out = {}
    for name, N, K in (("gemm1", 2 * m.I, m.H), ("gemm2", m.H, m.I)):
        b = torch.randn(m.E, N, K, device="cuda", dtype=torch.bfloat16)
        out[name] = (N, K, b, b.to(FP8))
    return out


def chosen_config(M, E, K, forced=None, block_scaled=False):
    """The configuration a grouped GEMM call of these sizes runs (the build's own choice, or the
    forced one), or None where this build cannot say (no grouped_gemm_fp8_choice)."""
    choice = getattr(moe_kernels, "grouped_gemm_fp8_choice", None)
    if choice is None:
        return None
    with forced_gemm_config(forced):
        return choice(M, E, K, block_scaled)


def offsets_sets(T, K, E, bytes_of):
    """Expert offsets of the routings a row's graph cycles through, and the mean experts with rows:
    one routing, or more (drawn afresh) while one call's bytes (bytes_of(touched)) are fewer than
    L2_ROTATION_BYTES, as layer.routing_sets: graph launch latency amortized, experts read from
    memory rather than from the previous call's L2."""
    sets = []
    while True:
        sets.append(routed_offsets(T, K, E)[0])
        touched = [roofline.experts_with_rows(o) for o in sets]
        if len(sets) >= sets_for(bytes_of(touched[0]), ROTATION_MAX_SETS):
            return sets, sum(touched) / len(touched)


def gemm_rows(ctx, m, T, name, N, K, b16, b8):
    M = T * m.K
    sets, touched = offsets_sets(T, m.K, m.E, lambda n: roofline.grouped_gemm(M, N, K, n, roofline.FP8_TENSOR).read)
    a16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a8 = a16.to(FP8)
    a_s, b_s = torch.ones(1, device="cuda"), torch.ones(m.E, device="cuda")
    sa, sb = torch.ones(M, device="cuda"), torch.ones(m.E, N, device="cuda")
    arg_sets = [(o, o[1:].to(torch.int32)) for o in sets]  # ours, and the peers' int32 cumulative row ends
    b8t, b16t = b8.transpose(1, 2), b16.transpose(1, 2)
    gemm = moe_kernels.cutlass_grouped_gemm_fp8
    rows = []
    for config in ctx.gemm_configs:
        with forced_gemm_config(config):
            t = ctx.measure({
                "tensor": lambda o, offs: gemm(a8, b8, a_s, b_s, o),
                "rowwise": lambda o, offs: gemm(a8, b8, sa, sb, o),
                "torch_scaled_grouped_mm": lambda o, offs: torch._scaled_grouped_mm(
                    a8, b8t, sa, sb, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=True),
                "torch_grouped_mm_bf16": lambda o, offs: torch._grouped_mm(a16, b16t, offs=offs),
            }, arg_sets)
        peers = [k for k in t if k.startswith("torch")]
        traffic = {"tensor": roofline.grouped_gemm(M, N, K, touched, roofline.FP8_TENSOR, a_scale_bytes=4),
                   "rowwise": roofline.grouped_gemm(M, N, K, touched, roofline.FP8_CHANNEL, a_scale_bytes=4 * M)}
        for ours in ("tensor", "rowwise"):
            rows.append(ctx.row(name if ours == "tensor" else f"{name}_rowwise", m, T, t, 2 * M * N * K, "fp8",
                                ours=ours, peers=peers, traffic=traffic[ours], config=config or "auto",
                                config_run=chosen_config(M, m.E, K, config), M=M, N=N, K=K,
                                touched_experts=touched, routings=len(sets)))
    return rows


def run(ctx: Context) -> list:
    rows = []
    for m, T, w in ctx.grid_with(TOKENS, QUICK_TOKENS, weights):
        for name, (N, K, b16, b8) in w.items():
            rows += gemm_rows(ctx, m, T, name, N, K, b16, b8)
    return rows
