"""cutlass_grouped_gemm_fp8 in block-scaled mode (1x128 activation groups, 128x128 weight blocks:
the DeepSeek-V3 / Qwen3-FP8 checkpoint format): CPU reference and CUDA against a float64 formula
that dequantizes block by block; every block configuration, ragged and empty experts, graphs."""

import pytest
import torch
from torch.library import opcheck

import moe_kernels

from fp8_helpers import FP8, rel_error
from helpers import DEVICES, poison_cuda_allocator

BLOCK = 128


def quantize_blocks(w):
    """w [E, N, K] float -> (w_q e4m3, scale [E, N/128, K/128] f32), one scale per 128x128 block,
    multiplied to dequantize (the checkpoints' weight_scale_inv)."""
    E, N, K = w.shape
    blocks = w.reshape(E, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, :, None, :, None]).clamp(-448, 448).to(FP8).reshape(E, N, K)
    return q, scale.float()


def quantize_groups(x):
    """x [M, K] float -> (x_q e4m3, scale [M, K/128] f32), one scale per row per 128 columns."""
    M, K = x.shape
    groups = x.reshape(M, K // BLOCK, BLOCK)
    scale = groups.abs().amax(dim=2).clamp(min=1e-12) / 448.0
    return (groups / scale[:, :, None]).clamp(-448, 448).to(FP8).reshape(M, K), scale.float()


def make_problem(counts, N, K, device="cpu"):
    E = len(counts)
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts), 0)
    M = int(offsets[-1])
    # Scales that differ between groups and blocks, so a scale applied to the wrong block shows.
    x = torch.randn(M, K) * (0.5 + torch.rand(M, K // BLOCK)).repeat_interleave(BLOCK, 1)
    a, a_scale = quantize_groups(x)
    w = torch.randn(E, N, K) * (0.5 + torch.rand(E, N // BLOCK, K // BLOCK)).repeat_interleave(
        BLOCK, 1).repeat_interleave(BLOCK, 2)
    b, b_scale = quantize_blocks(w)
    return [t.to(device) for t in (a, b, a_scale, b_scale, offsets)]


def formula(a, b, a_scale, b_scale, offsets):
    """Dequantize group by group and block by block, then each expert's rows times its weight, in
    float64."""
    a_deq = a.double().cpu() * a_scale.double().cpu().repeat_interleave(BLOCK, 1)
    b_deq = b.double().cpu() * b_scale.double().cpu().repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64)
    off = offsets.tolist()
    for e in range(b.shape[0]):
        out[off[e]:off[e + 1]] = a_deq[off[e]:off[e + 1]] @ b_deq[e].t()
    return out


SHAPES = [  # (rows per expert, N, K)
    ([5, 0, 37, 1, 130, 0, 2, 64], 256, 128),
    ([0, 0, 300, 0], 128, 512),          # one expert takes every row
    ([1], 128, 128),                     # one row, one block
    ([129, 257, 0], 384, 1024),          # M not a multiple of the tile, 8 K blocks
    ([700, 0, 333, 9], 256, 256),        # many rows per expert (the cooperative configuration)
]


@pytest.mark.parametrize("counts,N,K", SHAPES[:3])
def test_cpu_reference_matches_formula(counts, N, K):
    a, b, a_s, b_s, off = make_problem(counts, N, K)
    out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    assert out.dtype == torch.bfloat16 and out.shape == (a.shape[0], N)
    # fp32 products rounded once to bf16: within bf16's relative precision.
    torch.testing.assert_close(out.double(), formula(a, b, a_s, b_s, off), rtol=8e-3, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("counts,N,K", SHAPES)
def test_cuda_matches_formula(counts, N, K):
    a, b, a_s, b_s, off = make_problem(counts, N, K, "cuda")
    poison_cuda_allocator(0xFF)
    out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    assert not out.isnan().any()
    # fp32 accumulation of scaled K-block partial sums, one bf16 rounding.
    assert rel_error(out.cpu(), formula(a, b, a_s, b_s, off)) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("counts,N,K", SHAPES)
def test_cuda_matches_cpu_reference(counts, N, K):
    a, b, a_s, b_s, off = make_problem(counts, N, K, "cuda")
    out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    ref = moe_kernels.cutlass_grouped_gemm_fp8(*[t.cpu() for t in (a, b, a_s, b_s, off)])
    # Same inputs, fp32 sums in another order, both rounded once to bf16: a few bf16 ulps.
    assert rel_error(out.cpu(), ref) < 5e-3


def _block_configs():
    try:
        return [c for c in moe_kernels.grouped_gemm_fp8_configs() if c.startswith("block_")]
    except Exception:  # noqa: BLE001 - no extension: the test list must still build
        return []


def test_block_configurations_are_compiled():
    assert {"block_pingpong_64x128x128_c1x1", "block_coop_128x128x128_c1x2"} <= set(_block_configs())


@pytest.mark.cuda
@pytest.mark.parametrize("config", _block_configs())
@pytest.mark.parametrize("counts,N,K", [SHAPES[0], SHAPES[2], SHAPES[3]])
def test_every_block_configuration(monkeypatch, config, counts, N, K):
    """Each block configuration, forced with MOE_KERNELS_GEMM_CONFIG, on ragged experts."""
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", config)
    a, b, a_s, b_s, off = make_problem(counts, N, K, "cuda")
    poison_cuda_allocator(0xFF)
    out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    assert not out.isnan().any()
    assert rel_error(out.cpu(), formula(a, b, a_s, b_s, off)) < 1e-2


@pytest.mark.cuda
def test_forcing_a_block_configuration_leaves_per_channel_calls_alone(monkeypatch):
    """A layer mixes no kinds today, but a forced configuration of the other kind must not break a
    call: the table's choice runs."""
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", "block_coop_128x128x128_c1x2")
    a = torch.randn(40, 256, device="cuda").to(FP8)
    b = torch.randn(2, 128, 256, device="cuda").to(FP8)
    off = torch.tensor([0, 15, 40], device="cuda")
    out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, torch.ones(1, device="cuda"), torch.ones(2, device="cuda"), off)
    assert rel_error(out.cpu(), torch.cat([a[:15].float() @ b[0].float().t(), a[15:].float() @ b[1].float().t()]).cpu()) < 1e-2


@pytest.mark.cuda
def test_cuda_graph_replay():
    a, b, a_s, b_s, off = make_problem([40, 0, 200, 3], 256, 256, "cuda")
    out = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    # New inputs in place, then replay: the graph recomputes from device data (no host reads).
    fresh = make_problem([3, 37, 200, 3], 256, 256, "cuda")
    for dst, src in zip((a, b, a_s, b_s, off), fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_error(replayed.cpu(), formula(a, b, a_s, b_s, off)) < 1e-2
    assert out.shape == replayed.shape


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, b, a_s, b_s, off = make_problem([3, 0, 9], 128, 256, device)
    # test_schema is left out (as in test_gemm.py): its input-mutation check multiplies the inputs,
    # which torch does not implement for float8 tensors on the CPU.
    opcheck(torch.ops.moe_kernels.cutlass_grouped_gemm_fp8.default, (a, b, a_s, b_s, off, None),
            test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_rejects_bad_block_arguments(device):
    gemm = moe_kernels.cutlass_grouped_gemm_fp8
    a, b, a_s, b_s, off = make_problem([3, 5], 256, 256, device)
    with pytest.raises(RuntimeError, match=r"b_scales must be \[E, N/128, K/128\] = \[2, 2, 2\]"):
        gemm(a, b, a_s, b_s[:, :1].contiguous(), off)
    with pytest.raises(RuntimeError, match=r"a_scales must be \[M, K/128\] = \[8, 2\]"):
        gemm(a, b, a_s[:, :1].contiguous(), b_s, off)
    with pytest.raises(RuntimeError, match=r"a_scales must be \[M, K/128\]"):
        gemm(a, b, torch.ones(1, device=device), b_s, off)
    with pytest.raises(RuntimeError, match="block-scaled .3-D b_scales. needs N to be a multiple of 128, got N=136"):
        gemm(a, torch.zeros(2, 136, 256, device=device).to(FP8), a_s, torch.ones(2, 1, 2, device=device), off)
    a48 = a[:, :48].contiguous()
    with pytest.raises(RuntimeError, match="block-scaled .3-D b_scales. needs K to be a multiple of 128, got K=48"):
        gemm(a48, b[:, :, :48].contiguous(), a_s[:, :1].contiguous(), b_s[:, :, :1].contiguous(), off)


@pytest.mark.parametrize("device", DEVICES)
def test_block_scales_layout_is_checked(device):
    """Block scales are read row-major by the kernel: a transposed view is refused, not misread."""
    a, b, a_s, b_s, off = make_problem([3, 5], 256, 256, device)
    gemm = moe_kernels.cutlass_grouped_gemm_fp8
    with pytest.raises(RuntimeError, match="cutlass_grouped_gemm_fp8: a_scales must be contiguous"):
        gemm(a, b, a_s.t().contiguous().t(), b_s, off)
    with pytest.raises(RuntimeError, match="cutlass_grouped_gemm_fp8: b_scales must be contiguous"):
        gemm(a, b, a_s, b_s.transpose(1, 2).contiguous().transpose(1, 2), off)
    with pytest.raises(RuntimeError, match="cutlass_grouped_gemm_fp8: b_scales must be float32, got Half"):
        gemm(a, b, a_s, b_s.half(), off)


@pytest.mark.cuda
def test_block_scales_on_another_device_are_named():
    a, b, a_s, b_s, off = make_problem([3, 5], 256, 256, "cuda")
    gemm = moe_kernels.cutlass_grouped_gemm_fp8
    with pytest.raises(RuntimeError, match=r"b_scales must be on cuda:0 \(as a\), got cpu"):
        gemm(a, b, a_s, b_s.cpu(), off)
    with pytest.raises(RuntimeError, match=r"a_scales must be on cuda:0 \(as a\), got cpu"):
        gemm(a, b, a_s.cpu(), b_s, off)
