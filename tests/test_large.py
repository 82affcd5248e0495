"""64-bit addressing: the data-movement and quantization kernels on tensors of T*K*H >= 2^31
elements (T = 32768 tokens, K = 8, H = 8192: the permuted tensor has 2^31 elements), where an
int32 element offset would wrap. Checked against the CPU reference on sampled rows, the last rows
(the highest offsets) always among them.

GPU only (`cuda` and `large` markers: `pytest -m large` selects them); each test skips where the
GPU lacks the free memory it needs (up to about 20 GiB).
"""

import pytest
import torch

import moe_kernels

from helpers import random_topk_ids

pytestmark = [pytest.mark.cuda, pytest.mark.large]

T, K, H, E = 32768, 8, 8192, 64
ELEMENTS = 2**31  # the size an int32 element offset cannot reach
FP8 = torch.float8_e4m3fn
GiB = 1 << 30


def need_gib(n):
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    free, _ = torch.cuda.mem_get_info()
    if free < n * GiB:
        pytest.skip(f"needs {n} GiB of free GPU memory, {free / GiB:.1f} GiB free")


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    torch.cuda.empty_cache()


def sample(n, count=48):
    """Row indices: random ones, the first and the last 16 (the highest offsets)."""
    rows = torch.cat([torch.randint(n, (count,)), torch.arange(16), torch.arange(n - 16, n)])
    return rows.unique()


def routing():
    ids = random_topk_ids(T, K, E, device="cuda")
    assert T * K * H >= ELEMENTS
    return ids


def test_permute_unpermute_beyond_2_31_elements():
    need_gib(12)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = routing()
    permuted, offsets, inv, perm = moe_kernels.moe_permute(x, ids, E)
    assert permuted.numel() >= ELEMENTS
    rows = sample(T * K).cuda()
    src = perm[rows].long()
    assert (src >= 0).all()
    assert torch.equal(permuted[rows], x[src // K])  # rows copied as bytes: exact
    # The last rows of the permuted tensor hold the last expert's choices: check them too.
    assert int(offsets[-1]) == T * K

    w = torch.rand(T, K, device="cuda")
    out = moe_kernels.moe_unpermute(permuted, w, inv)
    tokens = sample(T).cuda()
    want = moe_kernels.moe_unpermute(permuted[inv[tokens].reshape(-1).long()].cpu(), w[tokens].cpu(),
                                     torch.arange(tokens.numel() * K, dtype=torch.int32).view(-1, K))
    # The tolerance of the hand-written CUDA-vs-CPU tests for bf16 outputs.
    torch.testing.assert_close(out[tokens].cpu().float(), want.float(), rtol=8e-3, atol=1e-5)


def test_ep_reorders_beyond_2_31_elements():
    need_gib(12)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = routing()
    _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, E)
    start, end = 0, E - 1  # every choice is local: every row of the [T*K, H] output is written
    rows = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end)
    tokens = sample(T).cuda()
    dst = src2dst[tokens].long()                           # [n, K]
    assert torch.equal(rows[dst.reshape(-1)], x[tokens].repeat_interleave(K, dim=0))
    w = torch.rand(T, K, device="cuda")
    out = moe_kernels.ep_post_reorder(rows, src2dst, ids, w, start, end)
    n = tokens.numel()
    want = moe_kernels.ep_post_reorder(rows[dst.reshape(-1)].cpu(), torch.arange(n * K, dtype=torch.int32).view(n, K),
                                       ids[tokens].cpu(), w[tokens].cpu(), start, end)
    torch.testing.assert_close(out[tokens].cpu().float(), want.float(), rtol=8e-3, atol=1e-5)
    del rows, out

    scale = torch.tensor([0.02], device="cuda")
    q = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end, scale, FP8)
    want_q = moe_kernels.ep_pre_reorder(x[tokens].cpu(), torch.arange(n * K, dtype=torch.int32).view(n, K),
                                        ids[tokens].cpu(), start, end, scale.cpu(), FP8)
    assert torch.equal(q.view(torch.uint8)[dst.reshape(-1)].cpu(), want_q.view(torch.uint8))


@pytest.mark.parametrize("mode", ["static", "per_tensor", "per_token"])
def test_scaled_fp8_quant_beyond_2_31_elements(mode):
    need_gib(8)
    M = T * K // 8 * 8  # [262144, 8192]: 2^31 elements
    x = torch.randn(M, H, device="cuda", dtype=torch.bfloat16)
    x[-1, -1] = 9.0  # the largest value sits at the highest offset: a wrapped amax would miss it
    static = torch.tensor([0.01], device="cuda")
    q, scale = moe_kernels.scaled_fp8_quant(x, static if mode == "static" else None, mode == "per_token")
    rows = sample(M)
    if mode == "per_tensor":
        assert scale.item() == pytest.approx(9.0 / 448, rel=1e-6)
    s = scale.cpu() if mode != "per_token" else None
    want_q, want_s = moe_kernels.scaled_fp8_quant(x[rows.cuda()].cpu(), s, mode == "per_token")
    if mode == "per_token":
        assert torch.equal(scale[rows.cuda()].cpu(), want_s)
    assert torch.equal(q.view(torch.uint8)[rows.cuda()].cpu(), want_q.view(torch.uint8))


@pytest.mark.parametrize("mode", ["static", "per_tensor", "per_token"])
def test_silu_and_mul_quant_beyond_2_31_elements(mode):
    need_gib(14)
    M = T * K  # x [262144, 2 * 8192], q [262144, 8192]: 2^31 elements out, 2^32 in
    x = torch.randn(M, 2 * H, device="cuda", dtype=torch.bfloat16)
    x[-1, H - 1] = 40.0  # silu(40) * up(=1) = 40, the largest product, at the highest offset
    x[-1, -1] = 1.0
    static = torch.tensor([0.01], device="cuda")
    q, scale = moe_kernels.silu_and_mul_quant_fp8(x, static if mode == "static" else None, mode == "per_token")
    rows = sample(M)
    s = scale.cpu() if mode != "per_token" else None
    want_q, want_s = moe_kernels.silu_and_mul_quant_fp8(x[rows.cuda()].cpu(), s, mode == "per_token")
    if mode == "per_tensor":
        assert scale.item() == pytest.approx(40.0 / 448, rel=1e-5)
    if mode == "per_token":
        assert torch.equal(scale[rows.cuda()].cpu(), want_s)
    assert torch.equal(q.view(torch.uint8)[rows.cuda()].cpu(), want_q.view(torch.uint8))
