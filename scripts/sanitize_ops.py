"""Small calls of every CUDA op, for compute-sanitizer (memcheck, racecheck, synccheck).

Run: compute-sanitizer --tool racecheck python3 scripts/sanitize_ops.py [--generated N]
Each op runs on shapes that exercise its edge paths (tails, padding, dropped choices, T = 0), then
on N generated cases per op family (tests/test_generated.py's strategies, a fixed seed: the same
cases every run), each compared with the CPU reference.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

import moe_kernels


def run_permute():
    for T, K, E, local, align, H, dtype in [(300, 8, 64, 16, 16, 2055, torch.bfloat16),
                                             (5, 2, 8, None, 0, 4096, torch.float32),
                                             (0, 4, 8, None, 8, 64, torch.float16),
                                             (2000, 8, 256, None, 0, 512, torch.float8_e4m3fn)]:
        x = torch.randn(T, H, device="cuda").to(dtype)
        ids = torch.rand(T, E, device="cuda").argsort(1)[:, :K].int().contiguous()
        emap = None
        if local:
            emap = torch.full((E,), -1, dtype=torch.int32, device="cuda")
            emap[torch.randperm(E, device="cuda")[:local]] = torch.arange(local, dtype=torch.int32, device="cuda")
        permuted, offsets, inv, _ = moe_kernels.moe_permute(x, ids, E, emap, local or -1, align)
        # Scales moved with the rows: per token, and per group (more groups than a block has threads).
        for scales in (torch.rand(T, device="cuda"), torch.rand(T, 130, device="cuda")):
            moe_kernels.moe_permute(x, ids, E, emap, local or -1, align, scales)
        if dtype != torch.float8_e4m3fn:
            moe_kernels.moe_unpermute(permuted, torch.rand(T, K, device="cuda"), inv)
        moe_kernels.compute_problem_sizes(offsets, 64, H, True)
    bad = torch.tensor([[0, 99], [-1, 3]], device="cuda")
    moe_kernels.moe_sort_tokens(bad, 8)


def run_quant():
    # Vector widths 8/4/2/1 (K = 2056, 12, 2, 7), the uncached per-token path (K > 10240), M = 0.
    static = torch.tensor([0.02], device="cuda")
    for M, K, dtype in [(300, 2056, torch.bfloat16), (7, 12, torch.float16), (33, 2, torch.float32),
                        (5, 7, torch.bfloat16), (3, 12288, torch.bfloat16), (0, 64, torch.float16)]:
        x = torch.randn(M, 2 * K, device="cuda").to(dtype)
        for scale, per_token in [(static, False), (None, False), (None, True)]:
            moe_kernels.scaled_fp8_quant(x, scale, per_token)
            moe_kernels.silu_and_mul_quant_fp8(x, scale, per_token)
    # Per group: one vector a lane (g=128), two lanes a group (g=16), 32 lanes looping (g=1024),
    # scalar loads (g=7), column-major scales, T = 0.
    for M, K, g, dtype in [(300, 7168, 128, torch.bfloat16), (65, 64, 16, torch.float16), (3, 4096, 1024, torch.bfloat16),
                           (5, 21, 7, torch.float32), (33, 256, 128, torch.float32), (0, 128, 128, torch.bfloat16)]:
        x = torch.randn(M, 2 * K, device="cuda").to(dtype)
        moe_kernels.per_token_group_quant_fp8(x, g, False)
        moe_kernels.per_token_group_quant_fp8(x, g, True)
        moe_kernels.silu_and_mul_quant_fp8(x, None, False, g)


def run_ep():
    # Vector widths 16/8/2/1 (H = 2056, 12, 7), both id types, a single-expert range, T = 0, and
    # bad rows/ids (skipped without any access out of bounds).
    for T, K, E, start, end, H, dtype in [(300, 8, 64, 16, 31, 2056, torch.bfloat16),
                                          (7, 2, 8, 3, 3, 12, torch.float32),
                                          (33, 4, 16, 0, 7, 7, torch.float16),
                                          (50, 8, 256, 0, 31, 2056, torch.float8_e4m3fn),
                                          (0, 4, 8, 0, 7, 64, torch.bfloat16)]:
        x = torch.randn(T, H, device="cuda").to(dtype)
        ids = torch.rand(T, E, device="cuda").argsort(1)[:, :K].contiguous()
        for id_dtype in (torch.int32, torch.int64):
            ids = ids.to(id_dtype)
            _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, E)
            rows = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end)
            if dtype == torch.float8_e4m3fn:
                continue
            for scale in (torch.tensor([0.02], device="cuda"), torch.rand(T, device="cuda") + 0.01):
                moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end, scale, torch.float8_e4m3fn)
            moe_kernels.ep_post_reorder(rows, src2dst, ids, torch.rand(T, K, device="cuda"), start, end)
    ids = torch.tensor([[0, -1], [99, 3], [2, 7]], device="cuda")
    src2dst = torch.tensor([[1, 0], [2, -5], [6, 1 << 30]], dtype=torch.int32, device="cuda")
    x = torch.randn(3, 8, device="cuda")
    moe_kernels.ep_pre_reorder(x, src2dst, ids, 0, 7)
    moe_kernels.ep_post_reorder(torch.randn(6, 8, device="cuda"), src2dst, ids, torch.ones(3, 2, device="cuda"), 0, 7)


def run_ep_dispatch():
    # The packed all-to-all dispatch: row widths 16/2/1 bytes (H = 7168 fp8, 13 bf16, 13 fp8), every
    # scale count, both id types, variable splits and a capacity that drops records, 64 ranks, T = 0,
    # bad ids (-1, past the experts) and slots outside the buffer (skipped).
    for T, K, W, epr, H, dtype, G in [(300, 8, 2, 128, 7168, torch.float8_e4m3fn, 1),
                                      (37, 4, 4, 2, 13, torch.bfloat16, 0),
                                      (64, 8, 64, 4, 13, torch.float8_e4m3fn, 3),
                                      (0, 2, 2, 4, 64, torch.float32, 2)]:
        x = torch.randn(T, H, device="cuda").to(dtype)
        ids = torch.rand(T, W * epr, device="cuda").argsort(1)[:, :K].contiguous()
        if T:
            ids[0, 0], ids[-1, -1] = -1, W * epr + 5
        w = torch.rand(T, K, device="cuda")
        scales = None if G == 0 else torch.rand(T, G, device="cuda")
        for id_dtype in (torch.int32, torch.int64):
            ids = ids.to(id_dtype)
            for capacity in (-1, max(1, T // (2 * W)), T):
                slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, W, capacity)
                n = int(counts.sum()) if capacity < 0 else W * capacity
                records = moe_kernels.ep_pack_records(x, scales, w, ids, slots, counts, n, epr, capacity)
                moe_kernels.ep_unpack_records(records, H, dtype, G, K)
    slots = torch.tensor([[0, 5], [-3, 1 << 30]], dtype=torch.int32, device="cuda")
    x = torch.randn(2, 16, device="cuda")
    moe_kernels.ep_pack_records(x, None, torch.rand(2, 2, device="cuda"), torch.zeros(2, 2, dtype=torch.int32,
                                device="cuda"), slots, torch.ones(2, dtype=torch.int32, device="cuda"), 3, 4)


def run_routing():
    # Grouped (with and without bias) and plain top-k, every scores dtype, fused shared slots, T = 0.
    for T, E, G, tg, k, scoring, with_bias, dtype in [(300, 256, 8, 4, 8, "sigmoid", True, torch.bfloat16),
                                                      (5, 160, 8, 3, 6, "softmax", False, torch.float32),
                                                      (33, 384, 1, 1, 8, "sigmoid", True, torch.float16),
                                                      (0, 8, 1, 1, 2, "softmax", False, torch.float32)]:
        scores = torch.randn(T, E, device="cuda").to(dtype)
        bias = torch.randn(E, device="cuda") if with_bias else None
        moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, True, 1, 2.5, False)


def run_gemm():
    # Every compiled configuration, per-tensor and per-token/per-channel scales (the epilogue's
    # broadcasts read exactly M and E*N floats), on empty experts, one expert with many rows and the
    # smallest aligned N and K; then the layer.
    fp8 = torch.float8_e4m3fn
    for config in moe_kernels.grouped_gemm_fp8_configs():
        os.environ["MOE_KERNELS_GEMM_CONFIG"] = config
        for counts, N, K in [([5, 0, 37, 1], 64, 128), ([3, 1], 8, 16), ([0, 150, 2], 256, 512)]:
            offsets = torch.tensor([0] + counts, device="cuda").cumsum(0)
            M, E = int(offsets[-1]), len(counts)
            a = torch.randn(M, K, device="cuda").to(fp8)
            b = torch.randn(E, N, K, device="cuda").to(fp8)
            moe_kernels.cutlass_grouped_gemm_fp8(a, b, torch.ones(1, device="cuda"), torch.ones(E, device="cuda"), offsets)
            moe_kernels.cutlass_grouped_gemm_fp8(a, b, torch.rand(M, device="cuda"), torch.rand(E, N, device="cuda"),
                                                 offsets)
    os.environ.pop("MOE_KERNELS_GEMM_CONFIG")
    # Offsets past M and decreasing: clamped on the device, nothing outside a or out is touched.
    a = torch.randn(8, 32, device="cuda").to(fp8)
    b = torch.randn(3, 16, 32, device="cuda").to(fp8)
    moe_kernels.cutlass_grouped_gemm_fp8(a, b, torch.ones(1, device="cuda"), torch.ones(3, device="cuda"),
                                         torch.tensor([0, 6, 3, 100], device="cuda"))
    x = torch.randn(33, 256, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(8, 256, 256, device="cuda") * 0.05).to(fp8)
    w2 = (torch.randn(8, 256, 128, device="cuda") * 0.05).to(fp8)
    ids = torch.rand(33, 8, device="cuda").argsort(1)[:, :2].int().contiguous()
    moe_kernels.cutlass_moe_fp8(x, w1, w2, torch.rand(33, 2, device="cuda"), ids, torch.ones(8, device="cuda"),
                                torch.ones(8, device="cuda"))
    # Pre-quantized input with per-token scales (moved by moe_permute), then block mode.
    q, s = moe_kernels.scaled_fp8_quant(x, None, True)
    moe_kernels.cutlass_moe_fp8(q, w1, w2, torch.rand(33, 2, device="cuda"), ids, torch.ones(8, device="cuda"),
                                torch.ones(8, device="cuda"), s, None, True)
    moe_kernels.cutlass_moe_fp8(x, w1, w2, torch.rand(33, 2, device="cuda"), ids, torch.ones(8, 2, 2, device="cuda"),
                                torch.ones(8, 2, 1, device="cuda"))


def run_generated(examples):
    """The CUDA checks of tests/test_generated.py on `examples` derandomized cases per op family
    (no shrinking: a failure reports its case and stops)."""
    if examples <= 0:
        return
    try:
        from hypothesis import HealthCheck, Phase, given, settings
    except ImportError:
        print("sanitize_ops: SKIPPED the generated cases: hypothesis is not installed "
              "(stage it: shared/gpu/stage-wheels.sh hypothesis attrs sortedcontainers)")
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_generated

    budget = settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    for name, strategy, check in test_generated.CUDA_CHECKS:
        budget(given(strategy)(check))()
        print(f"sanitize_ops: {examples} generated {name} cases")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--generated", type=int, default=4, help="generated cases per op family (0: none)")
    cli = parser.parse_args()
    run_permute()
    run_quant()
    run_ep()
    run_ep_dispatch()
    run_routing()
    run_gemm()
    run_generated(cli.generated)
    torch.cuda.synchronize()
    print("sanitize_ops: done")
