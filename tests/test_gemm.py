"""cutlass_grouped_gemm_fp8: CPU reference and CUDA (CUTLASS) against fp32 torch on the same
quantized inputs; empty experts, one expert with every row, smallest aligned shapes, graphs."""

import pytest
import torch
from torch.library import opcheck

import moe_kernels

from fp8_helpers import FP8, quantize_per_expert, rel_error
from helpers import DEVICES, poison_cuda_allocator


def make_problem(counts, N, K, device="cpu"):
    E = len(counts)
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts), 0)
    M = int(offsets[-1])
    a_scale = torch.tensor([0.02])
    a = (torch.randn(M, K) / 0.02).clamp(-448, 448).to(FP8)
    b, b_scale = quantize_per_expert(torch.randn(E, N, K))
    return [t.to(device) for t in (a, b, a_scale, b_scale, offsets)]


def formula(a, b, a_scale, b_scale, offsets):
    """Each expert's rows times its dequantized weight, in float64."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    off = offsets.tolist()
    for e in range(b.shape[0]):
        rows = a[off[e]:off[e + 1]].double().cpu() * a_scale.item()
        out[off[e]:off[e + 1]] = rows @ (b[e].double().cpu() * b_scale[e].item()).t()
    return out


SHAPES = [  # (rows per expert, N, K)
    ([5, 0, 37, 1, 130, 0, 2, 64], 256, 128),
    ([0, 0, 300, 0], 64, 512),          # one expert takes every row
    ([3, 1], 8, 16),                     # smallest aligned N and K
    ([129, 257, 0], 384, 4096),          # M not a multiple of the tile, long K
]


@pytest.mark.parametrize("counts,N,K", SHAPES[:3])
def test_cpu_reference_matches_formula(counts, N, K):
    a, b, a_s, b_s, off = make_problem(counts, N, K)
    out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    assert out.dtype == torch.bfloat16 and out.shape == (a.shape[0], N)
    # fp32 products rounded once to bf16: within bf16's relative precision.
    torch.testing.assert_close(out.double(), formula(a, b, a_s, b_s, off), rtol=8e-3, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("counts,N,K", SHAPES)
def test_cuda_matches_formula(counts, N, K):
    a, b, a_s, b_s, off = make_problem(counts, N, K, "cuda")
    poison_cuda_allocator(0xFF)
    out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    assert not out.isnan().any()
    assert rel_error(out.cpu(), formula(a, b, a_s, b_s, off)) < 1e-2


@pytest.mark.cuda
def test_cuda_graph_replay():
    a, b, a_s, b_s, off = make_problem([40, 0, 88, 16], 128, 256, "cuda")
    moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    a2, *_ = make_problem([40, 0, 88, 16], 128, 256, "cuda")
    a.copy_(a2)
    a_s.fill_(0.03)
    graph.replay()
    assert rel_error(out.cpu(), formula(a, b, a_s, b_s, off)) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, b, a_s, b_s, off = make_problem([3, 0, 5], 16, 32, device)
    # test_schema is left out: its input-mutation check multiplies the inputs, which torch does not
    # implement for float8 tensors on the CPU.
    opcheck(torch.ops.moe_kernels.cutlass_grouped_gemm_fp8.default, (a, b, a_s, b_s, off, None),
            test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_arguments(device):
    a, b, a_s, b_s, off = make_problem([3, 5], 16, 32, device)
    gemm = moe_kernels.cutlass_grouped_gemm_fp8
    with pytest.raises(RuntimeError, match="K must be a positive multiple of 16, got 24"):
        gemm(a[:, :24].contiguous(), b[:, :, :24].contiguous(), a_s, b_s, off)
    with pytest.raises(RuntimeError, match="N must be a positive multiple of 8, got 12"):
        gemm(a, b[:, :12].contiguous(), a_s, b_s, off)
    with pytest.raises(RuntimeError, match="a must be float8_e4m3fn, got BFloat16"):
        gemm(a.to(torch.bfloat16), b, a_s, b_s, off)
    with pytest.raises(RuntimeError, match="per-token scales are not supported yet"):
        gemm(a, b, torch.ones(8, device=device), b_s, off)
    with pytest.raises(RuntimeError, match="per-channel scales are not supported yet"):
        gemm(a, b, a_s, torch.ones(2, 16, device=device), off)
    with pytest.raises(RuntimeError, match=r"expert_offsets must have shape \[3\]"):
        gemm(a, b, a_s, b_s, off[:2])
    with pytest.raises(RuntimeError, match="b must have K=32 columns"):
        gemm(a, b[:, :, :16].contiguous(), a_s, b_s, off)
