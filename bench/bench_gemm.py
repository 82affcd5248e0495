"""The FP8 grouped GEMM against torch._scaled_grouped_mm, and the whole FP8 layer against bf16 and
fp8 PyTorch layers, on the MoE shapes of Mixtral-8x7B, Qwen3-235B and DeepSeek-V3.

FLOPs: 2*M*N*K per grouped GEMM (M = T*topk rows spread over E experts by random routing).
Ceiling: the FP8 dense peak measured in the same run (torch._scaled_mm, 8192^3, fast accumulation).
Run: python bench/bench_gemm.py [--no-layer]  (the layer is timed at T in LAYER_TOKENS)
     python bench/bench_gemm.py --configs all --no-layer   (every compiled configuration, forced
     through MOE_KERNELS_GEMM_CONFIG; build with -DMOE_KERNELS_GEMM_TRIAL=ON for the candidates)
"""

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import moe_kernels  # noqa: E402

FP8 = torch.float8_e4m3fn
MODELS = {  # name: (E, topk, H, I)
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-235b": (128, 8, 4096, 1536),
    "deepseek-v3": (256, 8, 7168, 2048),
}
TOKENS = [16, 128, 1024, 4096, 16384]
LAYER_TOKENS = [16, 1024, 4096]


def fp8_peak():
    a = torch.randn(8192, 8192, device="cuda").to(FP8)
    b = torch.randn(8192, 8192, device="cuda").to(FP8).t()
    one = torch.ones((), device="cuda")
    t = harness.time_per_call(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16,
                                                       use_fast_accum=True), [()], reps=10)
    return 2 * 8192**3 / t


def routed_offsets(T, topk, E):
    ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :topk]
    counts = torch.bincount(ids.reshape(-1), minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = torch.cumsum(counts, 0)
    return offsets, ids.int()


def bench_gemm(name, E, M, N, K, offsets, peak, configs):
    """Our GEMM with per-tensor and with rowwise (per-token x per-channel) scales, each compiled
    configuration in `configs` (None: the automatic choice), and torch._scaled_grouped_mm with
    rowwise scales on the same inputs."""
    a = torch.randn(M, K, device="cuda").to(FP8)
    b = torch.randn(E, N, K, device="cuda").to(FP8)
    a_s, b_s = torch.ones(1, device="cuda"), torch.ones(E, device="cuda")
    sa, sb = torch.ones(M, device="cuda"), torch.ones(E, N, device="cuda")
    flops = 2 * M * N * K
    offs = offsets[1:].to(torch.int32)  # the peer's int32 cumulative row ends
    bt = b.transpose(1, 2)
    rows = []
    for config in configs:
        if config:  # read on the host at capture time, so the graph keeps this configuration
            os.environ["MOE_KERNELS_GEMM_CONFIG"] = config
        fns = {"us": lambda: moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, offsets),
               "rowwise_us": lambda: moe_kernels.cutlass_grouped_gemm_fp8(a, b, sa, sb, offsets),
               "torch_us": lambda: torch._scaled_grouped_mm(a, bt, sa, sb, offs=offs, out_dtype=torch.bfloat16,
                                                            use_fast_accum=True)}
        try:
            t = harness.time_interleaved(fns)
        except RuntimeError as e:  # the peer may be missing on this torch: time ours alone
            fns.pop("torch_us")
            t = harness.time_interleaved(fns)
            t["torch_error"] = str(e).splitlines()[0][:60]
        os.environ.pop("MOE_KERNELS_GEMM_CONFIG", None)
        row = {"gemm": name, "config": config or "auto", "M": M, "N": N, "K": K, "us": t["us"] * 1e6,
               "TFLOPs": flops / t["us"] / 1e12, "frac_fp8_peak": flops / t["us"] / peak,
               "rowwise_us": t["rowwise_us"] * 1e6, "rowwise_TFLOPs": flops / t["rowwise_us"] / 1e12}
        if "torch_us" in t:
            row.update({"torch_us": t["torch_us"] * 1e6, "speedup": t["torch_us"] / t["us"],
                        "speedup_rowwise": t["torch_us"] / t["rowwise_us"]})
        else:
            row["torch_error"] = t["torch_error"]
        rows.append(row)
    return rows


def quant_rows(x):
    """Per-row fp8 quantization in plain torch: (q, scale [rows])."""
    s = (x.abs().amax(dim=1).float() / 448.0).clamp(min=1e-12)
    return (x.float() / s[:, None]).clamp(-448, 448).to(FP8), s


def torch_fp8_layer(x, w1, w2, s1, s2, w, ids, E):
    """Plain permute, per-token quant, torch._scaled_grouped_mm (rowwise), silu*mul, requant,
    torch._scaled_grouped_mm, unpermute: the fp8 layer a user writes from torch ops alone."""
    T, K = ids.shape
    order = torch.argsort(ids.view(-1), stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, ids.view(-1).long(), torch.ones_like(ids.view(-1)))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xq, xs = quant_rows(x)
    xs_rows = xq.index_select(0, order // K)
    h = torch._scaled_grouped_mm(xs_rows, w1.transpose(1, 2), xs[order // K], s1, offs=offs,
                                 out_dtype=torch.bfloat16, use_fast_accum=True)
    I = w2.shape[2]
    yq, ys = quant_rows(torch.nn.functional.silu(h[:, :I]) * h[:, I:])
    o = torch._scaled_grouped_mm(yq, w2.transpose(1, 2), ys, s2, offs=offs, out_dtype=torch.bfloat16,
                                 use_fast_accum=True)
    out = torch.empty_like(o)
    out[order] = o
    return (out.view(T, K, -1).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)


def torch_bf16_layer(x, w1, w2, w, ids, E):
    """Plain permute (argsort + index_select), torch._grouped_mm, silu*mul, unpermute."""
    T, K = ids.shape
    order = torch.argsort(ids.view(-1), stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, ids.view(-1).long(), torch.ones_like(ids.view(-1)))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    xs = x.index_select(0, order // K)
    h = torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs)
    I = w2.shape[2]
    y = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    o = torch._grouped_mm(y, w2.transpose(1, 2), offs=offs)
    out = torch.empty_like(o)
    out[order] = o
    return (out.view(T, K, -1).float() * w.unsqueeze(-1)).sum(1).to(x.dtype)


def bench_layer(name, E, topk, H, I, T):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(E, 2 * I, H, device="cuda") * 0.05).to(FP8)
    w2 = (torch.randn(E, H, I, device="cuda") * 0.05).to(FP8)
    s = torch.ones(E, device="cuda")
    a1, a2 = torch.tensor([0.02], device="cuda"), torch.tensor([0.02], device="cuda")
    offsets, ids = routed_offsets(T, topk, E)
    w = torch.rand(T, topk, device="cuda")
    M = T * topk
    xq = torch.randn(M, H, device="cuda").to(FP8)
    yq = torch.randn(M, I, device="cuda").to(FP8)
    sr1, sr2 = torch.ones(E, 2 * I, device="cuda"), torch.ones(E, H, device="cuda")
    # The layer's steps alone, on this routing and the layer's scales: the two GEMMs and what
    # surrounds them (quantize, sort + permute, silu*mul + quantize, weighted unpermute).
    h1 = torch.randn(M, 2 * I, device="cuda", dtype=torch.bfloat16)
    h2 = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    xq_tokens, _ = moe_kernels.scaled_fp8_quant(x, a1)
    _, _, inv, _ = moe_kernels.moe_permute(xq_tokens, ids, E)
    t = harness.time_interleaved({
        "us": lambda: moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, s, s, a1, a2),
        "gemm1": lambda: moe_kernels.cutlass_grouped_gemm_fp8(xq, w1, a1, s, offsets),
        "gemm2": lambda: moe_kernels.cutlass_grouped_gemm_fp8(yq, w2, a2, s, offsets),
        "quant": lambda: moe_kernels.scaled_fp8_quant(x, a1),
        "permute": lambda: moe_kernels.moe_permute(xq_tokens, ids, E),
        "silu_quant": lambda: moe_kernels.silu_and_mul_quant_fp8(h1, a2),
        "unpermute": lambda: moe_kernels.moe_unpermute(h2, w, inv),
        "torch_fp8_us": lambda: torch_fp8_layer(x, w1, w2, sr1, sr2, w, ids, E),
    })
    row = {"layer": name, "T": T, "us": t["us"] * 1e6, "outside_gemm_share": max(0.0, 1 - (t["gemm1"] + t["gemm2"]) / t["us"]),
           "torch_fp8_us": t["torch_fp8_us"] * 1e6, "speedup_vs_fp8": t["torch_fp8_us"] / t["us"]}
    row.update({f"{step}_us": t[step] * 1e6 for step in ("gemm1", "gemm2", "quant", "permute", "silu_quant", "unpermute")})
    del h1, h2
    del w1, w2, xq, yq
    # The bf16 peer needs bf16 weights (twice the fp8 bytes): timed after the fp8 ones are freed,
    # next to a fresh timing of ours so both see the same clocks.
    w1b = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * 0.05
    w2b = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * 0.05
    w1 = w1b.to(FP8)
    w2 = w2b.to(FP8)
    t = harness.time_interleaved({"us": lambda: moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, s, s, a1, a2),
                                  "bf16": lambda: torch_bf16_layer(x, w1b, w2b, w, ids, E)})
    row.update({"torch_bf16_us": t["bf16"] * 1e6, "speedup_vs_bf16": t["bf16"] / t["us"]})
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--no-layer", action="store_true", help="time the grouped GEMMs only")
    parser.add_argument("--configs", nargs="*", default=[],
                        help="force these configurations ('all': every compiled one); default: automatic")
    parser.add_argument("--tag", default=None, help="results file name prefix (default: gemm or gemm_configs)")
    args = parser.parse_args()
    configs = moe_kernels.grouped_gemm_fp8_configs() if args.configs == ["all"] else args.configs
    configs = configs or [None]
    peak = fp8_peak()
    gemm_rows, layer_rows = [], []
    for name in args.models:
        E, topk, H, I = MODELS[name]
        for T in args.tokens:
            offsets, _ = routed_offsets(T, topk, E)
            M = T * topk
            for gemm, N, K in (("gemm1", 2 * I, H), ("gemm2", H, I)):
                for r in bench_gemm(f"{name}/{gemm}", E, M, N, K, offsets, peak, configs):
                    r["T"] = T
                    gemm_rows.append(r)
            if not args.no_layer and T in LAYER_TOKENS:
                layer_rows.append(bench_layer(name, E, topk, H, I, T))
            torch.cuda.empty_cache()
    harness.print_table(gemm_rows, ["gemm", "T", "config", "M", "N", "K", "us", "TFLOPs", "frac_fp8_peak",
                                    "rowwise_us", "rowwise_TFLOPs", "torch_us", "speedup", "speedup_rowwise",
                                    "torch_error"])
    if layer_rows:
        harness.print_table(layer_rows, ["layer", "T", "us", "outside_gemm_share", "torch_fp8_us", "speedup_vs_fp8",
                                         "torch_bf16_us", "speedup_vs_bf16"])
        harness.print_table(layer_rows, ["layer", "T", "gemm1_us", "gemm2_us", "quant_us", "permute_us", "silu_quant_us",
                                         "unpermute_us"])
    print(f"fp8 dense peak (torch._scaled_mm 8192^3): {peak / 1e12:.0f} TFLOP/s")
    tag = args.tag or ("gemm_configs" if configs != [None] else "gemm")
    print(f"saved {harness.save(tag, {'fp8_peak_flops': peak}, gemm_rows + layer_rows)}")


if __name__ == "__main__":
    main()
