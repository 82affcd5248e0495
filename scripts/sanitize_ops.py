"""Small calls of every CUDA op, for compute-sanitizer (memcheck, racecheck, synccheck).

Run: compute-sanitizer --tool racecheck python3 scripts/sanitize_ops.py [--generated N] [--only F,G]
Each op runs on shapes that exercise its edge paths (tails, padding, dropped choices, T = 0), then
on N generated cases per op family (tests/test_generated.py's strategies, a fixed seed: the same
cases every run), each compared with the CPU reference.

The third wave's kernels (the gated activations and biases of the activation-quantization op and
of the weighted gather, the 4-bit grouped GEMMs and layers) run where this build has them; a
family whose functions or keywords are missing prints "SKIPPED" with the reason. A family that
raises is reported and the others still run; the exit status is 1 if any family failed.
"""

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

import moe_kernels
from moe_kernels.bench.features import accepts  # whether this build has a function / keyword

DEV = "cuda"  # --device cpu: a dry run of the calls on the CPU references (signatures, shapes), no sanitizer


def run_permute():
    for T, K, E, local, align, H, dtype in [(300, 8, 64, 16, 16, 2055, torch.bfloat16),
                                             (5, 2, 8, None, 0, 4096, torch.float32),
                                             (0, 4, 8, None, 8, 64, torch.float16),
                                             (2000, 8, 256, None, 0, 512, torch.float8_e4m3fn)]:
        x = torch.randn(T, H, device=DEV).to(dtype)
        ids = torch.rand(T, E, device=DEV).argsort(1)[:, :K].int().contiguous()
        emap = None
        if local:
            emap = torch.full((E,), -1, dtype=torch.int32, device=DEV)
            emap[torch.randperm(E, device=DEV)[:local]] = torch.arange(local, dtype=torch.int32, device=DEV)
        permuted, offsets, inv, _ = moe_kernels.moe_permute(x, ids, E, emap, local or -1, align)
        # Scales moved with the rows: per token, and per group (more groups than a block has threads).
        for scales in (torch.rand(T, device=DEV), torch.rand(T, 130, device=DEV)):
            moe_kernels.moe_permute(x, ids, E, emap, local or -1, align, scales)
        if dtype != torch.float8_e4m3fn:
            moe_kernels.moe_unpermute(permuted, torch.rand(T, K, device=DEV), inv)
        moe_kernels.compute_problem_sizes(offsets, 64, H, True)
    if DEV == "cuda":  # the CPU reference rejects bad ids; the kernel skips them without a host sync
        bad = torch.tensor([[0, 99], [-1, 3]], device=DEV)
        moe_kernels.moe_sort_tokens(bad, 8)


def run_quant():
    # Vector widths 8/4/2/1 (K = 2056, 12, 2, 7), M = 0. Per token (x [M, 2K] quantized, and its
    # gated activation [M, K]): rows kept in shared memory (up to 10240 columns) and rows past that
    # bound, recomputed from x (plain 24576, gated 12288 and 20480, fp32 plain 12000), odd
    # columns on both sides (2 * 1501 plain, 1501 gated).
    static = torch.tensor([0.02], device=DEV)
    for M, K, dtype in [(300, 2056, torch.bfloat16), (7, 12, torch.float16), (33, 2, torch.float32),
                        (5, 7, torch.bfloat16), (3, 12288, torch.bfloat16), (0, 64, torch.float16),
                        (17, 1000, torch.float16), (3, 6000, torch.float32), (2, 20480, torch.bfloat16),
                        (3, 1501, torch.bfloat16)]:
        x = torch.randn(M, 2 * K, device=DEV).to(dtype)
        for scale, per_token in [(static, False), (None, False), (None, True)]:
            moe_kernels.scaled_fp8_quant(x, scale, per_token)
            moe_kernels.silu_and_mul_quant_fp8(x, scale, per_token)
    # Per token with blocks that loop over rows (more rows than the grid has blocks): the reuse of
    # a block's shared memory from one row to the next, under racecheck.
    moe_kernels.scaled_fp8_quant(torch.randn(4300, 4104, device=DEV).to(torch.bfloat16), None, True)
    # Per group: one vector a lane (g=128), two lanes a group (g=16), 32 lanes looping (g=1024),
    # scalar loads (g=7), column-major scales, T = 0; a lane's groups spanning rows (K = g = 128),
    # more groups than one grid step covers (4096 x 7168: the grid loops).
    for M, K, g, dtype in [(300, 7168, 128, torch.bfloat16), (65, 64, 16, torch.float16), (3, 4096, 1024, torch.bfloat16),
                           (5, 21, 7, torch.float32), (33, 256, 128, torch.float32), (0, 128, 128, torch.bfloat16),
                           (77, 64, 64, torch.bfloat16), (4096, 3584, 128, torch.bfloat16)]:
        x = torch.randn(M, 2 * K, device=DEV).to(dtype)
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
        x = torch.randn(T, H, device=DEV).to(dtype)
        ids = torch.rand(T, E, device=DEV).argsort(1)[:, :K].contiguous()
        for id_dtype in (torch.int32, torch.int64):
            ids = ids.to(id_dtype)
            _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, E)
            rows = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end)
            if dtype == torch.float8_e4m3fn:
                continue
            for scale in (torch.tensor([0.02], device=DEV), torch.rand(T, device=DEV) + 0.01):
                moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end, scale, torch.float8_e4m3fn)
            moe_kernels.ep_post_reorder(rows, src2dst, ids, torch.rand(T, K, device=DEV), start, end)
    ids = torch.tensor([[0, -1], [99, 3], [2, 7]], device=DEV)
    src2dst = torch.tensor([[1, 0], [2, -5], [6, 1 << 30]], dtype=torch.int32, device=DEV)
    x = torch.randn(3, 8, device=DEV)
    moe_kernels.ep_pre_reorder(x, src2dst, ids, 0, 7)
    moe_kernels.ep_post_reorder(torch.randn(6, 8, device=DEV), src2dst, ids, torch.ones(3, 2, device=DEV), 0, 7)


def run_ep_dispatch():
    # The packed all-to-all dispatch: row widths 16/2/1 bytes (H = 7168 fp8, 13 bf16, 13 fp8), every
    # scale count, both id types, variable splits and a capacity that drops records, 64 ranks, T = 0,
    # bad ids (-1, past the experts) and slots outside the buffer (skipped).
    for T, K, W, epr, H, dtype, G in [(300, 8, 2, 128, 7168, torch.float8_e4m3fn, 1),
                                      (37, 4, 4, 2, 13, torch.bfloat16, 0),
                                      (64, 8, 64, 4, 13, torch.float8_e4m3fn, 3),
                                      (0, 2, 2, 4, 64, torch.float32, 2)]:
        x = torch.randn(T, H, device=DEV).to(dtype)
        ids = torch.rand(T, W * epr, device=DEV).argsort(1)[:, :K].contiguous()
        if T:
            ids[0, 0], ids[-1, -1] = -1, W * epr + 5
        w = torch.rand(T, K, device=DEV)
        scales = None if G == 0 else torch.rand(T, G, device=DEV)
        for id_dtype in (torch.int32, torch.int64):
            ids = ids.to(id_dtype)
            for capacity in (-1, max(1, T // (2 * W)), T):
                slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, W, capacity)
                n = int(counts.sum()) if capacity < 0 else W * capacity
                records = moe_kernels.ep_pack_records(x, scales, w, ids, slots, counts, n, epr, capacity)
                moe_kernels.ep_unpack_records(records, H, dtype, G, K)
    slots = torch.tensor([[0, 5], [-3, 1 << 30]], dtype=torch.int32, device=DEV)
    x = torch.randn(2, 16, device=DEV)
    moe_kernels.ep_pack_records(x, None, torch.rand(2, 2, device=DEV), torch.zeros(2, 2, dtype=torch.int32,
                                device=DEV), slots, torch.ones(2, dtype=torch.int32, device=DEV), 3, 4)


def run_routing():
    # Grouped (with and without bias) and plain top-k, every scores dtype, fused shared slots, T = 0.
    for T, E, G, tg, k, scoring, with_bias, dtype in [(300, 256, 8, 4, 8, "sigmoid", True, torch.bfloat16),
                                                      (5, 160, 8, 3, 6, "softmax", False, torch.float32),
                                                      (33, 384, 1, 1, 8, "sigmoid", True, torch.float16),
                                                      (0, 8, 1, 1, 2, "softmax", False, torch.float32)]:
        scores = torch.randn(T, E, device=DEV).to(dtype)
        bias = torch.randn(E, device=DEV) if with_bias else None
        moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, True, 1, 2.5, False)


def run_gemm():
    # Every compiled configuration (CUTLASS and the decode GEMV), per-tensor and per-token/per-channel
    # scales (the epilogue's broadcasts read exactly M and E*N floats), on empty experts, one expert
    # with many rows and the smallest aligned N and K; block-scaled calls where N and K are whole
    # 128-blocks (a block configuration applies to those only); then the layer.
    fp8 = torch.float8_e4m3fn
    for config in moe_kernels.grouped_gemm_fp8_configs():
        os.environ["MOE_KERNELS_GEMM_CONFIG"] = config
        for counts, N, K in [([5, 0, 37, 1], 64, 128), ([3, 1], 8, 16), ([0, 150, 2], 256, 512),
                             ([1, 0, 2], 384, 2048)]:
            offsets = torch.tensor([0] + counts, device=DEV).cumsum(0)
            M, E = int(offsets[-1]), len(counts)
            a = torch.randn(M, K, device=DEV).to(fp8)
            b = torch.randn(E, N, K, device=DEV).to(fp8)
            moe_kernels.cutlass_grouped_gemm_fp8(a, b, torch.ones(1, device=DEV), torch.ones(E, device=DEV), offsets)
            moe_kernels.cutlass_grouped_gemm_fp8(a, b, torch.rand(M, device=DEV), torch.rand(E, N, device=DEV),
                                                 offsets)
            if N % 128 == 0 and K % 128 == 0:
                moe_kernels.cutlass_grouped_gemm_fp8(a, b, torch.rand(M, K // 128, device=DEV),
                                                     torch.rand(E, N // 128, K // 128, device=DEV), offsets)
    os.environ.pop("MOE_KERNELS_GEMM_CONFIG")
    # Offsets past M and decreasing: clamped on the device, nothing outside a or out is touched.
    if DEV == "cuda":  # the CPU reference rejects such offsets; the kernel clamps them (no host sync)
        a = torch.randn(8, 32, device=DEV).to(fp8)
        b = torch.randn(3, 16, 32, device=DEV).to(fp8)
        moe_kernels.cutlass_grouped_gemm_fp8(a, b, torch.ones(1, device=DEV), torch.ones(3, device=DEV),
                                             torch.tensor([0, 6, 3, 100], device=DEV))
    x = torch.randn(33, 256, device=DEV, dtype=torch.bfloat16)
    w1 = (torch.randn(8, 256, 256, device=DEV) * 0.05).to(fp8)
    w2 = (torch.randn(8, 256, 128, device=DEV) * 0.05).to(fp8)
    ids = torch.rand(33, 8, device=DEV).argsort(1)[:, :2].int().contiguous()
    moe_kernels.cutlass_moe_fp8(x, w1, w2, torch.rand(33, 2, device=DEV), ids, torch.ones(8, device=DEV),
                                torch.ones(8, device=DEV))
    # Pre-quantized input with per-token scales (moved by moe_permute), then block mode.
    q, s = moe_kernels.scaled_fp8_quant(x, None, True)
    moe_kernels.cutlass_moe_fp8(q, w1, w2, torch.rand(33, 2, device=DEV), ids, torch.ones(8, device=DEV),
                                torch.ones(8, device=DEV), s, None, True)
    moe_kernels.cutlass_moe_fp8(x, w1, w2, torch.rand(33, 2, device=DEV), ids, torch.ones(8, 2, 2, device=DEV),
                                torch.ones(8, 2, 1, device=DEV))


def _gemm_epilogue_calls(fp8):
    for counts, N, K in [([5, 0, 37, 1], 64, 128), ([3, 1], 16, 16), ([0, 150, 2], 768, 512)]:
        offsets = torch.tensor([0] + counts, device=DEV).cumsum(0)
        M, E = int(offsets[-1]), len(counts)
        a = torch.randn(M, K, device=DEV).to(fp8)
        b = torch.randn(E, N, K, device=DEV).to(fp8)
        for act in ACTIVATIONS:
            moe_kernels.cutlass_grouped_gemm_fp8_act_quant(a, b, torch.ones(1, device=DEV), torch.ones(E, device=DEV),
                                                           offsets, torch.tensor([0.5], device=DEV), act)
            moe_kernels.cutlass_grouped_gemm_fp8_act_quant(a, b, torch.rand(M, device=DEV), torch.rand(E, N, device=DEV),
                                                           offsets, torch.tensor([0.5], device=DEV), act,
                                                           bias=torch.randn(E, N, device=DEV))


def run_gemm_epilogue():
    # GEMM1 with the activation and quantization in its epilogue: direct byte stores from the
    # accumulators, clipped at each expert's rows and at N (partial tiles), every activation, with
    # and without bias, per tensor and per token/channel; empty experts; then the layer's fused path
    # (interleaved w1, static a2_scale, > 32 rows per expert).
    need("cutlass_grouped_gemm_fp8_act_quant")
    fp8 = torch.float8_e4m3fn
    for config in ("gated_pingpong_128x128x128_c1x2", "gated_coop_128x256x128_c1x2"):
        os.environ["MOE_KERNELS_GEMM_CONFIG"] = config
        _gemm_epilogue_calls(fp8)
    os.environ.pop("MOE_KERNELS_GEMM_CONFIG")
    T, E, K, H, I = 200, 4, 2, 256, 128
    x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
    w1 = (torch.randn(E, 2 * I, H, device=DEV) * 0.05).to(fp8)
    w2 = (torch.randn(E, H, I, device=DEV) * 0.05).to(fp8)
    ids, w = routing(T, E, K)
    got = moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, torch.ones(E, device=DEV), torch.ones(E, device=DEV),
                                      torch.tensor([0.02], device=DEV), torch.tensor([0.05], device=DEV),
                                      activation="swigluoai", gate_up_interleaved=True,
                                      w1_bias=torch.randn(E, 2 * I, device=DEV))  # the fused path by default
    assert got.isfinite().all()


FP8 = torch.float8_e4m3fn
ACTIVATIONS = ("silu", "gelu", "swigluoai")
# CUDA against the CPU reference of the same op: e4m3 requantization flips a rounding now and
# then (tests/test_generated.py's CUDA_VS_CPU_LAYER_TOL, derived there).
LAYER_TOL = 5e-2


class Skip(Exception):
    """A family this build cannot run (a function or keyword of a later branch)."""


def need(fn_name, *keywords):
    if not accepts(fn_name, *keywords):
        raise Skip(f"moe_kernels.{fn_name}" + (f" with {', '.join(keywords)}" if keywords else "") + " not in this build")


def close_to_cpu(name, got, fn, *args, **kwargs):
    """got (CUDA) against fn on the same arguments moved to the CPU (the reference)."""
    cpu = lambda v: v.cpu() if isinstance(v, torch.Tensor) else v  # noqa: E731
    want = fn(*[cpu(a) for a in args], **{k: cpu(v) for k, v in kwargs.items()}).float()
    err = ((got.float().cpu() - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
    if not err <= LAYER_TOL:
        raise AssertionError(f"{name}: CUDA differs from the CPU reference, relative max error {err:.3g}")


def routing(T, E, K, device=None):
    device = device or DEV
    ids = torch.rand(T, E, device=device).argsort(1)[:, :K].int().contiguous()
    return ids, torch.rand(T, K, device=device)


def run_activations():
    """The activation-quantization op with every activation, layout and bias (rows of empty and busy
    experts, H not a multiple of 128), the weighted gather with the w2 bias, and cutlass_moe_fp8
    with them in the per-tensor, per-token/per-channel, pre-quantized and expert_map modes, each
    layer compared with its CPU reference."""
    need("cutlass_moe_fp8", "activation", "gate_up_interleaved", "w1_bias", "w2_bias")
    static = torch.tensor([0.02], device=DEV)
    if accepts("silu_and_mul_quant_fp8", "activation", "gate_up_interleaved"):
        with_bias = accepts("silu_and_mul_quant_fp8", "bias", "expert_offsets")
        # I = 14336 (Mixtral): per token past the shared-memory bound (y recomputed from x).
        for M, I, E in [(300, 1440, 4), (7, 96, 3), (0, 64, 2), (5, 14336, 2)]:
            h = torch.randn(M, 2 * I, device=DEV, dtype=torch.bfloat16) * 4
            offsets = torch.tensor([0] + sorted(torch.randint(0, M + 1, (E - 1,)).tolist()) + [M], device=DEV)
            for act in ACTIVATIONS:
                for inter in (False, True):
                    kw = dict(activation=act, gate_up_interleaved=inter)
                    if with_bias:
                        kw.update(bias=torch.randn(E, 2 * I, device=DEV), expert_offsets=offsets)
                    for scale, per_token in [(static, False), (None, False), (None, True)]:
                        moe_kernels.silu_and_mul_quant_fp8(h, scale, per_token, **kw)
                    if I % 128 == 0:
                        moe_kernels.silu_and_mul_quant_fp8(h, None, False, 128, **kw)
    if accepts("moe_unpermute", "bias", "expert_offsets"):
        T, K, E, H = 33, 4, 8, 2880
        ids, w = routing(T, E, K)
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
        permuted, offsets, inv, _ = moe_kernels.moe_permute(x, ids, E)
        moe_kernels.moe_unpermute(permuted, w, inv, bias=torch.randn(E, H, device=DEV), expert_offsets=offsets)
    # The layer: gpt-oss's H = I = 2880 once, small shapes for the rest.
    for T, E, K, H, I in [(5, 4, 4, 2880, 2880), (33, 8, 2, 160, 96), (0, 4, 2, 160, 96)]:
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
        ids, w = routing(T, E, K)
        w1 = (torch.randn(E, 2 * I, H, device=DEV) * 0.05).to(FP8)
        w2 = (torch.randn(E, H, I, device=DEV) * 0.05).to(FP8)
        b1, b2 = torch.randn(E, 2 * I, device=DEV) * 0.1, torch.randn(E, H, device=DEV) * 0.1
        one = torch.ones(E, device=DEV)
        ch1, ch2 = torch.rand(E, 2 * I, device=DEV) + 0.5, torch.rand(E, H, device=DEV) + 0.5
        emap = torch.full((E,), -1, dtype=torch.int32, device=DEV)
        emap[: E // 2] = torch.arange(E // 2, dtype=torch.int32, device=DEV)
        # gpt-oss's shape once in its own layout (swigluoai, interleaved, biases): a CUTLASS GEMM
        # under racecheck takes seconds, the small shapes cover every combination.
        combos = [("swigluoai", True, True)] if H == 2880 else \
            [(act, inter, bias) for act in ACTIVATIONS for inter in (False, True) for bias in (False, True)]
        for act, inter, bias in combos:
            kw = dict(activation=act, gate_up_interleaved=inter,
                      **({"w1_bias": b1, "w2_bias": b2} if bias else {}))
            layer = moe_kernels.cutlass_moe_fp8
            out = layer(x, w1, w2, w, ids, one, one, static, static, **kw)
            if T:
                close_to_cpu(f"cutlass_moe_fp8 {act} interleaved={inter} bias={bias}", out, layer,
                             x, w1, w2, w, ids, one, one, static, static, **kw)
            layer(x, w1, w2, w, ids, ch1, ch2, None, None, True, True, **kw)
            q, s = moe_kernels.scaled_fp8_quant(x, None, True)
            layer(q, w1, w2, w, ids, one, one, s, None, True, **kw)
            local = {"w1_bias": b1[: E // 2], "w2_bias": b2[: E // 2]} if bias else {}
            layer(x, w1[: E // 2], w2[: E // 2], w, ids, one[: E // 2], one[: E // 2], None, None, True,
                  expert_map=emap, num_local_experts=E // 2,
                  **dict(kw, **local))


def _mx_weight(E, N, K):
    return (torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device=DEV),
            torch.randint(118, 123, (E, N, K // 32), dtype=torch.uint8, device=DEV))


def _int4_weight(E, N, K):
    return (torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device=DEV),
            torch.rand(E, N, K // 128, device=DEV) * 0.01 + 0.005)


def _grouped_4bit_gemm(names):
    for name in names:
        if hasattr(moe_kernels, name):
            return getattr(moe_kernels, name)
    return None


def run_fourbit():
    """The 4-bit layers (MXFP4 with bf16 and e4m3 activations, INT4 x FP8 with static and dynamic
    scales), every activation with and without biases, expert_map, T = 0, gpt-oss's 2880; their
    grouped GEMMs alone on empty experts and one busy expert; each layer against its CPU reference."""
    have_mx, have_w4 = accepts("cutlass_moe_mxfp4"), accepts("cutlass_moe_w4a8")
    if not (have_mx or have_w4):
        raise Skip("moe_kernels.cutlass_moe_mxfp4 and cutlass_moe_w4a8 not in this build")
    static = torch.tensor([0.02], device=DEV)
    for T, E, K, H, I in [(5, 4, 4, 2880, 2880), (33, 8, 2, 256, 128), (0, 4, 2, 256, 128), (1, 16, 4, 512, 256)]:
        x = torch.randn(T, H, device=DEV, dtype=torch.bfloat16)
        ids, w = routing(T, E, K)
        b1, b2 = torch.randn(E, 2 * I, device=DEV) * 0.1, torch.randn(E, H, device=DEV) * 0.1
        emap = torch.full((E,), -1, dtype=torch.int32, device=DEV)
        emap[E // 2:] = torch.arange(E - E // 2, dtype=torch.int32, device=DEV)
        combos = [("swigluoai", True)] if H == 2880 else [(act, bias) for act in ACTIVATIONS for bias in (False, True)]
        for act, bias in combos:
            kw = dict(activation=act, gate_up_interleaved=act == "swigluoai",
                      **({"w1_bias": b1, "w2_bias": b2} if bias else {}))
            if have_mx:
                m1, s1 = _mx_weight(E, 2 * I, H)
                m2, s2 = _mx_weight(E, H, I)
                for a_dtype in (torch.bfloat16, FP8):
                    out = moe_kernels.cutlass_moe_mxfp4(x, m1, m2, w, ids, s1, s2, a_dtype=a_dtype, **kw)
                    if T and T <= 33 and H <= 512:
                        close_to_cpu(f"cutlass_moe_mxfp4 {act} bias={bias} a_dtype={a_dtype}", out,
                                     moe_kernels.cutlass_moe_mxfp4, x, m1, m2, w, ids, s1, s2, a_dtype=a_dtype,
                                     **kw)
                n = E - E // 2
                local = {"w1_bias": b1[:n], "w2_bias": b2[:n]} if bias else {}
                moe_kernels.cutlass_moe_mxfp4(x, m1[:n], m2[:n], w, ids, s1[:n], s2[:n], expert_map=emap,
                                              num_local_experts=n, **dict(kw, **local))
            if have_w4 and H % 128 == 0 and I % 128 == 0:
                q1, t1 = _int4_weight(E, 2 * I, H)
                q2, t2 = _int4_weight(E, H, I)
                for scales in ((static, static), (None, None)):
                    out = moe_kernels.cutlass_moe_w4a8(x, q1, q2, w, ids, t1, t2, *scales, **kw)
                    if T and T <= 33 and H <= 512:
                        close_to_cpu(f"cutlass_moe_w4a8 {act} bias={bias} static={scales[0] is not None}", out,
                                     moe_kernels.cutlass_moe_w4a8, x, q1, q2, w, ids, t1, t2, *scales, **kw)
    # The grouped GEMMs alone (names as the fp4 branch registers them), where they exist.
    # grouped_gemm_mxfp4 / grouped_gemm_w4a8(a, w, w_scale, expert_offsets, a_scale=None, bias=None,
    # activation="none", gate_up_interleaved=False, ...): bf16 and e4m3 activations (per-row and
    # per-tensor scales), plain and gated epilogues with a bias; a signature this script does not
    # know (TypeError) is reported as skipped: the layers above run the same kernels. Each compiled
    # configuration forced in turn (MOE_KERNELS_W4_GEMM_CONFIG): the decode GEMV (*_gemv) and the
    # tiles (*_bm16, *_bm64) on every shape, whatever the table would pick.
    for names, make, K, a_dtypes, configs in [
            (("grouped_gemm_mxfp4",), _mx_weight, 256, (torch.bfloat16, FP8), ("mxfp4_gemv", "mxfp4_bm16", "mxfp4_bm64")),
            (("grouped_gemm_w4a8",), _int4_weight, 256, (FP8,), ("int4_gemv", "int4_bm16", "int4_bm64"))]:
        gemm = _grouped_4bit_gemm(names)
        if gemm is None:
            print(f"sanitize_ops: SKIPPED {names[0]}: not in this build")
            continue
        try:
            for config in configs:
                os.environ["MOE_KERNELS_W4_GEMM_CONFIG"] = config
                for counts, N in [([5, 0, 37, 1], 64), ([0, 150, 2], 256), ([0, 0, 0], 64), ([1, 3], 2880)]:
                    offsets = torch.tensor([0] + counts, device=DEV).cumsum(0)
                    M, E = int(offsets[-1]), len(counts)
                    wq, ws = make(E, N, K)
                    bias = torch.randn(E, N, device=DEV)
                    for a_dtype in a_dtypes:
                        a = torch.randn(M, K, device=DEV).to(a_dtype)
                        scales = [None] if a_dtype == torch.bfloat16 else [torch.rand(M, device=DEV) + 0.5, static]
                        for a_scale in scales:
                            gemm(a, wq, ws, offsets, a_scale)
                            for act in ACTIVATIONS:
                                gemm(a, wq, ws, offsets, a_scale, bias, act, act == "swigluoai")
        except TypeError as e:
            print(f"sanitize_ops: SKIPPED {gemm.__name__} alone: {e}")
        finally:
            os.environ.pop("MOE_KERNELS_W4_GEMM_CONFIG", None)


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


FAMILIES = {"permute": run_permute, "quant": run_quant, "ep": run_ep, "ep_dispatch": run_ep_dispatch,
            "routing": run_routing, "gemm": run_gemm, "gemm_epilogue": run_gemm_epilogue,
            "activations": run_activations, "fourbit": run_fourbit}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--generated", type=int, default=4, help="generated cases per op family (0: none)")
    parser.add_argument("--only", default="", help=f"comma-separated families, from {','.join(FAMILIES)}")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: run the same calls on the CPU references (checks the script, not the kernels)")
    cli = parser.parse_args()
    DEV = cli.device
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    chosen = [f for f in cli.only.split(",") if f] or list(FAMILIES)
    failed = []
    for name in chosen:
        try:
            FAMILIES[name]()
            sync()
            print(f"sanitize_ops: {name}: ran")
        except Skip as e:
            print(f"sanitize_ops: SKIPPED {name}: {e}")
        except Exception:  # noqa: BLE001  (reported; the other families still run under the sanitizer)
            failed.append(name)
            print(f"sanitize_ops: FAILED {name}:\n{traceback.format_exc()}")
    if not cli.only and DEV == "cuda":
        try:
            run_generated(cli.generated)
        except Exception:  # noqa: BLE001
            failed.append("generated")
            print(f"sanitize_ops: FAILED generated:\n{traceback.format_exc()}")
    sync()
    print(f"sanitize_ops: done; failed: {', '.join(failed) or 'none'}")
    sys.exit(1 if failed else 0)
