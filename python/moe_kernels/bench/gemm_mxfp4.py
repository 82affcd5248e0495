"""The MXFP4 grouped GEMM (4-bit E2M1 weights with E8M0 scales per 1x32, converted in registers)
with bf16 activations (W4A16, rows `gemm1_mxfp4`, `gemm2_mxfp4`) and with e4m3 activations scaled
per row (W4A8, rows `gemm1_mxfp4_a8`, `gemm2_mxfp4_a8`), against our FP8 grouped GEMM with per-row
and per-channel scales on the same rows (peer `ours_fp8`: speedup = its time / ours) and
torch._grouped_mm in bf16, on the two GEMMs of each model's layer.

FLOPs: 2*M*N*K, M = T*K rows spread over E experts by random routing; against the bf16 peak for
W4A16 and the FP8 peak for W4A8. Roofline: roofline.grouped_gemm over the experts that own rows
(half a byte per weight plus one scale byte per 32). A build without the MXFP4 GEMM (branch fp4)
gives rows marked skipped.
"""

import torch

import moe_kernels

from . import fourbit, roofline
from .gemm import offsets_sets
from .harness import FP8, Context, Times

TOKENS = [16, 128, 1024, 4096, 16384]
QUICK_TOKENS = [16, 64, 4096]


def weights(m):
    """Both GEMMs' MXFP4 weights and the peers' fp8 and bf16 weights of the same shapes:
    {name: (N, K, blocks, scales, fp8 [E, N, K], bf16 [E, N, K])}."""
    out = {}
    for name, N, K in (("gemm1", 2 * m.I, m.H), ("gemm2", m.H, m.I)):
        blocks, scales = fourbit.mxfp4_weight(m.E, N, K)
        b16 = torch.randn(m.E, N, K, device="cuda", dtype=torch.bfloat16)
        out[name] = (N, K, blocks, scales, b16.to(FP8), b16)
    return out


def gemm_rows(ctx, m, T, name, N, K, blocks, scales, b8, b16, gemm):
    M = T * m.K
    sets, touched = offsets_sets(T, m.K, m.E, lambda n: roofline.grouped_gemm(M, N, K, n, roofline.MXFP4).read)
    arg_sets = [(o, o[1:].to(torch.int32)) for o in sets]  # ours, and the torch peer's int32 row ends
    a16 = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    a8 = a16.to(FP8)
    sa, sb = torch.ones(M, device="cuda"), torch.ones(m.E, N, device="cuda")
    peers = {"ours_fp8": lambda o, offs: moe_kernels.cutlass_grouped_gemm_fp8(a8, b8, sa, sb, o),
             "torch_grouped_mm_bf16": lambda o, offs: torch._grouped_mm(a16, b16.transpose(1, 2), offs=offs)}
    variants = {  # op: (our call, bytes per A element, A scale bytes, MMA peak)
        f"{name}_mxfp4": (lambda o, offs: fourbit.call_gemm(gemm, a16, blocks, scales, o), 2, 0, "bf16"),
        f"{name}_mxfp4_a8": (lambda o, offs: fourbit.call_gemm(gemm, a8, blocks, scales, o, sa), 1, 4 * M, "fp8"),
    }
    rows = []
    for op, (ours, a_bytes, a_scale_bytes, peak) in variants.items():
        traffic = roofline.grouped_gemm(M, N, K, touched, roofline.MXFP4, a_bytes=a_bytes, a_scale_bytes=a_scale_bytes)
        if isinstance(gemm, str):
            t = Times()
            t["ours"] = gemm
            rows.append(ctx.row(op, m, T, t, peers=[], traffic=traffic, compute=peak))
            continue
        t = ctx.measure({"ours": ours, **peers}, arg_sets)
        rows.append(ctx.row(op, m, T, t, 2 * M * N * K, peak, peers=list(peers), traffic=traffic, compute=peak,
                            M=M, N=N, K=K, touched_experts=touched, routings=len(sets)))
    return rows


def run(ctx: Context) -> list:
    gemm = fourbit.mxfp4_gemm()
    # Without the op, no weights: the rows say why they were skipped.
    setup = weights if not isinstance(gemm, str) else (lambda m: {n: (N, K, None, None, None, None) for n, N, K in
                                                                  (("gemm1", 2 * m.I, m.H), ("gemm2", m.H, m.I))})
    rows = []
    for m, T, w in ctx.grid_with(TOKENS, QUICK_TOKENS, setup, skip=lambda m: m.H % 32 or m.I % 32):
        for name, (N, K, blocks, scales, b8, b16) in w.items():
            rows += gemm_rows(ctx, m, T, name, N, K, blocks, scales, b8, b16, gemm)
    return rows
