"""Streams, devices, threads (GPU only):

- every op runs on the current stream: on a side stream whose input is written, after a long
  sleep, just before the op; an op that launched on any other stream would read the old input;
- every op works on tensors of a GPU that is not the current device (where two GPUs exist);
- two Python threads, each on its own stream, running the layer at once give the results of one
  run after the other.
"""

import threading

import pytest
import torch

import moe_kernels
from moe_kernels.modular import FusedGateRouter, MoELayer, SingleGpu, TorchExperts

from fp8_helpers import FP8, quantize_per_expert, rel_error
from helpers import random_topk_ids
from test_cutlass_moe_block import quantize_blockwise

pytestmark = pytest.mark.cuda


# ---------------------------------------------------------------- one small call of every op
# name -> (inputs(g) -> list of CPU tensors/values, the first one the data that the test rewrites;
#          run(*inputs) -> outputs; how outputs compare)

def _permute_inputs(g):
    return [torch.randn(300, 256, generator=g).to(torch.bfloat16), random_topk_ids(300, 4, 32), 32]


def _unpermute_inputs(g):
    ids = random_topk_ids(300, 4, 32)
    _, inv, _ = moe_kernels.moe_sort_tokens(ids, 32)
    return [torch.randn(1200, 256, generator=g).to(torch.bfloat16), torch.rand(300, 4, generator=g), inv]


def _ep_inputs(g):
    ids = random_topk_ids(300, 4, 32)
    _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, 32)
    return [torch.randn(300, 256, generator=g).to(torch.bfloat16), src2dst, ids, 8, 23]


def _ep_post_inputs(g):
    ids = random_topk_ids(300, 4, 32)
    _, src2dst, _ = moe_kernels.moe_sort_tokens(ids, 32)
    return [torch.randn(1200, 256, generator=g).to(torch.bfloat16), src2dst, ids, torch.rand(300, 4, generator=g),
            8, 23]


def _pack_inputs(g):
    """bf16 rows of 512 bytes and K=4 (8 metadata words): records without padding bytes."""
    ids = random_topk_ids(300, 4, 32)
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, 8, 4)
    return [torch.randn(300, 256, generator=g).to(torch.bfloat16), None, torch.rand(300, 4, generator=g), ids, slots,
            counts, int(counts.sum()), 8, -1]


def _unpack_inputs(g):
    """Records of a capacity (a shape independent of the routing), fp8 rows compared as bytes."""
    ids = torch.rand(300, 32, generator=g).argsort(1)[:, :4].to(torch.int32).contiguous()
    slots, counts, _ = moe_kernels.ep_dispatch_plan(ids, 8, 4, 300)
    x = (torch.randn(300, 256, generator=g) * 10).to(FP8)
    records = moe_kernels.ep_pack_records(x, torch.rand(300, generator=g), torch.rand(300, 4, generator=g), ids,
                                          slots, counts, 1200, 8, 300)
    return [records, 256, FP8, 1, 4]


def _offsets(g):
    counts = torch.randint(0, 50, (8,), generator=g)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def _gemm_inputs(g):
    off = _offsets(torch.Generator().manual_seed(0))  # fixed row counts: the rewritten `a` keeps its shape
    M = int(off[-1])
    b, b_s = quantize_per_expert(torch.randn(8, 128, 256, generator=g))
    return [(torch.randn(M, 256, generator=g) * 20).to(FP8), b, torch.tensor([0.05]), b_s, off]


def _layer_inputs(g):
    E, H, I = 8, 256, 128
    w1, w1_s = quantize_per_expert(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
    w2, w2_s = quantize_per_expert(torch.randn(E, H, I, generator=g) / I**0.5)
    ids = random_topk_ids(64, 2, E)
    return [torch.randn(64, H, generator=g).to(torch.bfloat16), w1, w2, torch.rand(64, 2, generator=g), ids, w1_s,
            w2_s]


def _permute_scales_inputs(g):
    x, ids, E = _permute_inputs(g)
    return [x.float().to(FP8), ids, E, None, -1, 0, torch.rand(300, 2, generator=g)]


def _block_layer_inputs(g):
    E, H, I = 4, 256, 128
    w1, w1_s = quantize_blockwise(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
    w2, w2_s = quantize_blockwise(torch.randn(E, H, I, generator=g) / I**0.5)
    ids = random_topk_ids(32, 2, E)
    return [torch.randn(32, H, generator=g).to(torch.bfloat16), w1, w2, torch.rand(32, 2, generator=g), ids, w1_s,
            w2_s]


OPS = {
    "moe_sort_tokens": (lambda g: [random_topk_ids(5000, 8, 64), 64], moe_kernels.moe_sort_tokens, "exact"),
    "moe_permute": (_permute_inputs, moe_kernels.moe_permute, "permute"),
    "moe_permute_with_scales": (_permute_scales_inputs, moe_kernels.moe_permute, "exact"),
    "moe_unpermute": (_unpermute_inputs, moe_kernels.moe_unpermute, "bf16"),
    "compute_problem_sizes": (lambda g: [_offsets(g), 64, 256], moe_kernels.compute_problem_sizes, "exact"),
    "ep_pre_reorder": (_ep_inputs, moe_kernels.ep_pre_reorder, "ep_pre"),
    "ep_pre_reorder_fp8": (lambda g: _ep_inputs(g) + [torch.tensor([0.02]), FP8], moe_kernels.ep_pre_reorder,
                           "ep_pre"),
    "ep_post_reorder": (_ep_post_inputs, moe_kernels.ep_post_reorder, "bf16"),
    "ep_dispatch_plan": (lambda g: [random_topk_ids(3000, 8, 64), 8, 8, -1], moe_kernels.ep_dispatch_plan, "exact"),
    "ep_dispatch_plan_capacity": (lambda g: [random_topk_ids(3000, 8, 64), 8, 8, 300], moe_kernels.ep_dispatch_plan,
                                  "exact"),
    "ep_pack_records": (_pack_inputs, moe_kernels.ep_pack_records, "exact"),
    "ep_unpack_records": (_unpack_inputs, moe_kernels.ep_unpack_records, "exact"),
    "scaled_fp8_quant_static": (lambda g: [torch.randn(300, 512, generator=g), torch.tensor([0.01])],
                                moe_kernels.scaled_fp8_quant, "exact"),
    "scaled_fp8_quant_per_tensor": (lambda g: [torch.randn(300, 512, generator=g)], moe_kernels.scaled_fp8_quant,
                                    "exact"),
    "scaled_fp8_quant_per_token": (lambda g: [torch.randn(300, 512, generator=g), None, True],
                                   moe_kernels.scaled_fp8_quant, "exact"),
    "silu_and_mul_quant_fp8": (lambda g: [torch.randn(300, 512, generator=g)], moe_kernels.silu_and_mul_quant_fp8,
                               "exact"),
    "silu_and_mul_quant_fp8_group": (lambda g: [torch.randn(300, 512, generator=g), None, False, 128],
                                     moe_kernels.silu_and_mul_quant_fp8, "exact"),
    "per_token_group_quant_fp8": (lambda g: [torch.randn(300, 512, generator=g), 128],
                                  moe_kernels.per_token_group_quant_fp8, "exact"),
    "moe_fused_gate": (lambda g: [torch.randn(300, 256, generator=g), torch.randn(256, generator=g) * 0.1, 8, 4, 8,
                                  "sigmoid", True, 1, 2.5, False], moe_kernels.moe_fused_gate, "exact"),
    "cutlass_grouped_gemm_fp8": (_gemm_inputs, moe_kernels.cutlass_grouped_gemm_fp8, "gemm"),
    "cutlass_moe_fp8": (_layer_inputs, moe_kernels.cutlass_moe_fp8, "layer"),
    "cutlass_moe_fp8_block": (_block_layer_inputs, moe_kernels.cutlass_moe_fp8, "layer"),
}


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def to(device, values):
    return [v.to(device) if isinstance(v, torch.Tensor) else v for v in values]


def assert_same(name, got, want, how, inputs):
    got = [o.cpu() for o in as_list(got)]
    want = as_list(want)
    if how == "ep_pre":  # rows no local choice maps to are unspecified: compare the written ones
        src2dst, ids, start, end = inputs[1], inputs[2], inputs[3], inputs[4]
        kept = (ids >= start) & (ids <= end)
        rows = src2dst[kept].long()
        got, want = [got[0].view(torch.uint8)[rows]], [want[0].view(torch.uint8)[rows]]
    elif how == "permute":  # every row is in use (no alignment, no map)
        pass
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if how == "gemm" or how == "layer":
            assert rel_error(g, w) < (1e-2 if how == "gemm" else 3e-2), name
        elif how == "bf16":
            torch.testing.assert_close(g.float(), w.float(), rtol=8e-3, atol=1e-5)
        else:
            assert torch.equal(g.view(torch.uint8) if g.dtype == FP8 else g,
                               w.view(torch.uint8) if w.dtype == FP8 else w), name


@pytest.mark.parametrize("name", list(OPS))
def test_op_runs_on_the_current_stream(name):
    make, op, how = OPS[name]
    g = torch.Generator().manual_seed(7)
    inputs = make(g)
    stale = make(g)[0]  # other data of the same shape, overwritten on the side stream
    args = to("cuda", [stale] + inputs[1:])
    fresh = inputs[0].cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # about 30 ms: any other stream would run the op meanwhile
        args[0].copy_(fresh)
        out = op(*args)
    side.synchronize()
    assert_same(name, out, op(*inputs), how, inputs)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("name", list(OPS))
def test_op_on_a_gpu_that_is_not_the_current_device(name):
    make, op, how = OPS[name]
    inputs = make(torch.Generator().manual_seed(11))
    assert torch.cuda.current_device() == 0
    out = op(*to("cuda:1", inputs))
    for o in as_list(out):
        assert o.device == torch.device("cuda:1"), name
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0  # the op's device guard restored the current device
    assert_same(name, out, op(*inputs), how, inputs)


# ---------------------------------------------------------------- two threads

def make_layers():
    g = torch.Generator().manual_seed(3)
    E, K, H, I = 16, 4, 512, 256
    w1 = torch.randn(E, 2 * I, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, I, generator=g) / I**0.5
    w1_q, w1_s = quantize_per_expert(w1)
    w2_q, w2_s = quantize_per_expert(w2)
    w1_q, w1_s, w2_q, w2_s = to("cuda", [w1_q, w1_s, w2_q, w2_s])
    router = FusedGateRouter(topk=K, scoring_func="softmax")

    def fp8_layer(x, logits):
        w, ids = router(logits)
        return moe_kernels.cutlass_moe_fp8(x, w1_q, w2_q, w, ids, w1_s, w2_s)

    torch_layer = MoELayer(router, SingleGpu(E), TorchExperts(w1.cuda().to(torch.bfloat16),
                                                              w2.cuda().to(torch.bfloat16)))
    batches = [(torch.randn(T, H, generator=g).to(torch.bfloat16).cuda(), torch.randn(T, E, generator=g).cuda())
               for T in (1, 37, 256, 600, 5, 128)]
    return {"cutlass_moe_fp8": fp8_layer, "modular_torch_experts": torch_layer}, batches


@pytest.mark.parametrize("kind", ["cutlass_moe_fp8", "modular_torch_experts"])
def test_two_threads_on_their_own_streams_match_serial(kind):
    layers, batches = make_layers()
    layer = layers[kind]
    serial = [layer(x, logits) for x, logits in batches]
    torch.cuda.synchronize()
    results, errors = {}, []

    def worker(i):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                outs = [layer(x, logits) for _ in range(3) for x, logits in batches]
            stream.synchronize()
            results[i] = outs
        except Exception as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    for i in range(2):
        for j, out in enumerate(results[i]):
            want = serial[j % len(batches)]
            if kind == "cutlass_moe_fp8":
                # Deterministic kernels (no atomics that add; the dynamic scale's atomicMax is
                # order-free): the same bits on any stream.
                assert torch.equal(out, want), (i, j)
            else:
                # cuBLAS keeps a workspace per stream and may pick another algorithm there: the
                # fp32 sums may round differently before the bf16 output.
                torch.testing.assert_close(out.float(), want.float(), rtol=8e-3, atol=1e-3)
