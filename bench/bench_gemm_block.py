"""The block-scaled FP8 grouped GEMM (1x128 activation groups, 128x128 weight blocks) against our
per-channel FP8 GEMM on the same shapes and against the torch path (activations dequantized per
call, weights dequantized once to bf16 at load, torch._grouped_mm), on DeepSeek-V3, Qwen3-235B and
Qwen3-30B-A3B expert shapes.

FLOPs: 2*M*N*K per grouped GEMM (M = T*topk rows spread over E experts by random routing).
Ceiling: the FP8 dense peak measured in the same run (torch._scaled_mm, 8192^3, fast accumulation).
Run: python bench/bench_gemm_block.py [--tokens 16 1024] [--models deepseek-v3]
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_gemm import fp8_peak, routed_offsets  # noqa: E402

import moe_kernels  # noqa: E402

FP8 = torch.float8_e4m3fn
MODELS = {  # name: (E, topk, H, I)
    "deepseek-v3": (256, 8, 7168, 2048),
    "qwen3-235b": (128, 8, 4096, 1536),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
TOKENS = [16, 128, 1024, 4096, 16384]


def bench_block_gemm(name, E, M, N, K, offsets, peak, config=None):
    a = torch.randn(M, K, device="cuda").to(FP8)
    b = torch.randn(E, N, K, device="cuda").to(FP8)
    a_blk = torch.rand(M, K // 128, device="cuda") + 0.5
    b_blk = torch.rand(E, N // 128, K // 128, device="cuda") + 0.5
    a_tok, b_ch = torch.ones(M, device="cuda"), torch.ones(E, N, device="cuda")
    b_bf16 = (b.to(torch.bfloat16) * b_blk.repeat_interleave(128, 1).repeat_interleave(128, 2).to(torch.bfloat16))
    bt = b_bf16.transpose(1, 2)
    offs = offsets[1:].to(torch.int32)
    flops = 2 * M * N * K
    if config:
        os.environ["MOE_KERNELS_GEMM_CONFIG"] = config
    fns = {"block": lambda: moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_blk, b_blk, offsets),
           "channel": lambda: moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_tok, b_ch, offsets),
           "torch": lambda: torch._grouped_mm(
               (a.to(torch.bfloat16) * a_blk.repeat_interleave(128, 1).to(torch.bfloat16)), bt, offs=offs)}
    t = harness.time_interleaved(fns)
    os.environ.pop("MOE_KERNELS_GEMM_CONFIG", None)
    del b_bf16, bt
    return {"gemm": name, "config": config or "auto", "M": M, "N": N, "K": K, "us": t["block"] * 1e6,
            "TFLOPs": flops / t["block"] / 1e12, "frac_fp8_peak": flops / t["block"] / peak,
            "channel_us": t["channel"] * 1e6, "vs_channel": t["channel"] / t["block"],
            "torch_us": t["torch"] * 1e6, "vs_torch": t["torch"] / t["block"]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--configs", nargs="*", default=[None], help="force these block configurations")
    args = parser.parse_args()
    peak = fp8_peak()
    rows = []
    for name in args.models:
        E, topk, H, I = MODELS[name]
        for T in args.tokens:
            offsets, _ = routed_offsets(T, topk, E)
            for gemm, N, K in (("gemm1", 2 * I, H), ("gemm2", H, I)):
                for config in args.configs:
                    r = bench_block_gemm(f"{name}/{gemm}", E, T * topk, N, K, offsets, peak, config)
                    r["T"] = T
                    rows.append(r)
            torch.cuda.empty_cache()
    harness.print_table(rows, ["gemm", "T", "config", "M", "N", "K", "us", "TFLOPs", "frac_fp8_peak", "channel_us",
                               "vs_channel", "torch_us", "vs_torch"])
    print(f"fp8 dense peak (torch._scaled_mm 8192^3): {peak / 1e12:.0f} TFLOP/s")
    print(f"saved {harness.save('gemm_block', {'fp8_peak_flops': peak}, rows)}")


if __name__ == "__main__":
    main()
