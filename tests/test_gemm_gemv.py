"""The decode GEMV configurations of cutlass_grouped_gemm_fp8 (gemv_rowwise, block_gemv: few rows
per expert, grouped_gemv_fp8.cuh), forced with MOE_KERNELS_GEMM_CONFIG: against the CPU reference
and a float64 torch formula on NaN-poisoned memory; empty experts, one expert with more rows than
a pass holds (8), T = 0, M = 1, odd E, N and K that are multiples of 16 but not of 128, gpt-oss
sizes, every scale granularity, bit-identical reruns, CUDA graphs, a side stream; and the host-side
choice of configuration (CPU)."""

import os

import pytest
import torch

import moe_kernels

from fp8_helpers import FP8, rel_error
from helpers import poison_cuda_allocator
import test_gemm as rowwise
import test_gemm_block as block

GEMV = "gemv_rowwise"
BLOCK_GEMV = "block_gemv"
CUTLASS = "pingpong_64x128x256_c1x2"
BLOCK_CUTLASS = "block_pingpong_64x128x128_c1x1"

# (rows per expert, N, K). The kernel takes 8 rows of an expert per pass over its weights, 32
# columns per CTA, 128-deep K steps, and 8 warps instead of 4 when the grid is small and K long.
ROWWISE_SHAPES = [
    ([1, 0, 0, 2, 0, 1, 0], 256, 128),      # odd E, empty experts, decode-like
    ([1], 128, 256),                        # M = 1
    ([0, 0, 21, 0], 64, 512),               # one expert takes every row: 3 passes, the last partial
    ([2, 1, 0, 3, 1], 48, 80),              # N, K multiples of 16, not of 128 (or 32): partial tiles
    ([3, 1], 8, 16),                        # smallest N and K the op accepts
    ([0, 5, 0, 9, 1, 0, 0, 3], 384, 4096),  # long K, a small grid: the 8-warp variant
    ([1, 2, 0], 5760, 2880),                # gpt-oss GEMM1 (N = 2I = 5760, K = H = 2880)
]
BLOCK_SHAPES = [
    ([1, 0, 2, 0, 0, 1, 0], 256, 512),      # odd E, empty experts
    ([1], 128, 128),                        # M = 1, one block
    ([0, 0, 13, 0], 128, 1024),             # one expert, 2 passes
    ([1, 0, 2], 384, 2048),                 # the 8-warp variant
]
SCALES = ["tensor/expert", "token/channel", "token2d/expert"]


def rowwise_problem(counts, N, K, scales, device="cuda"):
    a, b, a_s, b_s, off = rowwise.make_problem(counts, N, K, device)
    M = a.shape[0]
    a_kind, b_kind = scales.split("/")
    a_tok, b_ch = rowwise.per_token_per_channel(a, b, a_s, b_s, (M, 1) if a_kind == "token2d" else (M,))
    return a, b, a_s if a_kind == "tensor" else a_tok, b_s if b_kind == "expert" else b_ch, off


def run(config, monkeypatch, *args):
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", config)
    poison_cuda_allocator(0xFF)
    return moe_kernels.cutlass_grouped_gemm_fp8(*args)


def check(out, args, formula):
    """out (CUDA) against the float64 formula and the CPU reference of the same op."""
    M = int(args[-1][-1])  # rows past expert_offsets[E] are not compared here
    assert out.shape == (args[0].shape[0], args[1].shape[1]) and out.dtype == torch.bfloat16
    got = out[:M].cpu()
    assert not got.isnan().any()
    # fp32 sums of exact e4m3 products, scaled, rounded once to bf16 (as test_gemm.py).
    assert rel_error(got, formula(*args)[:M]) < 1e-2
    ref = moe_kernels.cutlass_grouped_gemm_fp8(*[t.cpu() for t in args])[:M]
    # Same inputs, fp32 sums in another order, both rounded once to bf16: a few bf16 ulps.
    assert rel_error(got, ref) < 5e-3


@pytest.mark.cuda
@pytest.mark.parametrize("counts,N,K", ROWWISE_SHAPES)
@pytest.mark.parametrize("scales", SCALES)
def test_gemv_rowwise_matches_reference_and_formula(monkeypatch, counts, N, K, scales):
    args = rowwise_problem(counts, N, K, scales)
    check(run(GEMV, monkeypatch, *args), args, rowwise.formula)


@pytest.mark.cuda
@pytest.mark.parametrize("counts,N,K", BLOCK_SHAPES)
def test_block_gemv_matches_reference_and_formula(monkeypatch, counts, N, K):
    args = block.make_problem(counts, N, K, "cuda")
    check(run(BLOCK_GEMV, monkeypatch, *args), args, block.formula)


@pytest.mark.cuda
@pytest.mark.parametrize("config", [GEMV, BLOCK_GEMV])
def test_gemv_without_rows(monkeypatch, config):
    """T = 0 (M = 0), and rows that belong to no expert (expert_offsets[E] < M): not written."""
    make = block.make_problem if config == BLOCK_GEMV else rowwise.make_problem
    args = make([0, 0, 0], 128, 256, "cuda")
    out = run(config, monkeypatch, *args)
    assert out.shape == (0, 128)
    a, b, a_s, b_s, off = make([2, 0, 3], 128, 256, "cuda")
    off = torch.tensor([0, 1, 1, 3], device="cuda")  # rows 3, 4 belong to no expert
    out = run(config, monkeypatch, a, b, a_s, b_s, off)
    check(out, (a, b, a_s, b_s, off), block.formula if config == BLOCK_GEMV else rowwise.formula)
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") != "1":  # poisoned: NaN unless written
        assert out[3:].isnan().all()


@pytest.mark.cuda
@pytest.mark.parametrize("config", [GEMV, BLOCK_GEMV])
def test_gemv_is_bit_identical_run_to_run(monkeypatch, config):
    """Fixed-order sums (no atomics): two calls give the same bits."""
    args = (block.make_problem([1, 0, 3, 9, 0], 256, 2048, "cuda") if config == BLOCK_GEMV
            else rowwise_problem([1, 0, 3, 9, 0], 256, 2048, "token/channel"))
    first = run(config, monkeypatch, *args)
    second = run(config, monkeypatch, *args)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))


@pytest.mark.cuda
@pytest.mark.parametrize("config", [GEMV, BLOCK_GEMV])
def test_gemv_cuda_graph_replay(monkeypatch, config):
    """Offsets read on the device: a graph captured once serves new data and new routing."""
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", config)
    make = block.make_problem if config == BLOCK_GEMV else rowwise.make_problem
    formula = block.formula if config == BLOCK_GEMV else rowwise.formula
    a, b, a_s, b_s, off = make([2, 0, 1, 1], 256, 512, "cuda")
    moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    a2, _, a_s2, _, off2 = make([0, 3, 0, 1], 256, 512, "cuda")  # same M, other experts
    a.copy_(a2)
    a_s.copy_(a_s2)
    off.copy_(off2)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(out.cpu(), formula(a, b, a_s, b_s, off)) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("config", [GEMV, BLOCK_GEMV])
def test_gemv_runs_on_the_current_stream(monkeypatch, config):
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", config)
    make = block.make_problem if config == BLOCK_GEMV else rowwise.make_problem
    formula = block.formula if config == BLOCK_GEMV else rowwise.formula
    args = make([1, 3, 0, 2], 512, 1024, "cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = moe_kernels.cutlass_grouped_gemm_fp8(*args)
    side.synchronize()
    assert rel_error(out.cpu(), formula(*args)) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("block_scaled", [False, True])
def test_gemv_matches_cutlass_configuration(monkeypatch, block_scaled):
    """The same call through the GEMV and through the CUTLASS configuration it replaces."""
    args = (block.make_problem([1, 0, 2, 1, 0, 0, 1, 3], 512, 2048, "cuda") if block_scaled
            else rowwise_problem([1, 0, 2, 1, 0, 0, 1, 3], 512, 2048, "token/channel"))
    gemv = run(BLOCK_GEMV if block_scaled else GEMV, monkeypatch, *args)
    cutlass = run(BLOCK_CUTLASS if block_scaled else CUTLASS, monkeypatch, *args)
    assert rel_error(gemv.cpu(), cutlass.cpu()) < 5e-3


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 4])
def test_decode_layer_matches_cutlass_path(monkeypatch, T):
    """cutlass_moe_fp8 at decode sizes (the GEMV chosen automatically) against the same layer with
    the CUTLASS configuration forced."""
    E, H, I, K = 16, 512, 256, 2
    assert moe_kernels.grouped_gemm_fp8_choice(T * K, E, H) == GEMV
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w1 = (torch.randn(E, 2 * I, H, device="cuda") * 0.05).to(FP8)
    w2 = (torch.randn(E, H, I, device="cuda") * 0.05).to(FP8)
    ids = torch.rand(T, E, device="cuda").argsort(1)[:, :K].int().contiguous()
    weights = torch.rand(T, K, device="cuda")
    scales = (torch.ones(E, device="cuda"), torch.ones(E, device="cuda"))
    monkeypatch.delenv("MOE_KERNELS_GEMM_CONFIG", raising=False)
    auto = moe_kernels.cutlass_moe_fp8(x, w1, w2, weights, ids, *scales)
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", CUTLASS)
    forced = moe_kernels.cutlass_moe_fp8(x, w1, w2, weights, ids, *scales)
    # The intermediate is requantized to e4m3 in between: a rounding flip now and then
    # (tests/test_generated.py's CUDA_VS_CPU_LAYER_TOL).
    assert rel_error(auto.cpu(), forced.cpu()) < 5e-2


def test_gemv_configurations_are_compiled():
    names = moe_kernels.grouped_gemm_fp8_configs()
    assert GEMV in names and BLOCK_GEMV in names


def test_choice_takes_the_gemv_for_few_rows(monkeypatch):
    monkeypatch.delenv("MOE_KERNELS_GEMM_CONFIG", raising=False)
    choice = moe_kernels.grouped_gemm_fp8_choice
    # Qwen3-30B-A3B (E = 128, top-8): T = 1, 4, 8 decode; from T = 16 (128 rows) CUTLASS (the
    # H200 measurement: the GEMV lost a little at 128 rows per-channel, see grouped_gemm_fp8.cpp).
    assert choice(8, 128, 2048) == GEMV
    assert choice(64, 128, 2048) == GEMV
    assert choice(128, 128, 2048) == CUTLASS
    assert choice(512, 128, 2048) == CUTLASS
    # Mixtral (E = 8, top-2): 2 rows per expert on average at T = 8, 3 at T = 12.
    assert choice(16, 8, 4096) == GEMV
    assert choice(24, 8, 4096) == CUTLASS
    assert choice(4096, 8, 4096) == "coop_128x256x128_c1x2"
    # Block-scaled (DeepSeek-V3, E = 256, top-8).
    assert choice(8, 256, 7168, True) == BLOCK_GEMV
    assert choice(256, 256, 7168, True) == BLOCK_GEMV  # block mode keeps the GEMV up to 256 rows
    assert choice(512, 256, 7168, True) == BLOCK_CUTLASS
    assert choice(4096, 256, 7168, True) == BLOCK_CUTLASS
    assert choice(0, 8, 128) == GEMV  # T = 0 (the op returns before launching anything)


def test_choice_follows_the_override_of_its_kind(monkeypatch):
    choice = moe_kernels.grouped_gemm_fp8_choice
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", CUTLASS)
    assert choice(8, 128, 2048) == CUTLASS
    assert choice(8, 256, 7168, True) == BLOCK_GEMV  # a per-channel name leaves block calls alone
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", GEMV)
    assert choice(4096, 8, 4096) == GEMV
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", "coop_1x1x1")
    with pytest.raises(RuntimeError, match="MOE_KERNELS_GEMM_CONFIG=coop_1x1x1 names no compiled configuration"):
        choice(8, 128, 2048)


def test_choice_rejects_bad_sizes():
    with pytest.raises(RuntimeError, match="grouped_gemm_fp8_choice: rows and num_experts must be >= 0 and k > 0"):
        moe_kernels.grouped_gemm_fp8_choice(-1, 8, 128)
