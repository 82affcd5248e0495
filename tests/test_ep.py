"""ep_pre_reorder, ep_post_reorder: CPU reference against plain torch formulas, CUDA against the CPU
reference (rows and fp8 bytes exactly), ranks splitting the experts summing to the unsplit
result, opcheck, bad inputs, CUDA graphs."""

import pytest
import torch
from torch.library import opcheck

import moe_kernels

from helpers import DEVICES, poison_cuda_allocator, random_rows, random_topk_ids

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


# ---------------------------------------------------------------- routing of one rank

def rank_range(E, ranks, r):
    """Experts [start, end] (inclusive) of rank r when E experts are split evenly over `ranks`."""
    per = E // ranks
    return r * per, (r + 1) * per - 1


def make_src2dst(ids, E, start, end, layout):
    """src2dst of a rank: 'global' sorts every expert (SGLang's layout: this rank's rows are one
    segment in the middle); 'local' keeps only [start, end] through an expert_map (rows from 0,
    other choices -1). Returns (src2dst, expert_offsets, first expert of offsets[0])."""
    if layout == "global":
        offsets, inv, _ = moe_kernels.moe_sort_tokens(ids, E)
        return inv, offsets, 0
    n = end - start + 1
    emap = torch.full((E,), -1, dtype=torch.int32, device=ids.device)
    emap[start:end + 1] = torch.arange(n, dtype=torch.int32, device=ids.device)
    offsets, inv, _ = moe_kernels.moe_sort_tokens(ids, E, emap, n)
    return inv, offsets, start


def random_input(T, H, dtype, device="cpu"):
    """Rows of different magnitudes (10^-2 .. 10^2), so that per-token scales differ and a
    per-tensor scale saturates some rows."""
    x = torch.randn(T, H) * torch.pow(10.0, torch.empty(T, 1).uniform_(-2, 2))
    return x.to(dtype).to(device)


def random_scale(x, mode):
    """A scale that saturates about a third of the largest values: [1] per tensor, [T] per token."""
    a = x.float().abs()
    if mode == "per_tensor":
        amax = a.max().reshape(1) if x.numel() else torch.ones(1, device=x.device)
        return (amax / E4M3_MAX * 0.7).float()
    amax = a.amax(dim=1) if x.shape[1] else torch.ones(x.shape[0], device=x.device)
    jitter = torch.empty_like(amax).uniform_(0.5, 1.2)
    return (amax.clamp(min=1e-3) / E4M3_MAX * jitter).float().contiguous()


def run_pre(x, src2dst, ids, start, end, mode):
    """ep_pre_reorder with mode 'copy', 'per_tensor' or 'per_token' (scale chosen from x)."""
    if mode == "copy":
        return moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end)
    scale = random_scale(x, mode)
    return moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end, scale, FP8), scale


# ---------------------------------------------------------------- plain torch formulas (the spec)

def kept_choices(src2dst, ids, start, end):
    """Mask [T, K] of the choices a rank writes: expert in [start, end], row in [0, T*K)."""
    T, K = src2dst.shape
    r = src2dst.long()
    return (ids >= start) & (ids <= end) & (r >= 0) & (r < T * K)


def written_rows(src2dst, ids, start, end):
    """[T*K] bool on the CPU: the rows a rank's ep_pre_reorder writes."""
    src2dst, ids = src2dst.cpu(), ids.cpu()
    T, K = src2dst.shape
    written = torch.zeros(T * K, dtype=torch.bool)
    written[src2dst.long()[kept_choices(src2dst, ids, start, end)]] = True
    return written


def formula_pre(x, src2dst, ids, start, end, scale=None):
    """(out [T*K, H] with the written rows filled, written [T*K] bool), in plain torch.
    Quantization: e4m3(clamp(x / scale, -448, 448)), the division in fp32."""
    x, src2dst, ids = x.cpu(), src2dst.cpu(), ids.cpu()
    T, K = src2dst.shape
    kept = kept_choices(src2dst, ids, start, end)
    token = torch.arange(T).unsqueeze(1).expand(T, K)[kept]
    rows = src2dst.long()[kept]
    if scale is None:
        values = x
    else:
        s = scale.cpu().reshape(-1, 1) if scale.numel() == T and T != 1 else scale.cpu().reshape(1, 1)
        values = (x.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    out = torch.zeros((T * K, x.shape[1]), dtype=values.dtype)
    out[rows] = values[token]
    return out, written_rows(src2dst, ids, start, end)


def formula_post(down, src2dst, ids, w, start, end):
    """out[t] = sum over local k of w[t,k] * down[src2dst[t,k]], in float64."""
    down, src2dst, ids, w = down.cpu(), src2dst.cpu(), ids.cpu(), w.cpu()
    kept = (ids >= start) & (ids <= end) & (src2dst >= 0) & (src2dst < down.shape[0])
    rows = down.double()[src2dst.long().clamp(0, max(down.shape[0] - 1, 0))] if down.shape[0] else \
        torch.zeros(*src2dst.shape, down.shape[1], dtype=torch.float64)
    return (rows * (w.double() * kept).unsqueeze(-1)).sum(1)


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))


# ---------------------------------------------------------------- CPU reference semantics

CASES = [  # (T, K, E, ranks, rank, H)
    (0, 2, 8, 2, 0, 16),
    (1, 2, 8, 1, 0, 64),
    (7, 2, 8, 2, 1, 2056),
    (64, 8, 128, 4, 1, 130),
    (300, 8, 256, 8, 0, 7),
    (33, 4, 16, 16, 15, 2055),   # a single expert
    (100, 8, 64, 8, 7, 8),
]


@pytest.mark.parametrize("T,K,E,ranks,rank,H", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [FP8])
@pytest.mark.parametrize("layout", ["global", "local"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_pre_reorder_copies_local_rows(T, K, E, ranks, rank, H, dtype, layout, id_dtype):
    start, end = rank_range(E, ranks, rank)
    ids = random_topk_ids(T, K, E, id_dtype)
    src2dst, _, _ = make_src2dst(ids, E, start, end, layout)
    x = random_rows(T, H, dtype)
    out = run_pre(x, src2dst, ids, start, end, "copy")
    want, written = formula_pre(x, src2dst, ids, start, end)
    assert out.shape == (T * K, H) and out.dtype == dtype
    assert same_bytes(out[written], want[written])


@pytest.mark.parametrize("T,K,E,ranks,rank,H", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["per_tensor", "per_token"])
def test_pre_reorder_quantizes_local_rows(T, K, E, ranks, rank, H, dtype, mode):
    start, end = rank_range(E, ranks, rank)
    ids = random_topk_ids(T, K, E)
    src2dst, _, _ = make_src2dst(ids, E, start, end, "global")
    x = random_input(T, H, dtype)
    out, scale = run_pre(x, src2dst, ids, start, end, mode)
    want, written = formula_pre(x, src2dst, ids, start, end, scale)
    assert out.shape == (T * K, H) and out.dtype == FP8
    # x / scale in fp32 (IEEE on both sides), saturation, round to nearest even: the same bytes.
    assert same_bytes(out[written], want[written])


def test_pre_reorder_saturates_and_divides():
    x = torch.tensor([[1000.0, -1000.0, 1e30, -float("inf"), 0.0, 1.0, 3.0, 223.0]])
    ids = torch.tensor([[5]], dtype=torch.int32)
    src2dst = torch.tensor([[0]], dtype=torch.int32)
    out = moe_kernels.ep_pre_reorder(x, src2dst, ids, 5, 5, torch.tensor([0.5]), FP8)
    # 223 / 0.5 = 446 lies between 416 and 448 on the e4m3 grid (step 32): nearest is 448.
    assert out.float().tolist() == [[448.0, -448.0, 448.0, -448.0, 0.0, 2.0, 6.0, 448.0]]


def test_pre_reorder_accepts_scale_of_scaled_fp8_quant_per_token():
    # scaled_fp8_quant's per-token scale is [T, 1]; it is accepted as is.
    x = random_input(5, 32, torch.bfloat16)
    _, scale = moe_kernels.scaled_fp8_quant(x, None, True)
    ids = random_topk_ids(5, 2, 8)
    src2dst, _, _ = make_src2dst(ids, 8, 0, 7, "global")
    a = moe_kernels.ep_pre_reorder(x, src2dst, ids, 0, 7, scale, FP8)
    b = moe_kernels.ep_pre_reorder(x, src2dst, ids, 0, 7, scale.reshape(-1), FP8)
    assert same_bytes(a, b)


@pytest.mark.parametrize("T,K,E,ranks,rank,H", CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights_fp32", [True, False])
@pytest.mark.parametrize("layout", ["global", "local"])
def test_post_reorder_matches_formula(T, K, E, ranks, rank, H, dtype, weights_fp32, layout):
    start, end = rank_range(E, ranks, rank)
    ids = random_topk_ids(T, K, E, torch.int64 if weights_fp32 else torch.int32)
    src2dst, _, _ = make_src2dst(ids, E, start, end, layout)
    down = random_rows(T * K, H, dtype)
    w = torch.rand(T, K, dtype=torch.float32 if weights_fp32 else dtype)
    out = moe_kernels.ep_post_reorder(down, src2dst, ids, w, start, end)
    want = formula_post(down, src2dst, ids, w, start, end)
    assert out.shape == (T, H) and out.dtype == dtype
    # fp32 accumulation, one rounding to the output dtype: within that dtype's half-ulp (plus fp32 sums).
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    none_local = ~((ids >= start) & (ids <= end)).any(dim=1)
    assert (out[none_local] == 0).all()  # tokens with no local expert get zeros


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_post_reorder_over_all_experts_is_unpermute(dtype):
    T, K, E, H = 50, 4, 16, 40
    ids = random_topk_ids(T, K, E)
    _, inv, _ = moe_kernels.moe_sort_tokens(ids, E)
    down = random_rows(T * K, H, dtype)
    w = torch.rand(T, K)
    # One kernel body, the same k order: the same bits.
    assert torch.equal(moe_kernels.ep_post_reorder(down, inv, ids, w, 0, E - 1),
                       moe_kernels.moe_unpermute(down, w, inv))


def test_ids_outside_the_range_are_not_local_and_bad_rows_are_skipped():
    x = torch.randn(3, 8)
    # -1 (a padded slot) and 99 (beyond any E) are simply not in [0, 7]; rows -5, 6 (= T*K) and
    # 1 << 30 are outside [0, T*K) and skipped.
    ids = torch.tensor([[0, -1], [99, 3], [2, 7]], dtype=torch.int64)
    src2dst = torch.tensor([[1, 0], [2, -5], [6, 1 << 30]], dtype=torch.int32)
    out = moe_kernels.ep_pre_reorder(x, src2dst, ids, 0, 7)
    torch.testing.assert_close(out[1], x[0], rtol=0, atol=0)
    down = torch.randn(6, 8)
    w = torch.ones(3, 2)
    post = moe_kernels.ep_post_reorder(down, src2dst, ids, w, 0, 7)
    torch.testing.assert_close(post[0], down[1], rtol=0, atol=0)
    assert (post[1] == 0).all() and (post[2] == 0).all()


# ---------------------------------------------------------------- ranks sum to the unsplit layer

def expert_fn(rows, offsets, first_expert, start, end):
    """A stand-in for the experts: rows of expert e (segment offsets[e - first_expert]) times
    (1 + e / 8), for e in [start, end]; rows of other experts are NaN, so that a post_reorder that
    reads them fails."""
    y = torch.full_like(rows, float("nan"))
    for e in range(start, end + 1):
        j = e - first_expert
        lo, hi = int(offsets[j]), int(offsets[j + 1])
        y[lo:hi] = (rows[lo:hi].float() * (1 + e / 8)).to(rows.dtype)
    return y


def check_ranks_sum_to_unsplit(device, ranks, layout, dtype, T=97, K=8, E=32, H=72):
    ids = random_topk_ids(T, K, E, device=device)
    x = random_rows(T, H, dtype, device)
    w = torch.rand(T, K, device=device)
    # Unsplit: every expert on one GPU.
    permuted, offsets, inv, _ = moe_kernels.moe_permute(x, ids, E)
    y_all = expert_fn(permuted, offsets, 0, 0, E - 1)
    want = moe_kernels.moe_unpermute(y_all, w, inv).float()
    # sum_k w |y|: the scale of every rounding error below (each partial and the result are at most that).
    magnitude = moe_kernels.moe_unpermute(y_all.abs(), w, inv).float()
    total = torch.zeros(T, H, device=device)
    for r in range(ranks):
        start, end = rank_range(E, ranks, r)
        src2dst, offs, first = make_src2dst(ids, E, start, end, layout)
        rows = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end)
        y = expert_fn(rows, offs, first, start, end)
        total += moe_kernels.ep_post_reorder(y, src2dst, ids, w, start, end).float()
    # The ranks' partial sums are added in another order than the unsplit k order, and each is
    # rounded to the output dtype once, as is the unsplit result: the difference is within
    # eps * (sum |partial| + |result|) <= 2 * eps * sum_k w |y|, eps = half an ulp relative (bf16:
    # 2^-8) or, in fp32, the error of sums of K = 8 terms (8 * 2^-24 = 2^-21, doubled).
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-20
    err = (total - want).abs()
    bound = 2 * eps * magnitude + 1e-6
    assert (err <= bound).all(), f"max error {float((err - bound).max())} beyond the rounding bound"


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("layout", ["global", "local"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranks_sum_to_unsplit_result(ranks, layout, dtype):
    check_ranks_sum_to_unsplit("cpu", ranks, layout, dtype)


# ---------------------------------------------------------------- opcheck (fake kernels, schemas)

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    T, K, E, H = 9, 2, 8, 24
    x = random_rows(T, H, torch.bfloat16, device)
    ids = random_topk_ids(T, K, E, device=device)
    _, inv, _ = moe_kernels.moe_sort_tokens(ids, E)
    # Every row written (the range covers every expert): the outputs are deterministic, as the
    # comparisons of opcheck need.
    opcheck(torch.ops.moe_kernels.ep_pre_reorder.default, (x, inv, ids, 0, E - 1, None, None))
    opcheck(torch.ops.moe_kernels.ep_pre_reorder.default,
            (x, inv, ids, 0, E - 1, torch.tensor([0.01], device=device), FP8))
    opcheck(torch.ops.moe_kernels.ep_pre_reorder.default,
            (x, inv, ids, 0, E - 1, torch.rand(T, device=device) + 0.01, FP8))
    down = random_rows(T * K, H, torch.bfloat16, device)
    w = torch.rand(T, K, device=device)
    opcheck(torch.ops.moe_kernels.ep_post_reorder.default, (down, inv, ids, w, 2, 5))


def test_torch_compile_traces_ops():
    def layer(x, ids, w, inv, scale):
        rows = moe_kernels.ep_pre_reorder(x, inv, ids, 0, 7, scale, FP8)
        return moe_kernels.ep_post_reorder(rows.float() * scale, inv, ids, w, 0, 7)

    T, K, E = 5, 2, 8
    x, ids, w = torch.randn(T, 16), random_topk_ids(T, K, E), torch.rand(T, K)
    _, inv, _ = moe_kernels.moe_sort_tokens(ids, E)
    scale = torch.tensor([0.01])
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, ids, w, inv, scale), layer(x, ids, w, inv, scale))


# ---------------------------------------------------------------- bad inputs

def pre_args(device, **override):
    T, K = 4, 2
    args = dict(hidden_states=torch.zeros(T, 16), src2dst=torch.zeros(T, K, dtype=torch.int32),
                topk_ids=torch.zeros(T, K, dtype=torch.int32), start_expert_id=0, end_expert_id=3,
                scale=None, out_dtype=None)
    args.update(override)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


BAD_PRE = [
    (dict(hidden_states=torch.zeros(4, 16, dtype=torch.int64)),
     "ep_pre_reorder: hidden_states must be bfloat16, float16, float32 or float8_e4m3fn, got Long"),
    (dict(hidden_states=torch.zeros(16)), "hidden_states must be 2-D"),
    (dict(hidden_states=torch.zeros(5, 16)), "hidden_states has 5 rows but src2dst has 4"),
    (dict(src2dst=torch.zeros(4, 2, dtype=torch.int64)), "src2dst must be int32, got Long"),
    (dict(src2dst=torch.zeros(8, dtype=torch.int32)), "src2dst must be 2-D"),
    (dict(src2dst=torch.zeros(4, 65, dtype=torch.int32), topk_ids=torch.zeros(4, 65, dtype=torch.int32)),
     "src2dst must have 1 to 64 columns"),
    (dict(topk_ids=torch.zeros(4, 3, dtype=torch.int32)), r"topk_ids must have shape \[4, 2\] \(as src2dst\)"),
    (dict(topk_ids=torch.zeros(4, 2)), "topk_ids must be int32 or int64, got Float"),
    (dict(start_expert_id=-1), "start_expert_id must be >= 0, got -1"),
    (dict(start_expert_id=4, end_expert_id=3), "start_expert_id must be <= end_expert_id"),
    (dict(out_dtype=torch.float16), "out_dtype must be None, Float .* or float8_e4m3fn, got Half"),
    (dict(out_dtype=FP8), "quantizing to float8_e4m3fn needs a scale"),
    (dict(out_dtype=FP8, scale=torch.zeros(1, dtype=torch.float64)), "scale must be float32, got Double"),
    (dict(out_dtype=FP8, scale=torch.zeros(3)), r"scale must have shape \[1\] \(per tensor\) or \[T\]=\[4\]"),
    (dict(out_dtype=FP8, scale=torch.zeros(4, 2)), r"scale must have shape \[1\]"),
    (dict(scale=torch.ones(1)), "scale is only used when quantizing"),
    (dict(hidden_states=torch.zeros(4, 16, dtype=FP8), out_dtype=FP8, scale=torch.ones(1)),
     "scale is only used when quantizing"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("override,message", BAD_PRE)
def test_pre_reorder_rejects_bad_arguments(device, override, message):
    with pytest.raises(RuntimeError, match=message):
        moe_kernels.ep_pre_reorder(**pre_args(device, **override))


@pytest.mark.parametrize("device", DEVICES)
def test_pre_reorder_rejects_non_contiguous(device):
    a = pre_args(device)
    for name in ("hidden_states", "src2dst", "topk_ids"):
        bad = dict(a)
        t = a[name]
        bad[name] = torch.cat([t, t], dim=1)[:, ::2]
        with pytest.raises(RuntimeError, match=f"{name} must be contiguous"):
            moe_kernels.ep_pre_reorder(**bad)


BAD_POST = [
    (dict(down_output=torch.zeros(8, 16, dtype=FP8)), "ep_post_reorder: down_output must be bfloat16, float16 or float32"),
    (dict(down_output=torch.zeros(16)), "down_output must be 2-D"),
    (dict(src2dst=torch.zeros(4, 2, dtype=torch.int64)), "src2dst must be int32, got Long"),
    (dict(topk_weights=torch.zeros(3, 2)), r"topk_weights must have shape \[4, 2\]"),
    (dict(topk_weights=torch.zeros(4, 2, dtype=torch.float16)), "topk_weights must be float32 or Float"),
    (dict(topk_ids=torch.zeros(4, 2, dtype=torch.int16)), "topk_ids must be int32 or int64, got Short"),
    (dict(topk_ids=torch.zeros(2, 4, dtype=torch.int32)), r"topk_ids must have shape \[4, 2\]"),
    (dict(start_expert_id=-3), "start_expert_id must be >= 0"),
    (dict(start_expert_id=2, end_expert_id=1), "start_expert_id must be <= end_expert_id"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("override,message", BAD_POST)
def test_post_reorder_rejects_bad_arguments(device, override, message):
    args = dict(down_output=torch.zeros(8, 16), src2dst=torch.zeros(4, 2, dtype=torch.int32),
                topk_ids=torch.zeros(4, 2, dtype=torch.int32), topk_weights=torch.zeros(4, 2),
                start_expert_id=0, end_expert_id=3)
    args.update(override)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=message):
        moe_kernels.ep_post_reorder(**args)


@pytest.mark.cuda
def test_rejects_tensors_on_other_devices():
    a = pre_args("cuda")
    with pytest.raises(RuntimeError, match="src2dst must be on cuda"):
        moe_kernels.ep_pre_reorder(**{**a, "src2dst": a["src2dst"].cpu()})
    with pytest.raises(RuntimeError, match="topk_ids must be on cuda"):
        moe_kernels.ep_pre_reorder(**{**a, "topk_ids": a["topk_ids"].cpu()})
    with pytest.raises(RuntimeError, match="scale must be on cuda"):
        moe_kernels.ep_pre_reorder(**{**a, "scale": torch.ones(1), "out_dtype": FP8})
    down, w = torch.zeros(8, 16, device="cuda"), torch.zeros(4, 2, device="cuda")
    with pytest.raises(RuntimeError, match="topk_ids must be on cuda"):
        moe_kernels.ep_post_reorder(down, a["src2dst"], a["topk_ids"].cpu(), w, 0, 3)


# ---------------------------------------------------------------- CUDA against the CPU reference

GPU_CASES = CASES + [(4096, 8, 256, 8, 0, 7168), (1000, 8, 128, 4, 3, 4096), (513, 8, 64, 2, 1, 2056),
                     (2000, 6, 160, 5, 2, 1536)]


@pytest.mark.cuda
@pytest.mark.parametrize("T,K,E,ranks,rank,H", GPU_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [FP8])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_pre_reorder_cuda_copy_matches_cpu(T, K, E, ranks, rank, H, dtype, id_dtype):
    start, end = rank_range(E, ranks, rank)
    ids = random_topk_ids(T, K, E, id_dtype)
    src2dst, _, _ = make_src2dst(ids, E, start, end, "global" if id_dtype == torch.int32 else "local")
    x = random_rows(T, H, dtype)
    want = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end)
    written = written_rows(src2dst, ids, start, end)
    poison_cuda_allocator(0xFF)
    got = moe_kernels.ep_pre_reorder(x.cuda(), src2dst.cuda(), ids.cuda(), start, end)
    assert same_bytes(got[written.cuda()], want[written])


@pytest.mark.cuda
@pytest.mark.parametrize("T,K,E,ranks,rank,H", GPU_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("mode", ["per_tensor", "per_token"])
def test_pre_reorder_cuda_quant_matches_cpu_bytes(T, K, E, ranks, rank, H, dtype, mode):
    start, end = rank_range(E, ranks, rank)
    ids = random_topk_ids(T, K, E)
    src2dst, _, _ = make_src2dst(ids, E, start, end, "global")
    x = random_input(T, H, dtype)
    scale = random_scale(x, mode)
    want = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end, scale, FP8)
    written = written_rows(src2dst, ids, start, end)
    poison_cuda_allocator(0xFF)
    got = moe_kernels.ep_pre_reorder(x.cuda(), src2dst.cuda(), ids.cuda(), start, end, scale.cuda(), FP8)
    # Same fp32 division, saturation and round-to-nearest-even: the same bytes.
    assert same_bytes(got[written.cuda()], want[written])


@pytest.mark.cuda
def test_pre_reorder_cuda_writes_only_local_rows():
    # Every row that no local choice maps to keeps the allocator's poison: the kernel writes
    # nothing else (the rows of other ranks' experts included).
    T, K, E, H = 300, 8, 64, 136
    start, end = rank_range(E, 4, 2)
    ids = random_topk_ids(T, K, E, device="cuda")
    src2dst, _, _ = make_src2dst(ids, E, start, end, "global")
    x = random_rows(T, H, torch.bfloat16, "cuda")
    torch.cuda.empty_cache()  # no unpoisoned cached block left for the output to come from
    poison_cuda_allocator(0x55)
    out = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end)
    written = written_rows(src2dst, ids, start, end)
    untouched = out.cpu()[~written].view(torch.uint8)
    assert (untouched == 0x55).all()


@pytest.mark.cuda
@pytest.mark.parametrize("T,K,E,ranks,rank,H", GPU_CASES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights_fp32", [True, False])
def test_post_reorder_cuda_matches_cpu(T, K, E, ranks, rank, H, dtype, weights_fp32):
    start, end = rank_range(E, ranks, rank)
    ids = random_topk_ids(T, K, E, torch.int64 if weights_fp32 else torch.int32)
    src2dst, _, _ = make_src2dst(ids, E, start, end, "local" if weights_fp32 else "global")
    down = random_rows(T * K, H, dtype)
    w = torch.rand(T, K, dtype=torch.float32 if weights_fp32 else dtype)
    want = moe_kernels.ep_post_reorder(down, src2dst, ids, w, start, end)
    poison_cuda_allocator(0xFF)
    got = moe_kernels.ep_post_reorder(down.cuda(), src2dst.cuda(), ids.cuda(), w.cuda(), start, end)
    # Same fma order in fp32 on both sides: equal up to one rounding of the output dtype.
    if dtype == torch.float32:
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    else:
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=8e-3, atol=1e-5)
    assert not got.isnan().any()


@pytest.mark.cuda
def test_cuda_skips_bad_rows_and_ids():
    x = torch.randn(3, 8, device="cuda")
    ids = torch.tensor([[0, -1], [99, 3], [2, 7]], dtype=torch.int64, device="cuda")
    src2dst = torch.tensor([[1, 0], [2, -5], [6, 1 << 30]], dtype=torch.int32, device="cuda")
    out = moe_kernels.ep_pre_reorder(x, src2dst, ids, 0, 7)
    q = moe_kernels.ep_pre_reorder(x, src2dst, ids, 0, 7, torch.tensor([0.1], device="cuda"), FP8)
    down = torch.randn(6, 8, device="cuda")
    post = moe_kernels.ep_post_reorder(down, src2dst, ids, torch.ones(3, 2, device="cuda"), 0, 7)
    torch.cuda.synchronize()
    torch.testing.assert_close(out[1], x[0], rtol=0, atol=0)
    assert same_bytes(q[1], moe_kernels.ep_pre_reorder(x.cpu(), src2dst.cpu(), ids.cpu(), 0, 7,
                                                       torch.tensor([0.1]), FP8)[1])
    torch.testing.assert_close(post[0], down[1], rtol=0, atol=0)
    assert (post[1:] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("layout", ["global", "local"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranks_sum_to_unsplit_result_cuda(ranks, layout, dtype):
    check_ranks_sum_to_unsplit("cuda", ranks, layout, dtype, T=1500, K=8, E=64, H=2056)


@pytest.mark.cuda
def test_pre_post_reorder_cuda_graph_replay():
    T, K, E, H = 200, 8, 64, 1024
    start, end = 16, 31
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = random_topk_ids(T, K, E, device="cuda")
    w = torch.rand(T, K, device="cuda")
    scale = torch.rand(T, device="cuda") + 0.01

    def layer():
        src2dst, offsets, _ = make_src2dst(ids, E, start, end, "local")
        rows = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end)
        q = moe_kernels.ep_pre_reorder(x, src2dst, ids, start, end, scale, FP8)
        # Expert stand-in: the local layout writes rows [0, offsets[-1]); the rest is unspecified.
        used = (torch.arange(rows.shape[0], device="cuda") < offsets[-1]).unsqueeze(1)
        y = torch.where(used, rows * 2, 0)
        return moe_kernels.ep_post_reorder(y, src2dst, ids, w, start, end), q, src2dst

    layer()  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, q, src2dst = layer()
    for _ in range(2):  # new inputs, copied into the captured buffers
        x.copy_(torch.randn_like(x))
        ids.copy_(random_topk_ids(T, K, E, device="cuda"))
        w.copy_(torch.rand_like(w))
        scale.copy_(torch.rand_like(scale) + 0.01)
        graph.replay()
        want_out, want_q, want_src2dst = layer()
        assert torch.equal(src2dst, want_src2dst)
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        written = written_rows(src2dst, ids, start, end).cuda()
        assert same_bytes(q[written], want_q[written])


@pytest.mark.cuda
def test_ops_run_on_the_current_stream():
    T, K, E, H = 300, 4, 32, 512
    x = torch.randn(T, H, device="cuda")
    x_new = torch.randn(T, H, device="cuda")
    ids = random_topk_ids(T, K, E, device="cuda")
    w = torch.rand(T, K, device="cuda")
    _, inv, _ = moe_kernels.moe_sort_tokens(ids, E)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # An op launched on any other stream would run before this copy and read the old x.
        torch.cuda._sleep(50_000_000)
        x.copy_(x_new)
        rows = moe_kernels.ep_pre_reorder(x, inv, ids, 0, E - 1)
        out = moe_kernels.ep_post_reorder(rows, inv, ids, w, 8, 23)
    side.synchronize()
    rows_cpu = moe_kernels.ep_pre_reorder(x_new.cpu(), inv.cpu(), ids.cpu(), 0, E - 1)
    torch.testing.assert_close(out.cpu(), moe_kernels.ep_post_reorder(rows_cpu, inv.cpu(), ids.cpu(), w.cpu(), 8, 23))
