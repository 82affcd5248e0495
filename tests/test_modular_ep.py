"""The expert-parallel layer through AllToAll's packed exchange (gloo on CPU, 2 and 4 ranks):
every dispatch dtype and mode against the single-device layer with the same experts, and the
capacity overflow raising. One process group per world size runs every case (spawning is the
expensive part); the tests below read its results."""

import datetime
import os
import traceback

import pytest
import torch
import torch.distributed as dist

from moe_kernels.modular import (AllToAll, CapacityOverflowError, CutlassFp8Experts, MoELayer, SingleGpu,
                                 TorchExperts)
from moe_kernels.ops.quant import scaled_fp8_quant
from helpers import free_port, spawn_ranks

FP8 = torch.float8_e4m3fn
T, E, K, H, I = 37, 8, 2, 128, 32   # H, I multiples of 16 (the FP8 GEMMs); H = one 128-column group
WORLDS = [2, 4]


def softmax_topk(logits):
    w, ids = torch.softmax(logits.float(), dim=-1).topk(K, dim=-1)
    return w / w.sum(-1, keepdim=True), ids.to(torch.int32)


def quantize_weights(w):
    """Per-expert e4m3 weights and their scales [E] (multiplied to dequantize)."""
    scale = w.abs().amax(dim=(1, 2)) / 448.0
    return (w / scale.view(-1, 1, 1)).to(FP8), scale.float()


def experts_weights(inter=I):
    g = torch.Generator().manual_seed(0)  # every rank the same experts
    w1 = torch.randn(E, 2 * inter, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, inter, generator=g) / inter**0.5
    return w1, w2


def quantize_blocks(w):
    """e4m3 weights with one scale per 128x128 block: scales [E, N/128, K/128]."""
    En, N, Kd = w.shape
    blocks = w.view(En, N // 128, 128, Kd // 128, 128)
    scale = blocks.abs().amax(dim=(2, 4)) / 448.0
    q = (blocks / scale[:, :, None, :, None]).view(En, N, Kd).to(FP8)
    return q, scale.float()


def tokens(rank):
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own tokens
    x = (torch.randn(T, H, generator=g) * torch.rand(T, 1, generator=g).add(0.1)).to(torch.bfloat16)
    return x, torch.randn(T, E, generator=g)


def make_experts(kind, sl=slice(None)):
    """torch: TorchExperts; cutlass: CutlassFp8Experts with per-expert scales; block: with 128x128
    block scales (I = 128: every GEMM dimension a multiple of the block)."""
    w1, w2 = experts_weights(128 if kind == "block" else I)
    if kind == "torch":
        return TorchExperts(w1[sl], w2[sl])
    quantize = quantize_blocks if kind == "block" else quantize_weights
    q1, s1 = quantize(w1)
    q2, s2 = quantize(w2)
    return CutlassFp8Experts(q1[sl].contiguous(), q2[sl].contiguous(), s1[sl].contiguous(), s2[sl].contiguous())


def single_device(kind, dispatch, x, logits):
    """The reference: the same experts on one device, with the same per-token quantization (inside
    cutlass_moe_fp8 for the FP8 experts; dequantized rows for the torch experts)."""
    if kind == "torch" and dispatch == "fp8":
        q, s = scaled_fp8_quant(x, None, per_token=True)
        x = (q.float() * s).to(torch.float32)
    elif kind == "torch":
        x = x.float()
    return MoELayer(softmax_topk, SingleGpu(E), make_experts(kind))(x, logits)


CASES = [(kind, dispatch, mode) for kind in ("torch", "cutlass", "block") for dispatch in ("none", "fp8")
         for mode in ("variable", "capacity")]


def _run_case(rank, world, kind, dispatch, mode):
    x, logits = tokens(rank)
    if kind == "torch" and dispatch == "none":
        x = x.float()  # fp32 rows travel too
    local = E // world
    fp8 = dispatch == "fp8"
    pf = AllToAll(E, dispatch_dtype=FP8 if fp8 else None, capacity=T if mode == "capacity" else None,
                  quant_group_size=128 if fp8 and kind == "block" else None)
    layer = MoELayer(softmax_topk, pf, make_experts(kind, slice(rank * local, (rank + 1) * local)))
    out = layer(x, logits)
    out2 = layer(x, logits)  # a second call reuses the cached expert_map and unit weights
    assert torch.equal(out, out2)
    if mode == "capacity":
        pf.check_overflow()  # capacity = T never overflows
    return out


def _rank_main(rank, world, port, results):
    # One thread per rank: the ranks share the cores, and spinning OpenMP threads of oversubscribed
    # processes made these tiny shapes take seconds per call.
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        for case in CASES:
            try:
                results[(rank,) + case] = _run_case(rank, world, *case)
            except Exception:  # reported by the test of the case (every rank fails alike: no hang)
                results[(rank,) + case] = traceback.format_exc()
        # Overflow: capacity 2 < tokens per rank pair on every rank, so every rank raises in finalize
        # (after both exchanges, so no rank is left waiting in a collective).
        x, logits = tokens(rank)
        local = E // world
        pf = AllToAll(E, dispatch_dtype=FP8, capacity=2)
        layer = MoELayer(softmax_topk, pf, make_experts("torch", slice(rank * local, (rank + 1) * local)))
        try:
            layer(x, logits)
            results[(rank, "overflow")] = "no error"
        except CapacityOverflowError as e:
            results[(rank, "overflow")] = f"raised: {e}; dropped_records={pf.dropped_records()}"
        try:
            pf.check_overflow()
            results[(rank, "check_overflow")] = "no error"
        except CapacityOverflowError:
            results[(rank, "check_overflow")] = "raised"
    finally:
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: threads only contend (with the ranks' processes, and on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def ep_results(request):
    world = request.param
    return world, spawn_ranks(_rank_main, world)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kind,dispatch,mode", CASES)
def test_ep_layer_equals_single_device(ep_results, kind, dispatch, mode):
    world, results = ep_results
    for rank in range(world):
        got = results[(rank, kind, dispatch, mode)]
        assert not isinstance(got, str), got
        x, logits = tokens(rank)
        want = single_device(kind, dispatch, x, logits)
        # bf16 partial sums per rank, added in fp32 and rounded again: two bf16 roundings (2^-8 each)
        # against one; fp32 rows (torch experts, no fp8) only differ in summation order.
        tol = 1e-5 if (kind, dispatch) == ("torch", "none") else 1e-2
        assert got.dtype == (torch.float32 if (kind, dispatch) == ("torch", "none") else torch.bfloat16)
        assert rel_err(got, want) < tol, (rank, rel_err(got, want))


def test_capacity_overflow_raises(ep_results):
    world, results = ep_results
    for rank in range(world):
        msg = results[(rank, "overflow")]
        assert msg.startswith("raised: AllToAll: rank"), msg
        assert "capacity=2" in msg and "Raise the capacity" in msg
        dropped = int(msg.rsplit("dropped_records=", 1)[1])
        assert dropped > 0 and f"dropped {dropped} token records" in msg
        assert results[(rank, "check_overflow")] == "raised"  # counted until reset_overflow()


def test_capacity_needs_two_ranks():
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="capacity must be >= 0 with a world of >= 2 ranks"):
            AllToAll(E, capacity=4)
        with pytest.raises(ValueError, match="dispatch_dtype must be None or torch.float8_e4m3fn"):
            AllToAll(E, dispatch_dtype=torch.bfloat16)
        # One rank, variable splits: the packed path with every expert local.
        x, logits = tokens(0)
        out = MoELayer(softmax_topk, AllToAll(E, dispatch_dtype=FP8), make_experts("torch"))(x, logits)
        assert rel_err(out, single_device("torch", "fp8", x, logits)) < 1e-2
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.parametrize("dispatch", ["none", "fp8"])
def test_one_rank_nccl_on_cuda_equals_single_gpu(dispatch):
    """The packed path on the GPU kernels (one rank over NCCL; two ranks: scripts/ep-check.sh)."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(free_port())
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        x, logits = tokens(0)
        x, logits = x.cuda(), logits.cuda()
        q1, s1 = quantize_weights(experts_weights()[0])
        q2, s2 = quantize_weights(experts_weights()[1])
        experts = CutlassFp8Experts(q1.cuda(), q2.cuda(), s1.cuda(), s2.cuda())
        pf = AllToAll(E, dispatch_dtype=FP8 if dispatch == "fp8" else None)
        got = MoELayer(softmax_topk, pf, experts)(x, logits)
        want = MoELayer(softmax_topk, SingleGpu(E), experts)(x, logits)
        # One rank: every choice is local, one partial per token, so only the extra pass through
        # the combine (exact: unit weights) separates them: the same bits.
        assert torch.equal(got, want)
    finally:
        dist.destroy_process_group()
