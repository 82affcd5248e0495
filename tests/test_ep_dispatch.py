"""ep_dispatch_plan, ep_pack_records, ep_unpack_records (the packed all-to-all dispatch of
moe_kernels.modular.AllToAll): the CPU reference against plain torch formulas, CUDA against the CPU
reference (slots, counts and every defined byte exactly), the round trip pack -> unpack, the
capacity and its overflow count, opcheck, bad inputs, CUDA graphs."""

import pytest
import torch
from torch.library import opcheck

import moe_kernels

from helpers import DEVICES, poison_cuda_allocator, random_rows, random_topk_ids

FP8 = torch.float8_e4m3fn
ROW_DTYPES = [torch.bfloat16, torch.float16, torch.float32, FP8]


def rows_of(T, H, dtype, device="cpu"):
    if dtype == FP8:  # random finite e4m3 values (moved as bytes)
        return (torch.randn(T, H) * 10).to(FP8).to(device)
    return random_rows(T, H, dtype, device)


# ---------------------------------------------------------------- plain torch formulas

def wanted(ids, experts_per_rank, W):
    """[T, W] bool: one of token t's choices is an expert of rank d (ids out of range go nowhere)."""
    ids = ids.long().cpu()
    ok = (ids >= 0) & (ids < W * experts_per_rank)
    dest = torch.where(ok, ids // experts_per_rank, W)
    m = torch.zeros(ids.shape[0], W + 1, dtype=torch.bool)
    m.scatter_(1, dest, True)
    return m[:, :W]


def plan_formula(ids, experts_per_rank, W, capacity):
    """(slots, counts, dropped): rank by rank, tokens in order; segment starts at the prefix sum of
    the counts or at d * capacity; records past the capacity get -1."""
    want = wanted(ids, experts_per_rank, W)
    counts = want.sum(0).to(torch.int32)
    index = want.long().cumsum(0) - 1                     # [T, W] index among rank d's tokens
    first = torch.cat([torch.zeros(1, dtype=torch.long), counts.long().cumsum(0)[:-1]]) if capacity < 0 \
        else torch.arange(W) * capacity
    keep = want & ((index < capacity) if capacity >= 0 else True)
    slots = torch.where(keep, first + index, -1).to(torch.int32)
    dropped = (counts - capacity).clamp(min=0).sum() if capacity >= 0 else torch.tensor(0)
    return slots, counts, dropped.to(torch.int32).reshape(1)


def record_bytes_formula(H, dtype, G, K):
    row = H * torch.empty((), dtype=dtype).element_size()
    return -(-(-(-row // 16) * 16 + 4 * (G + 2 * K)) // 16) * 16


def unpack_formula(records, H, dtype, G, K):
    """Splits records by the documented layout with views (no kernel)."""
    row = H * torch.empty((), dtype=dtype).element_size()
    meta = -(-row // 16) * 16
    r = records.cpu()
    x = r[:, :row].contiguous().view(dtype)
    words = r[:, meta:meta + 4 * (G + 2 * K)].contiguous()
    return (x, words[:, :4 * G].contiguous().view(torch.float32),
            words[:, 4 * G:4 * (G + K)].contiguous().view(torch.float32),
            words[:, 4 * (G + K):].contiguous().view(torch.int32))


def make_problem(T, K, W, epr, G, dtype, ids_dtype=torch.int32, device="cpu"):
    H = 40 if G == 0 else 32 * max(G, 1)
    x = rows_of(T, H, dtype, device)
    ids = random_topk_ids(T, K, W * epr, ids_dtype, device)
    w = torch.rand(T, K, device=device)
    scales = None if G == 0 else (torch.rand(T, device=device) + 0.5 if G == 1 else torch.rand(T, G, device=device))
    return x, scales, w, ids


# ---------------------------------------------------------------- plan

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 1, 7, 1000, 2500])
@pytest.mark.parametrize("W,epr,K", [(2, 4, 2), (4, 2, 3), (8, 32, 8), (64, 1, 8)])
@pytest.mark.parametrize("capacity", [-1, 0, 3, 700])
def test_plan_matches_formula(device, T, W, epr, K, capacity):
    ids = random_topk_ids(T, K, W * epr, device=device)
    if T > 3:
        ids[1, 0] = -1  # a padded choice goes nowhere
    slots, counts, dropped = moe_kernels.ep_dispatch_plan(ids, epr, W, capacity)
    want = plan_formula(ids, epr, W, capacity)
    for got, exp in zip((slots, counts, dropped), want):
        torch.testing.assert_close(got.cpu(), exp, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_plan_int64_ids_and_all_tokens_to_one_rank(device):
    T, K, W, epr = 300, 4, 4, 8
    ids = random_topk_ids(T, K, epr, torch.int64, device) + 2 * epr  # every choice on rank 2
    slots, counts, dropped = moe_kernels.ep_dispatch_plan(ids, epr, W, -1)
    assert counts.tolist() == [0, 0, T, 0] and dropped.item() == 0
    assert slots[:, 2].tolist() == list(range(T)) and (slots[:, [0, 1, 3]] == -1).all()
    slots, counts, dropped = moe_kernels.ep_dispatch_plan(ids, epr, W, 100)
    assert dropped.item() == T - 100 and slots[:, 2].tolist() == list(range(200, 300)) + [-1] * (T - 100)


# ---------------------------------------------------------------- pack / unpack

def check_records(records, x, scales, w, ids, slots, counts, epr, capacity):
    """Every defined byte of the records against the formula: filled records carry their token's
    row and metadata; with a capacity, unfilled ones carry scale 1, weight 0, an id of another rank."""
    T, H = x.shape
    K, W = ids.shape[1], slots.shape[1]
    G = 0 if scales is None else (1 if scales.dim() == 1 else scales.shape[1])
    assert records.shape == (records.shape[0], moe_kernels.ep_record_bytes(H, x.dtype, G, K))
    assert records.shape[1] == record_bytes_formula(H, x.dtype, G, K) and records.shape[1] % 16 == 0
    rx, rs, rw, rids = unpack_formula(records, H, x.dtype, G, K)
    slots, counts = slots.cpu(), counts.cpu()
    t, d = (slots >= 0).nonzero(as_tuple=True)
    r = slots[t, d].long()
    assert torch.equal(rx[r].view(torch.uint8), x.cpu()[t].view(torch.uint8))
    assert torch.equal(rw[r], w.cpu()[t]) and torch.equal(rids[r], ids.cpu()[t].to(torch.int32))
    if G:
        assert torch.equal(rs[r], scales.cpu().reshape(T, G)[t])
    if capacity >= 0:
        rec = torch.arange(records.shape[0])
        dest = rec // max(capacity, 1)
        empty = rec % max(capacity, 1) >= counts.long()[dest]
        assert int(empty.sum()) == (capacity - counts.long().clamp(max=capacity)).sum()
        assert (rw[empty] == 0).all() and (rs[empty] == 1).all()
        assert (rids[empty] == (((dest[empty] + 1) % W) * epr).unsqueeze(1)).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("G", [0, 1, 3])
@pytest.mark.parametrize("T,W,epr,K", [(0, 2, 4, 2), (1, 2, 4, 2), (37, 4, 2, 3), (300, 8, 4, 8)])
@pytest.mark.parametrize("capacity", [-1, 5, 400])
def test_pack_writes_records_of_the_layout(device, dtype, G, T, W, epr, K, capacity):
    poison_cuda_allocator(0xFF)
    x, scales, w, ids = make_problem(T, K, W, epr, G, dtype, device=device)
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, W, capacity)
    n = int(counts.sum()) if capacity < 0 else W * capacity
    records = moe_kernels.ep_pack_records(x, scales, w, ids, slots, counts, n, epr, capacity)
    assert records.device.type == device
    check_records(records, x, scales, w, ids, slots, counts, epr, capacity)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("G", [0, 1, 4])
def test_unpack_inverts_pack(device, dtype, G):
    T, W, epr, K = 53, 4, 3, 5
    x, scales, w, ids = make_problem(T, K, W, epr, G, dtype, torch.int64, device)
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, W)
    records = moe_kernels.ep_pack_records(x, scales, w, ids, slots, counts, int(counts.sum()), epr)
    poison_cuda_allocator(0xFF)
    ux, us, uw, uids = moe_kernels.ep_unpack_records(records, x.shape[1], dtype, G, K)
    for got, exp in zip((ux, us, uw, uids), unpack_formula(records, x.shape[1], dtype, G, K)):
        assert got.is_contiguous() and got.dtype == exp.dtype and got.shape == exp.shape
        assert torch.equal(got.cpu().view(torch.uint8), exp.view(torch.uint8))
    # Record order: rank by rank, tokens in order inside a rank.
    t, d = (slots.cpu() >= 0).nonzero(as_tuple=True)
    order = torch.argsort(d * T + t)
    assert torch.equal(ux.cpu().view(torch.uint8), x.cpu()[t[order]].view(torch.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ROW_DTYPES)
@pytest.mark.parametrize("H", [7168, 2056, 13])
@pytest.mark.parametrize("capacity", [-1, 64, 3000])
def test_cuda_matches_cpu_reference(dtype, H, capacity):
    T, W, epr, K, G = 2048, 8, 32, 8, 7
    x = rows_of(T, H, dtype)
    ids = random_topk_ids(T, K, W * epr)
    w, scales = torch.rand(T, K), torch.rand(T, G)
    plan_cpu = moe_kernels.ep_dispatch_plan(ids, epr, W, capacity)
    plan_gpu = moe_kernels.ep_dispatch_plan(ids.cuda(), epr, W, capacity)
    for a, b in zip(plan_cpu, plan_gpu):
        assert torch.equal(a, b.cpu())
    slots, counts, _ = plan_gpu
    n = int(counts.sum()) if capacity < 0 else W * capacity
    poison_cuda_allocator(0xFF)
    records = moe_kernels.ep_pack_records(x.cuda(), scales.cuda(), w.cuda(), ids.cuda(), slots, counts, n, epr,
                                          capacity)
    check_records(records, x, scales, w, ids, slots, counts, epr, capacity)
    filled = moe_kernels.ep_unpack_records(records, H, dtype, G, K)
    for got, exp in zip(filled, unpack_formula(records, H, dtype, G, K)):
        assert torch.equal(got.cpu().view(torch.uint8), exp.view(torch.uint8))


@pytest.mark.cuda
def test_cuda_graph_capture():
    T, W, epr, K, H, cap = 256, 4, 8, 8, 512, 200
    x, scales, w, ids = make_problem(T, K, W, epr, 1, FP8, device="cuda")
    x = rows_of(T, H, FP8, "cuda")

    def step():
        slots, counts, dropped = moe_kernels.ep_dispatch_plan(ids, epr, W, cap)
        rec = moe_kernels.ep_pack_records(x, scales, w, ids, slots, counts, W * cap, epr, cap)
        return moe_kernels.ep_unpack_records(rec, H, FP8, 1, K), slots, dropped

    eager = step()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = step()
    ids.copy_(random_topk_ids(T, K, W * epr, device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    slots, _, dropped = plan_formula(ids, epr, W, cap)
    assert torch.equal(captured[1].cpu(), slots) and captured[2].item() == dropped.item()
    assert not torch.equal(captured[1], eager[1])


# ---------------------------------------------------------------- opcheck, bad inputs

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    T, W, epr, K = 9, 2, 4, 2
    x, scales, w, ids = make_problem(T, K, W, epr, 1, torch.bfloat16, device=device)
    opcheck(torch.ops.moe_kernels.ep_dispatch_plan.default, (ids, epr, W, -1))
    opcheck(torch.ops.moe_kernels.ep_dispatch_plan.default, (ids, epr, W, 3))
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, W)
    n = int(counts.sum())
    # Variable splits: every record is written, so the bytes are deterministic (as opcheck compares)
    # except the padding; an fp32 row of 32 elements with G=4, K=2 (8 metadata words) leaves none.
    x32 = rows_of(T, 32, torch.float32, device)
    assert moe_kernels.ep_record_bytes(32, torch.float32, 4, K) == 128 + 32
    scales4 = torch.rand(T, 4, device=device)
    opcheck(torch.ops.moe_kernels.ep_pack_records.default, (x32, scales4, w, ids, slots, counts, n, epr, -1))
    records = moe_kernels.ep_pack_records(x32, scales4, w, ids, slots, counts, n, epr)
    opcheck(torch.ops.moe_kernels.ep_unpack_records.default, (records, 32, torch.float32, 4, K))


def test_bad_inputs_raise_clear_errors():
    T, W, epr, K = 6, 2, 4, 2
    x, scales, w, ids = make_problem(T, K, W, epr, 1, torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"ep_dispatch_plan: world_size must be in \[1, 64\], got 65"):
        moe_kernels.ep_dispatch_plan(ids, epr, 65)
    with pytest.raises(RuntimeError, match="ep_dispatch_plan: capacity must be -1"):
        moe_kernels.ep_dispatch_plan(ids, epr, W, -2)
    with pytest.raises(RuntimeError, match="ep_dispatch_plan: topk_ids must be int32 or int64, got Float"):
        moe_kernels.ep_dispatch_plan(ids.float(), epr, W)
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, W, 4)
    with pytest.raises(RuntimeError, match=r"ep_pack_records: with a capacity, num_records must be W \* capacity = 8"):
        moe_kernels.ep_pack_records(x, scales, w, ids, slots, counts, 7, epr, 4)
    with pytest.raises(RuntimeError, match="ep_pack_records: topk_weights must be float32"):
        moe_kernels.ep_pack_records(x, scales, w.half(), ids, slots, counts, 8, epr, 4)
    with pytest.raises(RuntimeError, match=r"ep_pack_records: scales must be \[T\] or \[T, G\]"):
        moe_kernels.ep_pack_records(x, scales[:3], w, ids, slots, counts, 8, epr, 4)
    records = moe_kernels.ep_pack_records(x, scales, w, ids, slots, counts, 8, epr, 4)
    with pytest.raises(RuntimeError, match=r"ep_unpack_records: records must be \[N, \d+\]"):
        moe_kernels.ep_unpack_records(records, x.shape[1], torch.bfloat16, 8, K)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_are_named(device):
    T, W, epr, K = 6, 2, 4, 2
    x, scales, w, ids = [t.to(device) for t in make_problem(T, K, W, epr, 1, torch.bfloat16)]
    with pytest.raises(RuntimeError, match="ep_dispatch_plan: topk_ids must be contiguous"):
        moe_kernels.ep_dispatch_plan(ids.t().contiguous().t(), epr, W)
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, W, 4)
    pack = moe_kernels.ep_pack_records
    with pytest.raises(RuntimeError, match="ep_pack_records: x must be contiguous"):
        pack(x.t().contiguous().t(), scales, w, ids, slots, counts, 8, epr, 4)
    with pytest.raises(RuntimeError, match="ep_pack_records: topk_weights must be contiguous"):
        pack(x, scales, w.t().contiguous().t(), ids, slots, counts, 8, epr, 4)
    with pytest.raises(RuntimeError, match="ep_pack_records: slots must be contiguous"):
        pack(x, scales, w, ids, slots.t().contiguous().t(), counts, 8, epr, 4)
    records = pack(x, scales, w, ids, slots, counts, 8, epr, 4)
    with pytest.raises(RuntimeError, match="ep_unpack_records: records must be contiguous"):
        moe_kernels.ep_unpack_records(records[:, :].t().contiguous().t(), x.shape[1], torch.bfloat16, 1, K)
    with pytest.raises(RuntimeError, match="ep_unpack_records: records must be uint8, got Float"):
        moe_kernels.ep_unpack_records(records.float(), x.shape[1], torch.bfloat16, 1, K)


@pytest.mark.cuda
def test_inputs_on_another_device_are_named():
    T, W, epr, K = 6, 2, 4, 2
    x, scales, w, ids = [t.cuda() for t in make_problem(T, K, W, epr, 1, torch.bfloat16)]
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, epr, W, 4)
    pack = moe_kernels.ep_pack_records
    with pytest.raises(RuntimeError, match="ep_pack_records: topk_ids must be on cuda:0, got cpu"):
        pack(x, scales, w, ids.cpu(), slots, counts, 8, epr, 4)
    with pytest.raises(RuntimeError, match="ep_pack_records: scales must be on cuda:0, got cpu"):
        pack(x, scales.cpu(), w, ids, slots, counts, 8, epr, 4)
    with pytest.raises(RuntimeError, match="ep_pack_records: counts must be on cuda:0, got cpu"):
        pack(x, scales, w, ids, slots, counts.cpu(), 8, epr, 4)
