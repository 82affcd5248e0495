"""Non-finite input (NaN, +-inf), as a bad request puts it into a batch. The contract:

- Router (moe_fused_gate): NaN ranks as -inf and ties go to the lower index, so the ids are
  always K distinct experts in [0, E) (the experts with numbers first, then the lowest-index
  others); weights are s of the chosen experts and may be NaN. Other tokens are untouched.
- Quantization: +-inf saturates to +-448; NaN stays NaN in its element only; dynamic scales are
  computed from the finite values (a non-finite value neither poisons nor changes its scale).
  silu(-inf) = -0 (its limit), silu(+inf) = +inf.
- permute / unpermute / ep reorders / the layer: NaN reaches only the token it came from.

CPU tests always run; the same checks run on the GPU with the `cuda` device, and the CUDA results
must equal the CPU reference bit for bit where the hand-written tests ask for it.
"""

import pytest
import torch
import torch.nn.functional as F

import moe_kernels

from fp8_helpers import quantize_per_expert
from helpers import DEVICES, random_topk_ids
from test_quant import E4M3_MAX, MIN_SCALE, assert_within_half_ulp

FP8 = torch.float8_e4m3fn
NAN, INF = float("nan"), float("inf")


def bitwise_equal(a, b):
    """Equal values, NaN where NaN (whatever its payload), -0 distinct from +0."""
    a, b = a.cpu(), b.cpu()
    if a.dtype == FP8:
        a, b = a.float(), b.float()
    if a.shape != b.shape:
        return False
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    return torch.equal(a[~nan], b[~nan]) and torch.equal(a[~nan].signbit(), b[~nan].signbit())


# ---------------------------------------------------------------- router

# (E, groups, topk_group, topk, with_bias): plain top-k, grouped with groups as runs of lanes
# (E = 256: 8 experts per lane, 4 lanes per group), grouped through shared memory (E = 96 in 6
# groups of 16: 3 experts per lane), and one expert per group.
GATES = [(64, 1, 1, 8, False), (64, 1, 1, 8, True), (256, 8, 4, 8, True), (256, 8, 3, 6, False),
         (96, 6, 2, 5, True), (96, 6, 2, 5, False), (16, 16, 4, 4, False)]
PATTERNS = ["one_nan", "half_nan", "all_nan", "pos_inf", "neg_inf", "mixed"]


def poison_scores(scores, pattern, g):
    """Non-finite values in rows 1, 3, 5, ...; even rows stay finite."""
    s = scores.clone()
    T, E = s.shape
    for t in range(1, T, 2):
        if pattern == "one_nan":
            s[t, int(torch.randint(E, (1,), generator=g))] = NAN
        elif pattern == "half_nan":
            s[t, torch.randperm(E, generator=g)[:E // 2]] = NAN
        elif pattern == "all_nan":
            s[t] = NAN
        elif pattern in ("pos_inf", "neg_inf"):
            s[t, torch.randperm(E, generator=g)[:3]] = INF if pattern == "pos_inf" else -INF
        else:
            cols = torch.randperm(E, generator=g)[:6]
            s[t, cols] = torch.tensor([NAN, INF, -INF, NAN, INF, -INF], dtype=s.dtype)
    return s


def gate_definition(scores, bias, G, topk_group, topk, scoring, renormalize):
    """The documented selection in plain torch: s, choice = s + bias; NaN ranks as -inf; groups
    by the top-2 sum (bias) or the max of ranks; experts of dropped groups are never chosen;
    every selection prefers the larger rank, then the lower index (stable sorts)."""
    x = scores.float()
    s = x.sigmoid() if scoring == "sigmoid" else x.softmax(dim=-1)
    choice = s + bias.float() if bias is not None else s
    rank = choice.nan_to_num(nan=-INF, posinf=INF, neginf=-INF)
    T, E = s.shape
    allowed = torch.ones(T, E, dtype=torch.bool)
    if topk_group < G:
        top2 = rank.view(T, G, E // G).sort(dim=-1, descending=True).values[..., :2]
        group_rank = (top2.sum(-1) if bias is not None else top2[..., 0]).nan_to_num(nan=-INF, posinf=INF,
                                                                                     neginf=-INF)
        kept = group_rank.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
        allowed = torch.zeros(T, G, dtype=torch.bool).scatter_(1, kept, True).repeat_interleave(E // G, dim=1)
    order = rank.sort(dim=-1, descending=True, stable=True).indices          # rank, then index
    order = order.gather(1, (~allowed.gather(1, order)).int().sort(dim=-1, stable=True).indices)  # allowed first
    ids = order[:, :topk]
    w = s.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return w, ids.int()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("E,G,tg,k,with_bias", GATES)
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_gate_ids_stay_distinct_and_in_range(device, E, G, tg, k, with_bias, scoring, pattern):
    g = torch.Generator().manual_seed(E * 7 + k)
    T = 64
    clean = torch.randn(T, E, generator=g)
    scores = poison_scores(clean, pattern, g)
    bias = torch.randn(E, generator=g) * 0.1 if with_bias else None
    args = (G, tg, k, scoring, True, 1, 2.5, False)  # one fused shared-expert slot
    to = (lambda t: t.to(device) if t is not None else None)
    w, ids = moe_kernels.moe_fused_gate(to(scores), to(bias), *args)
    w, ids = w.cpu(), ids.cpu()
    routed = ids[:, :k]
    assert ((routed >= 0) & (routed < E)).all()
    assert (routed.sort(dim=1).values.diff(dim=1) != 0).all(), "duplicate expert ids"
    assert (ids[:, k] == E).all() and (w[:, k] == 1 / 2.5).all()  # the shared slot is unaffected
    want_w, want_ids = gate_definition(scores, bias, G, tg, k, scoring, True)
    assert torch.equal(routed, want_ids)
    torch.testing.assert_close(w[:, :k], want_w, rtol=1e-5, atol=1e-6, equal_nan=True)
    # Finite rows are computed as if the bad rows were not there.
    clean_w, clean_ids = moe_kernels.moe_fused_gate(to(clean), to(bias), *args)
    assert torch.equal(ids[0::2], clean_ids.cpu()[0::2]) and torch.equal(w[0::2], clean_w.cpu()[0::2])
    if device == "cuda":  # the GPU picks what the CPU reference picks, bit for bit
        cpu_w, cpu_ids = moe_kernels.moe_fused_gate(scores, bias, *args)
        assert torch.equal(ids, cpu_ids) and bitwise_equal(w, cpu_w)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_nan_experts_are_chosen_last_by_index(device):
    scores = torch.full((2, 16), NAN)
    scores[0, 9] = 0.5
    scores[0, 3] = 1.0
    _, ids = moe_kernels.moe_fused_gate(scores.to(device), None, 1, 1, 4, "sigmoid", True)
    # Row 0: the two numbers by value, then NaN experts by lowest index; row 1: all NaN.
    assert ids.cpu().tolist() == [[3, 9, 0, 1], [0, 1, 2, 3]]


@pytest.mark.parametrize("device", DEVICES)
def test_gate_softmax_nan_or_inf_spreads_over_the_row_only(device):
    # A softmax with a NaN or +inf score is NaN everywhere in that row (as torch.softmax): the row
    # gets NaN weights and the lowest ids; the other rows are exact.
    scores = torch.randn(3, 32)
    scores[1, 5] = NAN
    scores[2, 7] = INF
    w, ids = moe_kernels.moe_fused_gate(scores.to(device), None, 1, 1, 4, "softmax", True)
    w, ids = w.cpu(), ids.cpu()
    assert w[1:].isnan().all() and ids[1:].tolist() == [[0, 1, 2, 3]] * 2
    assert torch.isfinite(w[0]).all()
    assert torch.equal(ids[0], scores[0].softmax(-1).sort(descending=True, stable=True).indices[:4].int())


# ---------------------------------------------------------------- quantization

def with_nonfinite(x, g):
    """x with +inf, -inf and NaN in rows 1, 4, 7, ... (other rows finite)."""
    x = x.clone()
    M, C = x.shape
    for r in range(1, M, 3):
        cols = torch.randperm(C, generator=g)[:3]
        x[r, cols] = torch.tensor([INF, -INF, NAN], dtype=x.dtype)
    return x


def finite_scale(y, mode, static):
    """The dynamic scale from the finite values only (non-finite ones count as 0)."""
    a = torch.where(torch.isfinite(y), y.abs(), torch.zeros_like(y))
    if mode == "static":
        return static
    amax = a.amax(dim=1, keepdim=True) if mode == "per_token" else a.max().reshape(1)
    return torch.clamp(amax / E4M3_MAX, min=MIN_SCALE)


def check_quantized(q, y, scale):
    """q: +-inf -> +-448, NaN -> NaN, finite values within half an e4m3 step of y / scale."""
    qf = q.float()
    assert torch.equal(qf[y == INF], torch.full_like(qf[y == INF], E4M3_MAX))
    assert torch.equal(qf[y == -INF], torch.full_like(qf[y == -INF], -E4M3_MAX))
    assert torch.equal(qf.isnan(), y.isnan())
    finite = torch.isfinite(y)
    assert_within_half_ulp(qf[finite], (y.double() / scale.double().expand_as(y))[finite])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["static", "per_tensor", "per_token"])
@pytest.mark.parametrize("C", [64, 7])  # vectorized and scalar paths
def test_scaled_fp8_quant_saturates_inf_and_keeps_nan_local(device, dtype, mode, C):
    g = torch.Generator().manual_seed(C)
    x = with_nonfinite(torch.randn(20, C, generator=g), g).to(dtype)
    static = torch.tensor([0.01])
    y = x.float()
    q, scale = moe_kernels.scaled_fp8_quant(x.to(device), static.to(device) if mode == "static" else None,
                                            mode == "per_token")
    q, scale = q.cpu(), scale.cpu()
    want_scale = finite_scale(y, mode, static)
    assert torch.equal(scale, want_scale)
    check_quantized(q, y, scale)
    if device == "cuda":
        cpu_q, cpu_scale = moe_kernels.scaled_fp8_quant(x, static if mode == "static" else None, mode == "per_token")
        assert torch.equal(scale, cpu_scale) and bitwise_equal(q, cpu_q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["static", "per_tensor", "per_token"])
@pytest.mark.parametrize("I", [64, 7])
def test_silu_and_mul_quant_nonfinite(device, mode, I):
    g = torch.Generator().manual_seed(I)
    x = with_nonfinite(torch.randn(20, 2 * I, generator=g) + 0.1, g).to(torch.bfloat16)
    gate, up = x.float()[:, :I], x.float()[:, I:]
    # silu(-inf) = -0 (the limit; torch's x * sigmoid(x) gives NaN there), silu(+inf) = +inf.
    y = torch.where(gate == -INF, torch.zeros_like(gate).neg(), F.silu(gate)) * up
    static = torch.tensor([0.01])
    q, scale = moe_kernels.silu_and_mul_quant_fp8(x.to(device), static.to(device) if mode == "static" else None,
                                                  mode == "per_token")
    q, scale = q.cpu(), scale.cpu()
    torch.testing.assert_close(scale, finite_scale(y, mode, static), rtol=1e-6, atol=0)  # silu within an ulp
    check_quantized(q, y, scale)
    if device == "cuda":
        cpu_q, cpu_scale = moe_kernels.silu_and_mul_quant_fp8(x, static if mode == "static" else None,
                                                              mode == "per_token")
        assert torch.equal(scale, cpu_scale) and bitwise_equal(q, cpu_q)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_of_minus_inf_is_zero(device):
    x = torch.tensor([[-INF, -INF, INF, 1.0, 2.0, 3.0]])  # gate | up
    q, _ = moe_kernels.silu_and_mul_quant_fp8(x.to(device), torch.tensor([1.0], device=device))
    assert q.float().cpu().tolist() == [[-0.0, -0.0, 448.0]]
    assert q.float().cpu()[0, :2].signbit().all()  # -0 * positive up


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["per_tensor", "per_token"])
def test_ep_pre_reorder_quant_saturates_inf(device, mode):
    T, K, E, H = 9, 2, 8, 32
    g = torch.Generator().manual_seed(0)
    x = with_nonfinite(torch.randn(T, H, generator=g), g).to(torch.bfloat16)
    ids = random_topk_ids(T, K, E)
    _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, E)
    scale = torch.tensor([0.01]) if mode == "per_tensor" else torch.rand(T, generator=g) * 0.01 + 1e-3
    out = moe_kernels.ep_pre_reorder(x.to(device), src2dst.to(device), ids.to(device), 0, E - 1, scale.to(device),
                                     FP8).cpu()
    rows = out[src2dst.long().reshape(-1)].float().view(T, K, H)
    xf = x.float().unsqueeze(1).expand(T, K, H)
    assert (rows[xf == INF] == E4M3_MAX).all() and (rows[xf == -INF] == -E4M3_MAX).all()
    assert torch.equal(rows.isnan(), xf.isnan())
    if device == "cuda":
        cpu = moe_kernels.ep_pre_reorder(x, src2dst, ids, 0, E - 1, scale, FP8)
        assert bitwise_equal(out, cpu)


# ---------------------------------------------------------------- data movement and the layer

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [NAN, INF])
def test_permute_unpermute_keep_nonfinite_in_their_token(device, value):
    T, K, E, H = 40, 4, 16, 64
    x = torch.randn(T, H)
    ids = random_topk_ids(T, K, E)
    w = torch.rand(T, K)
    bad = x.clone()
    bad[5, 3] = value
    bad[17] = value

    def roundtrip(v):
        permuted, _, inv, _ = moe_kernels.moe_permute(v.to(device), ids.to(device), E)
        return moe_kernels.moe_unpermute(permuted, w.to(device), inv).cpu()

    out, clean = roundtrip(bad), roundtrip(x)
    others = torch.ones(T, dtype=torch.bool)
    others[[5, 17]] = False
    assert torch.equal(out[others], clean[others])
    assert out[17].isnan().all() if value != value else (out[17] == INF).all()
    assert bitwise_equal(out[5, 3:4], torch.tensor([value]))
    assert torch.equal(out[5, :3], clean[5, :3]) and torch.equal(out[5, 4:], clean[5, 4:])


@pytest.mark.parametrize("device", DEVICES)
def test_ep_post_reorder_keeps_nan_in_its_token(device):
    T, K, E, H = 12, 2, 8, 16
    ids = random_topk_ids(T, K, E)
    _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, E)
    down = torch.randn(T * K, H)
    down[src2dst[3, 1]] = NAN
    w = torch.rand(T, K)
    out = moe_kernels.ep_post_reorder(down.to(device), src2dst.to(device), ids.to(device), w.to(device), 0,
                                      E - 1).cpu()
    assert out[3].isnan().all() and not out[torch.arange(T) != 3].isnan().any()


def make_layer(T=24, E=8, K=2, H=128, I=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(torch.bfloat16)
    w1, w1_s = quantize_per_expert(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
    w2, w2_s = quantize_per_expert(torch.randn(E, H, I, generator=g) / I**0.5)
    w = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    ids = random_topk_ids(T, K, E)
    return x, w1, w2, w, ids, w1_s, w2_s


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales", ["per_token", "static", "per_tensor"])
def test_layer_nan_token_does_not_spread(device, scales):
    x, w1, w2, w, ids, w1_s, w2_s = make_layer()
    x[0, 0] = 8.0  # the largest |x|, in a good token: the dynamic per-tensor scale is the same in both runs
    bad = x.clone()
    bad[3, 10] = NAN
    bad[7, :] = NAN
    # per_tensor: a dynamic per-tensor a1 (which must ignore NaN) and a static a2 (a dynamic one
    # would see the bad tokens' finite GEMM1 outputs vanish from its amax).
    a1 = torch.tensor([0.01]) if scales == "static" else None
    a2 = torch.tensor([0.01]) if scales != "per_token" else None

    def layer(v):
        args = [t.to(device) if t is not None else None for t in (v, w1, w2, w, ids, w1_s, w2_s, a1, a2)]
        return moe_kernels.cutlass_moe_fp8(*args, per_act_token=scales == "per_token").cpu()

    out, clean = layer(bad), layer(x)
    assert out[[3, 7]].isnan().all()  # a NaN input element reaches every output of its token
    others = torch.ones(x.shape[0], dtype=torch.bool)
    others[[3, 7]] = False
    # Every row of a GEMM depends on its own inputs only, and the scales are unchanged: bit for bit.
    assert torch.equal(out[others], clean[others])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_act_token", [False, True])
def test_layer_inf_saturates(device, per_act_token):
    x, w1, w2, w, ids, w1_s, w2_s = make_layer()
    bad = x.clone()
    bad[2, 0] = INF
    bad[9, 5] = -INF
    args = [t.to(device) for t in (bad, w1, w2, w, ids, w1_s, w2_s)]
    out = moe_kernels.cutlass_moe_fp8(*args, per_act_token=per_act_token).cpu()
    assert torch.isfinite(out).all()
