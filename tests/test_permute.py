"""moe_sort_tokens, moe_permute, moe_unpermute, compute_problem_sizes: CPU reference against plain
torch formulas, CUDA against the CPU reference, opcheck, bad inputs, CUDA graphs."""

import pytest
import torch
from torch.library import opcheck

import moe_kernels
from moe_kernels.ops.permute import permuted_rows

from helpers import DEVICES, poison_cuda_allocator, random_expert_map, random_rows, random_topk_ids

FP8 = torch.float8_e4m3fn


# ---------------------------------------------------------------- plain torch formulas (the spec)

def formula_sort(topk_ids, E, expert_map=None, E_local=None, align=0):
    """Stable sort of the flat choices by local expert, written with torch primitives."""
    T, K = topk_ids.shape
    E_local = E if expert_map is None else E_local
    flat = topk_ids.reshape(-1).long().cpu()
    local = flat if expert_map is None else expert_map.cpu().long()[flat]
    counts = torch.bincount(local[local >= 0], minlength=E_local)
    sizes = counts if align == 0 else (counts + align - 1) // align * align
    offsets = torch.zeros(E_local + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(sizes, 0)
    M = permuted_rows(T, K, E_local, align)
    inv = torch.full((T * K,), -1, dtype=torch.int32)
    perm = torch.full((M,), -1, dtype=torch.int32)
    key = torch.where(local >= 0, local, E_local)  # dropped choices sort last
    order = torch.sort(key, stable=True).indices
    for e in range(E_local):
        members = order[(key[order] == e)]
        rows = offsets[e] + torch.arange(members.numel())
        inv[members] = rows.int()
        perm[rows] = members.int()
    return offsets, inv.view(T, K), perm


def formula_unpermute(permuted, weights, inv):
    """out[t] = sum_k w[t,k] * permuted[inv[t,k]] over kept k, in float64."""
    T, K = inv.shape
    x = permuted.double().cpu()
    w = weights.double().cpu()
    idx = inv.long().cpu()
    rows = x[idx.clamp(min=0)]                      # [T, K, H]
    mask = (idx >= 0).unsqueeze(-1)
    return (rows * w.unsqueeze(-1) * mask).sum(1)


def check_permuted_rows(permuted, hidden, offsets, perm, K):
    """Every used row holds its source token's row; alignment padding rows are zero."""
    used = int(offsets[-1])
    p = perm[:used].long().cpu()
    got = permuted[:used].cpu().view(torch.uint8)
    src = hidden.cpu().view(torch.uint8)
    real = p >= 0
    assert torch.equal(got[real], src[p[real] // K])
    assert (got[~real] == 0).all()


# ---------------------------------------------------------------- CPU reference semantics

CASES = [  # (T, K, E, E_local or None, align)
    (0, 2, 8, None, 0),
    (1, 2, 8, None, 0),
    (7, 2, 8, None, 0),
    (64, 8, 128, None, 0),
    (1000, 8, 256, None, 0),
    (64, 8, 128, None, 16),
    (7, 4, 16, 5, 0),         # expert map with -1 entries
    (100, 8, 64, 8, 64),      # expert map and alignment
    (0, 8, 64, 8, 64),        # T = 0 with alignment: all rows padding
    (1, 6, 160, None, 128),
]


@pytest.mark.parametrize("T,K,E,E_local,align", CASES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_sort_tokens_matches_formula(T, K, E, E_local, align, id_dtype):
    ids = random_topk_ids(T, K, E, id_dtype)
    emap = random_expert_map(E, E_local) if E_local else None
    got = moe_kernels.moe_sort_tokens(ids, E, emap, E_local or -1, align)
    want = formula_sort(ids, E, emap, E_local, align)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_sort_tokens_all_on_one_expert_and_empty_experts():
    T, K, E = 50, 1, 8
    ids = torch.full((T, K), 3, dtype=torch.int32)
    offsets, inv, perm = moe_kernels.moe_sort_tokens(ids, E)
    assert offsets.tolist() == [0, 0, 0, 0, 50, 50, 50, 50, 50]
    assert inv.view(-1).tolist() == list(range(50))     # stable: token order kept
    assert perm.tolist() == list(range(50))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, FP8])
@pytest.mark.parametrize("T,K,E,E_local,align,H", [
    (7, 2, 8, None, 0, 2056), (33, 4, 16, 6, 8, 7), (0, 2, 8, None, 0, 128), (64, 8, 64, None, 16, 130)])
def test_permute_moves_rows(dtype, T, K, E, E_local, align, H):
    x = random_rows(T, H, dtype)
    ids = random_topk_ids(T, K, E)
    emap = random_expert_map(E, E_local) if E_local else None
    permuted, offsets, inv, perm = moe_kernels.moe_permute(x, ids, E, emap, E_local or -1, align)
    assert permuted.shape == (permuted_rows(T, K, E_local or E, align), H) and permuted.dtype == dtype
    want = formula_sort(ids, E, emap, E_local, align)
    assert torch.equal(offsets, want[0]) and torch.equal(inv, want[1]) and torch.equal(perm, want[2])
    check_permuted_rows(permuted, x, offsets, perm, K)


def random_scales(T, G, device="cpu"):
    """Fresh positive scales, [T] when G is None (per token), else [T, G]."""
    shape = (T,) if G is None else (T, G)
    return (torch.rand(shape) + 0.01).to(device)


def check_permuted_scales(permuted_scales, scales, offsets, perm, K):
    """Row r's scales are those of its source token, exactly; alignment padding rows get zeros."""
    used = int(offsets[-1])
    G = 1 if scales.dim() == 1 else scales.shape[1]
    assert permuted_scales.shape == (perm.shape[0], G) and permuted_scales.dtype == torch.float32
    p = perm[:used].long().cpu()
    got = permuted_scales[:used].cpu()
    src = scales.cpu().reshape(-1, G)
    real = p >= 0
    assert torch.equal(got[real], src[p[real] // K])
    assert (got[~real] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("G", [None, 1, 56, 3])  # None: [T] per token; 1: [T, 1]; 56: DeepSeek-V3's H/128
@pytest.mark.parametrize("T,K,E,E_local,align", CASES)
def test_permute_moves_scales_with_rows(dtype, G, T, K, E, E_local, align):
    H = 256
    x = random_rows(T, H, dtype)
    ids = random_topk_ids(T, K, E)
    emap = random_expert_map(E, E_local) if E_local else None
    scales = random_scales(T, G)
    permuted, offsets, inv, perm, permuted_scales = moe_kernels.moe_permute(x, ids, E, emap, E_local or -1, align,
                                                                            scales)
    # The rows and the routing are those of the call without scales.
    want = moe_kernels.moe_permute(x, ids, E, emap, E_local or -1, align)
    for g, w in zip((offsets, inv, perm), want[1:]):
        assert torch.equal(g, w)
    check_permuted_rows(permuted, x, offsets, perm, K)
    check_permuted_scales(permuted_scales, scales, offsets, perm, K)


def test_permute_returns_four_tensors_without_scales_and_the_op_five():
    x, ids = random_rows(5, 16, torch.bfloat16), random_topk_ids(5, 2, 8)
    assert len(moe_kernels.moe_permute(x, ids, 8)) == 4
    assert len(moe_kernels.moe_permute(x, ids, 8, scales=torch.rand(5))) == 5
    out = torch.ops.moe_kernels.moe_permute(x, ids, 8)
    assert len(out) == 5 and out[4].shape == (0,) and out[4].dtype == torch.float32


def test_permute_scales_follow_quantized_rows():
    # Dequantizing the permuted fp8 rows with the permuted group scales gives the permuted
    # dequantized input: scales and rows travel together.
    T, K, E, H = 37, 4, 16, 512
    x = torch.randn(T, H).bfloat16()
    q, s = moe_kernels.per_token_group_quant_fp8(x, 128)
    ids = random_topk_ids(T, K, E)
    permuted, offsets, _, perm, ps = moe_kernels.moe_permute(q, ids, E, scales=s)
    deq = q.float() * s.repeat_interleave(128, dim=1)
    got = permuted.float() * ps.repeat_interleave(128, dim=1)
    assert torch.equal(got, deq[perm.long() // K])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weights_fp32", [True, False])
@pytest.mark.parametrize("T,K,E,E_local,H", [(1, 2, 8, None, 64), (37, 8, 64, 20, 2056), (0, 4, 8, None, 16),
                                             (16, 4, 16, None, 7)])
def test_unpermute_matches_formula(dtype, weights_fp32, T, K, E, E_local, H):
    x = random_rows(T, H, dtype)
    ids = random_topk_ids(T, K, E)
    emap = random_expert_map(E, E_local) if E_local else None
    permuted, _, inv, _ = moe_kernels.moe_permute(x, ids, E, emap, E_local or -1)
    w = torch.rand(T, K, dtype=torch.float32 if weights_fp32 else dtype)
    out = moe_kernels.moe_unpermute(permuted, w, inv)
    want = formula_unpermute(permuted, w, inv)
    # fp32 accumulation, one rounding to the output dtype: within that dtype's half-ulp (plus fp32 sums).
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    if E_local:  # tokens with no local choice get zeros
        none_kept = (inv < 0).all(dim=1)
        assert (out[none_kept] == 0).all()


def test_unpermute_skips_dropped_rows():
    permuted = torch.randn(4, 8)
    inv = torch.tensor([[0, -1], [-1, -1], [3, 1]], dtype=torch.int32)
    w = torch.tensor([[0.5, 9.0], [9.0, 9.0], [0.25, 2.0]])
    out = moe_kernels.moe_unpermute(permuted, w, inv)
    torch.testing.assert_close(out[0], 0.5 * permuted[0])
    assert (out[1] == 0).all()
    torch.testing.assert_close(out[2], 0.25 * permuted[3] + 2.0 * permuted[1])


@pytest.mark.parametrize("swap_ab", [False, True])
def test_problem_sizes(swap_ab):
    offsets = torch.tensor([0, 5, 5, 12, 40], dtype=torch.int64)
    ps1, ps2 = moe_kernels.compute_problem_sizes(offsets, 96, 64, swap_ab)
    m = [5, 0, 7, 28]
    if swap_ab:
        assert ps1.tolist() == [[192, x, 64] for x in m] and ps2.tolist() == [[64, x, 96] for x in m]
    else:
        assert ps1.tolist() == [[x, 192, 64] for x in m] and ps2.tolist() == [[x, 64, 96] for x in m]
    assert ps1.dtype == torch.int32


# ---------------------------------------------------------------- opcheck (fake kernels, schemas)

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    T, K, E, H = 9, 2, 8, 24
    x = random_rows(T, H, torch.bfloat16, device)
    ids = random_topk_ids(T, K, E, device=device)
    emap = random_expert_map(E, 3, device)
    opcheck(torch.ops.moe_kernels.moe_sort_tokens.default, (ids, E, emap, 3, 4))
    opcheck(torch.ops.moe_kernels.moe_permute.default, (x, ids, E, None, -1, 0))
    # Every row used (no expert_map, no alignment): rows past expert_offsets[-1] are unwritten,
    # which opcheck's eager-vs-traced comparison would see as a difference.
    for scales in (torch.rand(T, device=device), torch.rand(T, 3, device=device)):
        opcheck(torch.ops.moe_kernels.moe_permute.default, (x, ids, E, None, -1, 0, scales))
    permuted, offsets, inv, _ = moe_kernels.moe_permute(x, ids, E)
    w = torch.rand(T, K, device=device)
    opcheck(torch.ops.moe_kernels.moe_unpermute.default, (permuted, w, inv))
    opcheck(torch.ops.moe_kernels.compute_problem_sizes.default, (offsets, 32, 16, False))


def test_torch_compile_traces_ops():
    def layer(x, ids, w):
        permuted, _, inv, _ = moe_kernels.moe_permute(x, ids, 8)
        return moe_kernels.moe_unpermute(permuted * 2, w, inv)

    x, ids, w = torch.randn(5, 16), random_topk_ids(5, 2, 8), torch.rand(5, 2)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, ids, w), layer(x, ids, w))


# ---------------------------------------------------------------- bad inputs

BAD_SORT = [
    (dict(topk_ids=torch.zeros(4, dtype=torch.int32)), "topk_ids must be 2-D"),
    (dict(topk_ids=torch.zeros(4, 2)), "topk_ids must be int32 or int64, got Float"),
    (dict(topk_ids="strided"), "topk_ids must be contiguous"),
    (dict(num_experts=0), "num_experts must be positive"),
    (dict(expert_map=torch.zeros(8, dtype=torch.int32)), "num_local_experts must be in"),
    (dict(expert_map=torch.zeros(7, dtype=torch.int32), num_local_experts=2), r"expert_map must have shape \[8\]"),
    (dict(expert_map=torch.zeros(8, dtype=torch.int64), num_local_experts=2), "expert_map must be int32"),
    (dict(num_local_experts=4), "without expert_map, num_local_experts must be -1"),
    (dict(align_block_size=-1), "align_block_size must be >= 0"),
    (dict(topk_ids=torch.zeros(2, 65, dtype=torch.int32)), "1 to 64 columns"),
    (dict(num_experts=2000, topk_ids=torch.zeros(2, 2, dtype=torch.int32)), "at most 1024 local experts"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("override,message", BAD_SORT)
def test_sort_tokens_rejects_bad_arguments(device, override, message):
    args = dict(topk_ids=torch.zeros(4, 2, dtype=torch.int32), num_experts=8, expert_map=None,
                num_local_experts=-1, align_block_size=0)
    args.update(override)
    if isinstance(args["topk_ids"], str):  # made on the device: .to() would make it contiguous
        args["topk_ids"] = torch.zeros(4, 4, dtype=torch.int32, device=device)[:, ::2]
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=message):
        moe_kernels.moe_sort_tokens(**args)


def test_sort_tokens_cpu_rejects_ids_out_of_range():
    with pytest.raises(RuntimeError, match=r"topk_ids holds 8, outside \[0, num_experts=8\)"):
        moe_kernels.moe_sort_tokens(torch.tensor([[1, 8]], dtype=torch.int32), 8)
    emap = torch.tensor([0, 5, -1, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"expert_map\[1\] = 5"):
        moe_kernels.moe_sort_tokens(torch.tensor([[1, 0]], dtype=torch.int32), 4, emap, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_permute_rejects_bad_hidden_states(device):
    ids = torch.zeros(4, 2, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match="hidden_states must be bfloat16, float16, float32 or float8_e4m3fn, got Long"):
        moe_kernels.moe_permute(torch.zeros(4, 8, dtype=torch.int64, device=device), ids, 8)
    with pytest.raises(RuntimeError, match=r"hidden_states has 5 rows but topk_ids has 4"):
        moe_kernels.moe_permute(torch.zeros(5, 8, device=device), ids, 8)
    with pytest.raises(RuntimeError, match="hidden_states must be 2-D"):
        moe_kernels.moe_permute(torch.zeros(4, device=device), ids, 8)
    with pytest.raises(RuntimeError, match="hidden_states must be contiguous"):
        moe_kernels.moe_permute(torch.zeros(8, 4, device=device).t(), ids, 8)


BAD_SCALES = [
    (torch.rand(4, 2, dtype=torch.float64), "scales must be float32, got Double"),
    (torch.rand(5), r"scales must be \[T\] or \[T, 1\] \(per token\) or \[T, G\] \(per group\), T=4, got shape \[5\]"),
    (torch.rand(4, 2, 1), r"scales must be \[T\] or \[T, 1\].*got shape \[4, 2, 1\]"),
    (torch.rand(4, 0), r"scales must be \[T\] .*got shape \[4, 0\]"),
    ("strided", r"scales must be contiguous \(row-major \[T, G\]\)"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scales,message", BAD_SCALES)
def test_permute_rejects_bad_scales(device, scales, message):
    x, ids = torch.zeros(4, 8, device=device), torch.zeros(4, 2, dtype=torch.int32, device=device)
    scales = torch.rand(2, 4, device=device).t() if isinstance(scales, str) else scales.to(device)
    with pytest.raises(RuntimeError, match=f"moe_permute: {message}"):
        moe_kernels.moe_permute(x, ids, 8, scales=scales)


@pytest.mark.cuda
def test_permute_rejects_scales_on_another_device():
    x, ids = torch.zeros(4, 8, device="cuda"), torch.zeros(4, 2, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match=r"moe_permute: scales must be on cuda:0 \(as hidden_states\), got cpu"):
        moe_kernels.moe_permute(x, ids, 8, scales=torch.rand(4))


@pytest.mark.parametrize("device", DEVICES)
def test_unpermute_rejects_bad_arguments(device):
    p = torch.zeros(8, 16, device=device)
    inv = torch.zeros(4, 2, dtype=torch.int32, device=device)
    w = torch.zeros(4, 2, device=device)
    with pytest.raises(RuntimeError, match="inv_permuted_idx must be int32, got Long"):
        moe_kernels.moe_unpermute(p, w, inv.long())
    with pytest.raises(RuntimeError, match=r"topk_weights must have shape \[4, 2\]"):
        moe_kernels.moe_unpermute(p, w[:3], inv)
    with pytest.raises(RuntimeError, match="topk_weights must be float32 or BFloat16"):
        moe_kernels.moe_unpermute(p.bfloat16(), w.half(), inv)
    with pytest.raises(RuntimeError, match="permuted must be bfloat16, float16 or float32"):
        moe_kernels.moe_unpermute(p.to(FP8), w, inv)
    with pytest.raises(RuntimeError, match="permuted must be 2-D"):
        moe_kernels.moe_unpermute(p[0], w, inv)


@pytest.mark.parametrize("device", DEVICES)
def test_problem_sizes_rejects_bad_arguments(device):
    with pytest.raises(RuntimeError, match="expert_offsets must be int64, got Int"):
        moe_kernels.compute_problem_sizes(torch.zeros(3, dtype=torch.int32, device=device), 8, 8)
    with pytest.raises(RuntimeError, match="n must be positive"):
        moe_kernels.compute_problem_sizes(torch.zeros(3, dtype=torch.int64, device=device), 0, 8)


# ---------------------------------------------------------------- CUDA against the CPU reference

GPU_CASES = CASES + [(4096, 8, 256, None, 0), (16384, 8, 128, 32, 0), (3000, 8, 512, None, 128),
                     (20000, 1, 8, None, 0), (513, 8, 1024, None, 0)]


@pytest.mark.cuda
@pytest.mark.parametrize("T,K,E,E_local,align", GPU_CASES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("poison", [0xFF, 0x55])
def test_sort_tokens_cuda_matches_cpu(T, K, E, E_local, align, id_dtype, poison):
    ids = random_topk_ids(T, K, E, id_dtype)
    emap = random_expert_map(E, E_local) if E_local else None
    want = moe_kernels.moe_sort_tokens(ids, E, emap, E_local or -1, align)
    poison_cuda_allocator(poison)
    got = moe_kernels.moe_sort_tokens(ids.cuda(), E, emap.cuda() if emap is not None else None, E_local or -1, align)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.cuda
def test_sort_tokens_cuda_all_on_one_expert():
    ids = torch.full((5000, 8), 7, dtype=torch.int64)
    ids[:, 1:] = torch.arange(1, 8) + 8  # still distinct per token: expert 7 gets every token once
    want = moe_kernels.moe_sort_tokens(ids, 64)
    got = moe_kernels.moe_sort_tokens(ids.cuda(), 64)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.cuda
def test_sort_tokens_cuda_drops_bad_ids_without_writing_out_of_bounds():
    ids = torch.tensor([[0, 9], [-3, 2], [1, 1 << 30]], dtype=torch.int64, device="cuda")
    offsets, inv, perm = moe_kernels.moe_sort_tokens(ids, 8)
    torch.cuda.synchronize()
    assert inv.cpu().tolist() == [[0, -1], [-1, 2], [1, -1]]
    assert offsets[-1].item() == 3
    assert perm.cpu().tolist() == [0, 4, 3, -1, -1, -1]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, FP8])
@pytest.mark.parametrize("T,K,E,E_local,align,H", [
    (1, 2, 8, None, 0, 4096), (7, 2, 8, None, 0, 2056), (33, 4, 16, 6, 8, 7), (0, 2, 8, None, 0, 128),
    (1000, 8, 128, None, 0, 2055), (257, 8, 64, 16, 64, 1024), (64, 8, 256, None, 0, 7168)])
def test_permute_cuda_matches_cpu(dtype, T, K, E, E_local, align, H):
    x = random_rows(T, H, dtype)
    ids = random_topk_ids(T, K, E)
    emap = random_expert_map(E, E_local) if E_local else None
    want = moe_kernels.moe_permute(x, ids, E, emap, E_local or -1, align)
    poison_cuda_allocator(0xFF)
    got = moe_kernels.moe_permute(x.cuda(), ids.cuda(), E, emap.cuda() if emap is not None else None,
                                  E_local or -1, align)
    for g, w in zip(got[1:], want[1:]):
        assert torch.equal(g.cpu(), w)
    used = int(want[1][-1])
    assert torch.equal(got[0][:used].cpu().view(torch.uint8), want[0][:used].view(torch.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("G", [None, 1, 56, 130])  # 130 scales: more than a block's 128 threads
@pytest.mark.parametrize("T,K,E,E_local,align,H", [
    (1, 2, 8, None, 0, 7168), (7, 2, 8, None, 0, 2056), (33, 4, 16, 6, 8, 7), (0, 2, 8, None, 0, 128),
    (0, 8, 64, 8, 64, 128), (1000, 8, 128, None, 0, 7168), (257, 8, 64, 16, 64, 1024), (64, 8, 256, None, 0, 0)])
def test_permute_scales_cuda_matches_cpu(G, T, K, E, E_local, align, H):
    x = random_rows(T, H, torch.float32).to(FP8)
    ids = random_topk_ids(T, K, E)
    emap = random_expert_map(E, E_local) if E_local else None
    scales = random_scales(T, G)
    want = moe_kernels.moe_permute(x, ids, E, emap, E_local or -1, align, scales)
    poison_cuda_allocator(0xFF)
    got = moe_kernels.moe_permute(x.cuda(), ids.cuda(), E, emap.cuda() if emap is not None else None,
                                  E_local or -1, align, scales.cuda())
    for g, w in zip(got[1:4], want[1:4]):
        assert torch.equal(g.cpu(), w)
    used = int(want[1][-1])
    assert torch.equal(got[0][:used].cpu().view(torch.uint8), want[0][:used].view(torch.uint8))
    assert got[4].shape == want[4].shape
    assert torch.equal(got[4][:used].cpu(), want[4][:used])  # poisoned: an unwritten scale is NaN
    check_permuted_scales(got[4], scales, want[1], want[3], K)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weights_fp32", [True, False])
@pytest.mark.parametrize("T,K,E,E_local,H", [(1, 2, 8, None, 4096), (37, 8, 64, 20, 2056), (0, 4, 8, None, 16),
                                             (1000, 8, 128, None, 2055), (16, 4, 16, None, 7),
                                             (300, 8, 256, None, 7168)])
def test_unpermute_cuda_matches_cpu(dtype, weights_fp32, T, K, E, E_local, H):
    x = random_rows(T, H, dtype)
    ids = random_topk_ids(T, K, E)
    emap = random_expert_map(E, E_local) if E_local else None
    permuted, _, inv, _ = moe_kernels.moe_permute(x, ids, E, emap, E_local or -1)
    permuted = torch.randn(permuted.shape).to(dtype)  # expert outputs: fresh values
    w = torch.rand(T, K, dtype=torch.float32 if weights_fp32 else dtype)
    want = moe_kernels.moe_unpermute(permuted, w, inv)
    poison_cuda_allocator(0xFF)
    got = moe_kernels.moe_unpermute(permuted.cuda(), w.cuda(), inv.cuda())
    # Same fma order in fp32 on both sides: equal up to one rounding of the output dtype.
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6) if dtype == torch.float32 else \
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=8e-3, atol=1e-5)
    assert not got.isnan().any()


@pytest.mark.cuda
def test_unpermute_cuda_skips_out_of_range_rows():
    permuted = torch.randn(4, 8, device="cuda")
    inv = torch.tensor([[0, 4], [1 << 30, -7]], dtype=torch.int32, device="cuda")
    w = torch.ones(2, 2, device="cuda")
    out = moe_kernels.moe_unpermute(permuted, w, inv)
    torch.testing.assert_close(out[0], permuted[0])
    assert (out[1] == 0).all()


@pytest.mark.cuda
def test_problem_sizes_cuda_matches_cpu():
    offsets = torch.tensor([0, 5, 5, 12, 40, 41], dtype=torch.int64)
    for swap in (False, True):
        want = moe_kernels.compute_problem_sizes(offsets, 96, 64, swap)
        got = moe_kernels.compute_problem_sizes(offsets.cuda(), 96, 64, swap)
        assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))


@pytest.mark.cuda
def test_permute_unpermute_cuda_graph_replay():
    T, K, E, H = 200, 8, 64, 1024
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = random_topk_ids(T, K, E, device="cuda")
    w = torch.rand(T, K, device="cuda")

    def layer():
        permuted, offsets, inv, _ = moe_kernels.moe_permute(x, ids, E, None, -1, 16)
        ps1, _ = moe_kernels.compute_problem_sizes(offsets, 128, H)
        return moe_kernels.moe_unpermute(permuted[:, :].clone(), w, inv), ps1

    layer()  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, ps1 = layer()
    for _ in range(2):  # new inputs, copied into the captured buffers
        x.copy_(torch.randn_like(x))
        ids.copy_(random_topk_ids(T, K, E, device="cuda"))
        w.copy_(torch.rand_like(w))
        graph.replay()
        want_out, want_ps1 = layer()
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
        assert torch.equal(ps1, want_ps1)


@pytest.mark.cuda
def test_ops_run_on_the_current_stream():
    T, K, E, H = 300, 4, 32, 512
    x = torch.randn(T, H, device="cuda")
    x_new = torch.randn(T, H, device="cuda")
    ids = random_topk_ids(T, K, E, device="cuda")
    w = torch.rand(T, K, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # An op launched on any other stream would run before this copy and read the old x.
        torch.cuda._sleep(50_000_000)
        x.copy_(x_new)
        permuted, _, inv, _ = moe_kernels.moe_permute(x, ids, E)
        out = moe_kernels.moe_unpermute(permuted, w, inv)
    side.synchronize()
    p_cpu, _, inv_cpu, _ = moe_kernels.moe_permute(x_new.cpu(), ids.cpu(), E)
    torch.testing.assert_close(out.cpu(), moe_kernels.moe_unpermute(p_cpu, w.cpu(), inv_cpu))
