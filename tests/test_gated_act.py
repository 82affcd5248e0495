"""Gated activations of silu_and_mul_quant_fp8 (silu, exact-erf gelu, gpt-oss's swigluoai with
alpha/limit; gate/up concatenated or interleaved; per-expert fp32 bias) and moe_unpermute's
per-expert bias: the CPU reference against plain torch formulas (incl. the swigluoai clamps
biting beyond +-limit), opcheck, every error; CUDA against the CPU reference byte for byte."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import moe_kernels

from helpers import DEVICES, poison_cuda_allocator, random_topk_ids

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_SCALE = 1.0 / (448.0 * 512.0)
ACTIVATIONS = ["silu", "gelu", "swigluoai"]
MODES = ["static", "per_tensor", "per_token", "group"]
GROUP = 32  # group_size of the "group" mode in these tests (I is a multiple of it)


# ---------------------------------------------------------------- plain torch formulas (the spec)

def split_gate_up(x, interleaved):
    """x [M, 2I] fp32 -> (gate, up) [M, I]."""
    if interleaved:
        return x[:, 0::2], x[:, 1::2]
    I = x.shape[1] // 2
    return x[:, :I], x[:, I:]


def expert_of_rows(offsets, M):
    """[M] int64: the expert owning each row, -1 past the last expert's rows."""
    rows = torch.arange(M)
    e = torch.searchsorted(offsets[1:].cpu(), rows, right=True)
    return torch.where(rows < offsets[-1].cpu(), e, torch.full_like(e, -1))


def add_row_bias(x, bias, offsets):
    """x [M, N] fp32 + bias[e(r)] row by row (fp32 additions), no bias past the last expert."""
    if bias is None:
        return x
    e = expert_of_rows(offsets, x.shape[0])
    b = torch.where((e >= 0)[:, None], bias.cpu()[e.clamp(min=0)], torch.zeros_like(x))
    return x + b


def formula_act(x, activation, interleaved=False, alpha=1.702, limit=7.0, bias=None, offsets=None):
    """y [M, I] float64: the activation as the model code writes it (gpt-oss: transformers'
    GptOssExperts._apply_gate), the bias added in fp32 as the op does, the activation itself in
    float64 (fp32 torch would carry its own rounding: gelu's 1 + erf(g / sqrt 2) cancels for
    negative g)."""
    xf = add_row_bias(x.cpu().float(), bias, offsets)
    g, u = (t.double() for t in split_gate_up(xf, interleaved))
    if activation == "silu":
        return F.silu(g) * u
    if activation == "gelu":
        return F.gelu(g) * u  # exact erf GELU, torch's default
    assert activation == "swigluoai"
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))


def formula_scale(y, mode):
    a = y.abs()
    if mode == "per_token":
        return torch.clamp(a.amax(dim=1, keepdim=True) / E4M3_MAX, min=MIN_SCALE)
    if mode == "group":
        M, I = y.shape
        return a.reshape(M, I // GROUP, GROUP).amax(dim=2).clamp(min=1e-10) / E4M3_MAX
    return torch.clamp(a.max().reshape(1) / E4M3_MAX, min=MIN_SCALE)


def e4m3_half_ulp(v):
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0**-6)))
    return torch.pow(2.0, exponent - 3) / 2


def assert_within_half_ulp(q, v):
    """q is v rounded once to e4m3, allowing for fp32 differences between the op's exp/erf and
    torch's (both within a few ulp of exact): |q - clamp(v)| <= half a step (+ 1e-5 relative)."""
    want = v.clamp(-E4M3_MAX, E4M3_MAX)
    err = (q.double() - want).abs()
    bound = e4m3_half_ulp(want) * (1 + 1e-5) + 1e-5 * want.abs()
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} values off by more than half an e4m3 step: q={q.double()[bad][:5]}, v={want[bad][:5]}"


def random_gemm1_output(M, I, dtype):
    """Rows of different magnitudes (10^-1 .. 10^1.3, i.e. up to about +-60): many values beyond
    swigluoai's limit 7, so that its clamps bite."""
    x = torch.randn(M, 2 * I) * torch.pow(10.0, torch.empty(M, 1).uniform_(-1, 1.3))
    return x.to(dtype)


def random_offsets(M, E):
    """[E + 1] int64 offsets over M rows with an empty expert and unowned rows at the end."""
    cuts = torch.sort(torch.randint(0, M + 1, (E - 1,))).values
    off = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.tensor([max(M - 2, 0)])])
    off = torch.minimum(off, torch.tensor(max(M - 2, 0)))
    off = torch.cummax(off, dim=0).values
    if E >= 3:
        off[2] = off[1]  # expert 1 has no rows
    return off


def run_act(x, mode, activation, interleaved, bias=None, offsets=None, scale=None, **kw):
    args = dict(activation=activation, gate_up_interleaved=interleaved, bias=bias, expert_offsets=offsets, **kw)
    if mode == "static":
        return moe_kernels.silu_and_mul_quant_fp8(x, scale, False, **args)
    if mode == "group":
        return moe_kernels.silu_and_mul_quant_fp8(x, None, False, GROUP, **args)
    return moe_kernels.silu_and_mul_quant_fp8(x, None, mode == "per_token", **args)


# ---------------------------------------------------------------- CPU reference against the formulas

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_quant_matches_formula(activation, interleaved, with_bias, mode, dtype):
    M, I, E = 37, 64, 5
    x = random_gemm1_output(M, I, dtype)
    bias = torch.randn(E, 2 * I) * 3 if with_bias else None
    offsets = random_offsets(M, E) if with_bias else None
    y = formula_act(x, activation, interleaved, bias=bias, offsets=offsets)
    given = (y.abs().max() / E4M3_MAX * 0.7).float().reshape(1)  # static: saturates the largest values
    q, scale = run_act(x, mode, activation, interleaved, bias, offsets, given)
    assert q.shape == (M, I) and q.dtype == FP8
    if mode == "static":
        assert torch.equal(scale, given)
    else:
        # exp / erf within a few ulp of torch's: the amax, hence the scale, within 1e-6.
        torch.testing.assert_close(scale, formula_scale(y, mode).float(), rtol=2e-6, atol=0)
    s = scale.double().repeat_interleave(GROUP, dim=1) if mode == "group" else scale.double()
    assert_within_half_ulp(q, y.double() / s)


@pytest.mark.parametrize("alpha,limit", [(1.702, 7.0), (1.0, 3.0), (2.5, 0.5)])
def test_swigluoai_clamps_bite(alpha, limit):
    # Values chosen on both sides of +-limit: the gate is clamped from above only, up both ways.
    g = torch.tensor([[-3 * limit, -limit, 0.5 * limit, limit, 1.5 * limit, 20 * limit]])
    u = torch.tensor([[-10 * limit, -1.5 * limit, 0.25 * limit, 1.1 * limit, 3 * limit, -0.5 * limit]])
    x = torch.cat([g, u], dim=1)
    want = formula_act(x, "swigluoai", alpha=alpha, limit=limit)
    gc, uc = g.double().clamp(max=limit), u.double().clamp(-limit, limit)
    torch.testing.assert_close(want, (uc + 1) * gc * torch.sigmoid(alpha * gc))
    q, scale = moe_kernels.silu_and_mul_quant_fp8(x, None, True, activation="swigluoai", swiglu_alpha=alpha,
                                                  swiglu_limit=limit)
    assert_within_half_ulp(q, want.double() / scale.double())
    # The same values unclamped give something else entirely (the bug of an engine that dropped it).
    unclamped = (u.double() + 1) * g * torch.sigmoid(alpha * g.double())
    assert (unclamped - want).abs().max() > 0.5 * want.abs().max()
    # Interleaved: the same values, alternating.
    xi = torch.stack([g, u], dim=2).reshape(1, -1)
    qi, si = moe_kernels.silu_and_mul_quant_fp8(xi, None, True, activation="swigluoai", gate_up_interleaved=True,
                                                swiglu_alpha=alpha, swiglu_limit=limit)
    assert torch.equal(qi.view(torch.uint8), q.view(torch.uint8)) and torch.equal(si, scale)


def test_swigluoai_keeps_nan_and_gelu_limits():
    x = torch.tensor([[float("nan"), 1.0, float("-inf"), 2.0, 1.0, float("nan"), 3.0, 1.0]])
    q, _ = moe_kernels.silu_and_mul_quant_fp8(x, torch.ones(1), activation="swigluoai")
    # NaN gate or up stays NaN (torch.clamp keeps NaN; a fminf would make it the limit).
    assert q.float()[0, 0].isnan() and q.float()[0, 1].isnan()
    g = torch.tensor([[float("-inf"), float("inf"), -30.0, 30.0]])
    q, _ = moe_kernels.silu_and_mul_quant_fp8(torch.cat([g, torch.ones_like(g)], 1), torch.ones(1),
                                              activation="gelu")
    # gelu's limits: -0 at -inf (as silu here), +inf saturating to 448.
    assert q.float().tolist() == [[0.0, 448.0, 0.0, 30.0]]


def test_gelu_is_exact_erf_not_tanh():
    # At g = 1.5 the erf GELU and the tanh approximation differ by 2.3e-4 relative: a static scale
    # fine enough to resolve it (y near 1.4, e4m3 step 0.125 * scale).
    g = torch.linspace(-4, 4, 4097).reshape(1, -1)
    x = torch.cat([g, torch.ones_like(g)], 1)
    scale = torch.tensor([1.0 / 256])
    q, _ = moe_kernels.silu_and_mul_quant_fp8(x, scale, activation="gelu")
    assert_within_half_ulp(q, F.gelu(g.double()) / scale.double())


def test_interleaved_equals_concatenated_after_reordering():
    M, I, E = 9, 48, 3
    x = random_gemm1_output(M, I, torch.bfloat16)
    offsets = random_offsets(M, E)
    bias = torch.randn(E, 2 * I)
    g, u = split_gate_up(x, False)
    xi = torch.stack([g, u], dim=2).reshape(M, 2 * I)
    bg, bu = split_gate_up(bias, False)
    bi = torch.stack([bg, bu], dim=2).reshape(E, 2 * I)
    for activation in ACTIVATIONS:
        a = moe_kernels.silu_and_mul_quant_fp8(x, None, True, activation=activation, bias=bias, expert_offsets=offsets)
        b = moe_kernels.silu_and_mul_quant_fp8(xi, None, True, activation=activation, gate_up_interleaved=True,
                                               bias=bi, expert_offsets=offsets)
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def test_default_keywords_give_todays_silu():
    x = random_gemm1_output(11, 40, torch.bfloat16)
    for mode in ["per_tensor", "per_token"]:
        a = moe_kernels.silu_and_mul_quant_fp8(x, None, mode == "per_token")
        b = moe_kernels.silu_and_mul_quant_fp8(x, None, mode == "per_token", 0, "silu", False, 1.702, 7.0, None, None)
        assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_act_opcheck(device, activation, interleaved, with_bias):
    M, I, E = 9, 32, 3
    x = random_gemm1_output(M, I, torch.bfloat16).to(device)
    bias = (torch.randn(E, 2 * I)).to(device) if with_bias else None
    offsets = random_offsets(M, E).to(device) if with_bias else None
    for args in [(None, True, 0), (None, False, 16)]:
        opcheck(torch.ops.moe_kernels.silu_and_mul_quant_fp8,
                (x, *args, activation, interleaved, 1.5, 6.0, bias, offsets))


@pytest.mark.parametrize("device", DEVICES)
def test_act_rejects_bad_arguments(device):
    x = torch.randn(6, 16, device=device)
    off = torch.tensor([0, 3, 6], device=device)
    b = torch.zeros(2, 16, device=device)
    op = moe_kernels.silu_and_mul_quant_fp8
    with pytest.raises(RuntimeError, match=r'silu_and_mul_quant_fp8: activation must be "silu", "gelu" or '
                                           r'"swigluoai", got "gelu_tanh"'):
        op(x, activation="gelu_tanh")
    with pytest.raises(RuntimeError, match="silu_and_mul_quant_fp8: bias and expert_offsets go together .*got bias "
                                           "without expert_offsets"):
        op(x, bias=b)
    with pytest.raises(RuntimeError, match="got expert_offsets without bias"):
        op(x, expert_offsets=off)
    with pytest.raises(RuntimeError, match=r"silu_and_mul_quant_fp8: bias must be \[E, 2I\] = \[2, 16\] .*got shape "
                                           r"\[2, 8\]"):
        op(x, bias=b[:, :8], expert_offsets=off)
    with pytest.raises(RuntimeError, match=r"silu_and_mul_quant_fp8: bias must be float32, got BFloat16"):
        op(x, bias=b.bfloat16(), expert_offsets=off)
    with pytest.raises(RuntimeError, match="silu_and_mul_quant_fp8: bias must be contiguous"):
        op(x, bias=torch.zeros(16, 2, device=device).t(), expert_offsets=off)
    with pytest.raises(RuntimeError, match="silu_and_mul_quant_fp8: expert_offsets must be int64, got Int"):
        op(x, bias=b, expert_offsets=off.int())
    with pytest.raises(RuntimeError, match=r"silu_and_mul_quant_fp8: expert_offsets must be 1-D \[E \+ 1\]"):
        op(x, bias=b, expert_offsets=off.reshape(1, 3))


@pytest.mark.cuda
def test_act_rejects_bias_on_another_device():
    x = torch.randn(6, 16, device="cuda")
    with pytest.raises(RuntimeError, match="silu_and_mul_quant_fp8: bias must be on cuda:0 \\(as x\\), got cpu"):
        moe_kernels.silu_and_mul_quant_fp8(x, bias=torch.zeros(2, 16), expert_offsets=torch.tensor([0, 3, 6],
                                                                                                    device="cuda"))
    with pytest.raises(RuntimeError, match="silu_and_mul_quant_fp8: expert_offsets must be on cuda:0"):
        moe_kernels.silu_and_mul_quant_fp8(x, bias=torch.zeros(2, 16, device="cuda"),
                                           expert_offsets=torch.tensor([0, 3, 6]))


# ---------------------------------------------------------------- moe_unpermute's bias

def formula_unpermute(permuted, w, inv, bias=None, offsets=None):
    """out[t] = sum_k w[t,k] * (permuted[r] + bias[e(r)]) over r = inv[t,k] >= 0, in float64."""
    rows = add_row_bias(permuted.cpu().float(), bias, offsets).double()
    T, K = inv.shape
    out = torch.zeros(T, rows.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            r = int(inv[t, k])
            if r >= 0:
                out[t] += float(w[t, k]) * rows[r]
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_map", [False, True])
def test_unpermute_bias_matches_formula(dtype, with_map):
    T, K, E, H = 23, 4, 8, 40
    ids = random_topk_ids(T, K, E)
    x = torch.randn(T, H).to(dtype)
    emap, local = None, -1
    if with_map:
        emap = torch.full((E,), -1, dtype=torch.int32)
        emap[torch.tensor([1, 4, 6])] = torch.arange(3, dtype=torch.int32)
        local = 3
    permuted, offsets, inv, _ = moe_kernels.moe_permute(x, ids, E, emap, local)
    E_local = offsets.shape[0] - 1
    bias = torch.randn(E_local, H) * 4
    w = torch.rand(T, K)
    out = moe_kernels.moe_unpermute(permuted, w, inv, bias, offsets)
    # fp32 accumulation vs float64, then one rounding to dtype.
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), formula_unpermute(permuted, w, inv, bias, offsets), **tol)
    # Without the bias: today's result.
    assert torch.equal(moe_kernels.moe_unpermute(permuted, w, inv), moe_kernels.moe_unpermute(permuted, w, inv, None, None))


@pytest.mark.parametrize("device", DEVICES)
def test_unpermute_bias_opcheck(device):
    T, K, E, H = 9, 2, 4, 24
    ids = random_topk_ids(T, K, E).to(device)
    permuted, offsets, inv, _ = moe_kernels.moe_permute(torch.randn(T, H, device=device), ids, E)
    opcheck(torch.ops.moe_kernels.moe_unpermute,
            (permuted, torch.rand(T, K, device=device), inv, torch.randn(E, H, device=device), offsets))


@pytest.mark.parametrize("device", DEVICES)
def test_unpermute_rejects_bad_bias(device):
    T, K, E, H = 5, 2, 4, 16
    ids = random_topk_ids(T, K, E).to(device)
    permuted, offsets, inv, _ = moe_kernels.moe_permute(torch.randn(T, H, device=device), ids, E)
    w = torch.rand(T, K, device=device)
    b = torch.zeros(E, H, device=device)
    op = moe_kernels.moe_unpermute
    with pytest.raises(RuntimeError, match="moe_unpermute: bias and expert_offsets go together"):
        op(permuted, w, inv, b)
    with pytest.raises(RuntimeError, match=r"moe_unpermute: bias must be \[E, H\] = \[4, 16\] .*got shape \[3, 16\]"):
        op(permuted, w, inv, b[:3], offsets)
    with pytest.raises(RuntimeError, match="moe_unpermute: bias must be float32, got Half"):
        op(permuted, w, inv, b.half(), offsets)
    with pytest.raises(RuntimeError, match="moe_unpermute: expert_offsets must be int64, got Int"):
        op(permuted, w, inv, b, offsets.int())


# ---------------------------------------------------------------- CUDA against the CPU reference

@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,I", [(1, 64), (37, 2880), (300, 96), (5, 12288), (64, 7)])
def test_act_cuda_matches_cpu(activation, interleaved, with_bias, mode, dtype, M, I):
    if mode == "group" and I % GROUP:
        pytest.skip("group mode needs I % group_size == 0")
    E = 4
    x = random_gemm1_output(M, I, dtype)
    bias = torch.randn(E, 2 * I) * 3 if with_bias else None
    offsets = random_offsets(M, E) if with_bias else None
    y = formula_act(x, activation, interleaved, bias=bias, offsets=offsets)
    given = (y.abs().max() / E4M3_MAX * 0.7).float().reshape(1)
    want_q, want_s = run_act(x, mode, activation, interleaved, bias, offsets, given)
    poison_cuda_allocator(0xFF)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    q, s = run_act(x.cuda(), mode, activation, interleaved, cuda(bias), cuda(offsets), given.cuda())
    torch.cuda.synchronize()
    # The same fp32 operations (portable exp and erf, IEEE intrinsics): equal scales and bytes.
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))


# The kernels read the bias in packs of as many floats as they load values at once (16 bytes of
# x: 8 bf16); a bias that starts 4 bytes past an aligned address (a view with a storage offset)
# makes the launcher narrow both loads instead of reading misaligned packs.
@pytest.mark.cuda
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_act_cuda_matches_cpu_with_misaligned_bias(interleaved, mode):
    M, I, E = 45, 256, 4
    x = random_gemm1_output(M, I, torch.bfloat16)
    bias = (torch.randn(E * 2 * I + 1) * 3)[1:].view(E, 2 * I)
    offsets = random_offsets(M, E)
    given = torch.tensor([0.05])
    want_q, want_s = run_act(x, mode, "swigluoai", interleaved, bias, offsets, given)
    poison_cuda_allocator(0xFF)
    q, s = run_act(x.cuda(), mode, "swigluoai", interleaved, bias.cuda(), offsets.cuda(), given.cuda())
    torch.cuda.synchronize()
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))


# The MoE models' GEMM1 outputs in their own activation, layout and bias, per token (the
# per-token kernel's team sizes: Qwen3-30B's 768 and Qwen3-235B's 1536 on one warp, DeepSeek-V3's
# 2048 on two, gpt-oss's 2880 on four, Mixtral's 14336 in two chunks, one in shared memory), and
# an odd I (one value a vector) of gpt-oss's layout.
@pytest.mark.cuda
@pytest.mark.parametrize("I,activation,interleaved,with_bias", [
    (768, "silu", False, False), (1536, "silu", False, False), (2048, "silu", False, False),
    (2880, "swigluoai", True, True), (2881, "swigluoai", True, True), (14336, "silu", False, False),
    (14336, "gelu", True, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_per_token_cuda_matches_cpu_at_model_shapes(I, activation, interleaved, with_bias, dtype):
    M, E = 67, 4
    x = random_gemm1_output(M, I, dtype)
    bias = torch.randn(E, 2 * I) * 3 if with_bias else None
    offsets = random_offsets(M, E) if with_bias else None
    want_q, want_s = run_act(x, "per_token", activation, interleaved, bias, offsets)
    poison_cuda_allocator(0xFF)
    cuda = lambda t: None if t is None else t.cuda()  # noqa: E731
    q, s = run_act(x.cuda(), "per_token", activation, interleaved, cuda(bias), cuda(offsets))
    torch.cuda.synchronize()
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    assert not q.cpu().float().isnan().any()  # finite inputs: an unwritten (poisoned) byte is NaN


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H", [40, 2880, 7168, 7])
def test_unpermute_bias_cuda_matches_cpu(dtype, H):
    T, K, E = 300, 4, 32
    ids = random_topk_ids(T, K, E)
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[torch.arange(0, E, 2)] = torch.arange(E // 2, dtype=torch.int32)
    permuted, offsets, inv, _ = moe_kernels.moe_permute(torch.randn(T, H).to(dtype), ids, E, emap, E // 2)
    bias = torch.randn(E // 2, H) * 4
    w = torch.rand(T, K)
    want = moe_kernels.moe_unpermute(permuted, w, inv, bias, offsets)
    poison_cuda_allocator(0xFF)
    got = moe_kernels.moe_unpermute(permuted.cuda(), w.cuda(), inv.cuda(), bias.cuda(), offsets.cuda())
    # Same fp32 operations in the same order (fmaf of w and the fp32 sum row + bias): equal.
    assert torch.equal(got.cpu(), want)
