"""Workspace of cutlass_moe_fp8 and cutlass_grouped_gemm_fp8 (GPU only): the peak bytes the caching
allocator holds during the call beyond the inputs (allocated before) and the output, held to the
bounds of docs/ops.md ("Memory"). Run with -s to print the measured bytes per token."""

import pytest
import torch

import moe_kernels

from fp8_helpers import FP8, quantize_per_expert
from helpers import random_topk_ids

pytestmark = pytest.mark.cuda

MiB = 1 << 20
# The caching allocator rounds each request up to 512 bytes, and a block cut from a fresh segment
# may keep up to 1 MiB more than asked; a call makes about 20 allocations.
ALLOCATOR_SLACK = 24 * MiB


def grouped_gemm_workspace_bound(E):
    """Scratch: 9 per-expert arrays (problem sizes, 5 pointers, 3 strides; <= 32 bytes an entry,
    each array 256-byte aligned); CUTLASS's workspace (per-SM TMA descriptors) under 1 MiB."""
    return 9 * ((32 * E + 255) // 256 * 256) + 1 * MiB


def layer_bytes_per_token(K, H, I):
    """What cutlass_moe_fp8 keeps per token (bf16 hidden states, no alignment): x_q (H),
    permuted (K*H), GEMM1's output (K*2I bf16), the activation (K*I e4m3), GEMM2's output (K*H
    bf16), inv_permuted_idx and permuted_idx (8K), per-token scales (4 + 8K)."""
    return H + K * (3 * H + 5 * I + 16) + 4


def peak_beyond_inputs_and_output(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    out_bytes = (out.untyped_storage().nbytes() + 511) // 512 * 512
    return torch.cuda.max_memory_allocated() - base - out_bytes


def make_layer(T, E, K, H, I):
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w1, w1_s = quantize_per_expert(torch.randn(E, 2 * I, H, device="cuda") / H**0.5)
    w2, w2_s = quantize_per_expert(torch.randn(E, H, I, device="cuda") / I**0.5)
    w = torch.rand(T, K, device="cuda")
    ids = random_topk_ids(T, K, E, device="cuda")
    return x, w1, w2, w, ids, w1_s, w2_s


@pytest.mark.parametrize("T", [256, 4096])
@pytest.mark.parametrize("per_act_token", [False, True])
def test_cutlass_moe_fp8_workspace_per_token(T, per_act_token):
    E, K, H, I = 64, 8, 1024, 512
    args = make_layer(T, E, K, H, I)
    moe_kernels.cutlass_moe_fp8(*args, per_act_token=per_act_token)  # warm-up: CUTLASS attributes, caches
    ws = peak_beyond_inputs_and_output(lambda: moe_kernels.cutlass_moe_fp8(*args, per_act_token=per_act_token))
    per_token = layer_bytes_per_token(K, H, I)
    bound = T * per_token + 2 * grouped_gemm_workspace_bound(E) + ALLOCATOR_SLACK
    print(f"\ncutlass_moe_fp8 T={T} E={E} K={K} H={H} I={I} per_act_token={per_act_token}: workspace "
          f"{ws / MiB:.1f} MiB = {ws / T:.0f} bytes/token (formula {per_token} bytes/token)")
    assert 0 < ws <= bound


@pytest.mark.parametrize("E", [8, 256])
def test_grouped_gemm_workspace_does_not_grow_with_rows(E):
    N, K = 512, 1024
    b, b_s = quantize_per_expert(torch.randn(E, N, K, device="cuda"))
    sizes = []
    for rows_per_expert in (4, 256):  # both tile configurations' ranges of rows per expert
        M = E * rows_per_expert
        a = (torch.randn(M, K, device="cuda") * 20).to(FP8)
        off = torch.arange(E + 1, device="cuda") * rows_per_expert
        a_s = torch.full((M,), 0.05, device="cuda")
        moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
        ws = peak_beyond_inputs_and_output(lambda: moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off))
        print(f"\ncutlass_grouped_gemm_fp8 E={E} M={M}: workspace {ws} bytes")
        assert 0 < ws <= grouped_gemm_workspace_bound(E) + 4 * 512
        sizes.append(ws)
    # Scratch and CUTLASS workspace depend on E and the SM count, not on M (the tile
    # configurations may differ in CUTLASS workspace by a few descriptors).
    assert abs(sizes[0] - sizes[1]) <= 64 * 1024
