"""The block-scaled FP8 grouped GEMM (1x128 activation groups, 128x128 weight blocks: the
DeepSeek-V3 / Qwen3-FP8 checkpoint format) against our per-channel FP8 GEMM on the same shapes and
against the torch path for such checkpoints: activations dequantized per call, weights dequantized
once at load to bf16, torch._grouped_mm.

FLOPs: 2*M*N*K per grouped GEMM, M = T*K rows spread over E experts by random routing.
Roofline: roofline.grouped_gemm over the experts that own rows (block scales of A and B counted).
Context.gemm_configs forces compiled configurations (block ones apply to the block call only).
"""

import torch

import moe_kernels

from .gemm import routed_offsets
from . import roofline
from .harness import FP8, Context, forced_gemm_config

TOKENS = [16, 128, 1024, 4096, 16384]
QUICK_TOKENS = [16, 4096]
BLOCK = 128


def gemm_rows(ctx, m, T, name, N, K, b8, b_blk, b16t, offsets):
    M = T * m.K
    a8 = torch.randn(M, K, device="cuda").to(FP8)
    a_blk = torch.rand(M, K // BLOCK, device="cuda") + 0.5
    a_tok, b_ch = torch.ones(M, device="cuda"), torch.ones(m.E, N, device="cuda")
    offs = offsets[1:].to(torch.int32)
    a_expand = a_blk.repeat_interleave(BLOCK, 1).to(torch.bfloat16)
    gemm = moe_kernels.cutlass_grouped_gemm_fp8
    rows = []
    for config in ctx.gemm_configs:
        with forced_gemm_config(config):
            t = ctx.measure({
                "block": lambda: gemm(a8, b8, a_blk, b_blk, offsets),
                "ours_per_channel": lambda: gemm(a8, b8, a_tok, b_ch, offsets),
                "torch_dequant_grouped_mm": lambda: torch._grouped_mm(a8.to(torch.bfloat16) * a_expand, b16t,
                                                                      offs=offs),
            })
        touched = roofline.experts_with_rows(offsets)
        traffic = roofline.grouped_gemm(M, N, K, touched, roofline.FP8_BLOCK, a_scale_bytes=4 * M * (K // BLOCK))
        rows.append(ctx.row(f"{name}_block", m, T, t, 2 * M * N * K, "fp8", ours="block", traffic=traffic,
                            config=config or "auto", M=M, N=N, K=K, touched_experts=touched))
    return rows


def weights(m):
    """Both GEMMs' e4m3 weights, block scales and the torch path's bf16 dequantized copy (made once,
    as a loader would): {name: (N, K, b8, b_blk, b16t)}."""
    w = {}
    for name, N, K in (("gemm1", 2 * m.I, m.H), ("gemm2", m.H, m.I)):
        b8 = torch.randn(m.E, N, K, device="cuda").to(FP8)
        b_blk = torch.rand(m.E, N // BLOCK, K // BLOCK, device="cuda") + 0.5
        b16t = (b8.to(torch.bfloat16) * b_blk.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
                .to(torch.bfloat16)).transpose(1, 2)
        w[name] = (N, K, b8, b_blk, b16t)
    return w


def run(ctx: Context) -> list:
    rows = []
    for m, T, w in ctx.grid_with(TOKENS, QUICK_TOKENS, weights, skip=lambda m: m.H % BLOCK or m.I % BLOCK):
        offsets, _ = routed_offsets(T, m.K, m.E)
        for name, (N, K, b8, b_blk, b16t) in w.items():
            rows += gemm_rows(ctx, m, T, name, N, K, b8, b_blk, b16t, offsets)
    return rows
