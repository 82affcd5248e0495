"""moe_fused_gate: CPU reference against the DeepSeek-V3 gate written in plain torch, CUDA against
the CPU reference, fused shared experts end to end, ties, opcheck, bad inputs, CUDA graphs."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import moe_kernels

from helpers import DEVICES, poison_cuda_allocator

# name: (E, groups, topk_group, topk, scoring, with_bias, renormalize, rsf)
CONFIGS = {
    "deepseek-v3": (256, 8, 4, 8, "sigmoid", True, True, 2.5),
    "deepseek-v2": (160, 8, 3, 6, "softmax", False, False, 16.0),
    "kimi-k2": (384, 1, 1, 8, "sigmoid", True, True, 2.827),
    "qwen3": (128, 1, 1, 8, "softmax", False, True, 1.0),
    "mixtral": (8, 1, 1, 2, "softmax", False, True, 1.0),
    "odd-groups": (96, 6, 2, 5, "sigmoid", True, True, 1.5),   # group count not a power of two
    "e512": (512, 16, 4, 8, "sigmoid", True, False, 1.0),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def distinct_scores(T, E, dtype):
    """[T, E] scores whose values are distinct inside each row in `dtype` (no ties to break)."""
    pool = torch.linspace(-3, 3, 30000).to(dtype).unique()
    idx = torch.rand(T, pool.numel()).argsort(dim=1)[:, :E]
    return pool[idx].contiguous()


def make_inputs(name, T, dtype, device="cpu"):
    E, G, tg, k, scoring, with_bias, renorm, rsf = CONFIGS[name]
    scores = distinct_scores(T, E, dtype).to(device)
    bias = (torch.randn(E) * 0.1).to(device) if with_bias else None
    return scores, bias, (G, tg, k, scoring, renorm, rsf)


def formula(scores, bias, G, topk_group, topk, scoring, renormalize, n_shared=0, rsf=1.0, on_output=False):
    """The DeepSeek-V3 gate (grouped top-k), in plain torch."""
    x = scores.float()
    s = x.sigmoid() if scoring == "sigmoid" else x.softmax(dim=-1)
    choice = s + bias.float() if bias is not None else s
    T, E = s.shape
    if topk_group < G:
        grouped = choice.view(T, G, E // G)
        group_score = grouped.topk(2, dim=-1).values.sum(-1) if bias is not None else grouped.amax(-1)
        keep = torch.zeros(T, G, dtype=torch.bool).scatter_(1, group_score.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    ids = choice.topk(topk, dim=-1).indices
    w = s.gather(1, ids)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    if on_output:
        w = w * rsf
    if n_shared:
        ids = torch.cat([ids, torch.arange(E, E + n_shared).expand(T, n_shared)], dim=1)
        w = torch.cat([w, torch.full((T, n_shared), 1.0 if on_output else 1.0 / rsf)], dim=1)
    return w, ids.int()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 7, 130])
def test_cpu_matches_formula(name, dtype, T):
    scores, bias, (G, tg, k, scoring, renorm, rsf) = make_inputs(name, T, dtype)
    w, ids = moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, renorm, 0, rsf, True)
    want_w, want_ids = formula(scores, bias, G, tg, k, scoring, renorm, 0, rsf, True)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)  # fp32 math, different sum orders


@pytest.mark.parametrize("bias_dtype", ["float32", "same"])
def test_bias_in_scores_dtype(bias_dtype):
    scores, bias, (G, tg, k, scoring, renorm, rsf) = make_inputs("deepseek-v3", 33, torch.bfloat16)
    if bias_dtype == "same":
        bias = bias.to(torch.bfloat16)
    w, ids = moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, renorm)
    want_w, want_ids = formula(scores, bias, G, tg, k, scoring, renorm)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_lower_index(device):
    scores = torch.zeros(3, 64, device=device)
    w, ids = moe_kernels.moe_fused_gate(scores, None, 8, 2, 5, "softmax", True)
    assert ids.cpu().tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8][:5]] * 3
    torch.testing.assert_close(w.cpu(), torch.full((3, 5), 0.2))
    bias = torch.zeros(64, device=device)
    bias[40:48] = 1.0  # group 5 wins; then group 0 by index among equal groups
    _, ids = moe_kernels.moe_fused_gate(scores, bias, 8, 2, 10, "sigmoid", True)
    assert ids.cpu().tolist() == [[40, 41, 42, 43, 44, 45, 46, 47, 0, 1]] * 3


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("on_output", [True, False])
@pytest.mark.parametrize("n_shared", [1, 2])
def test_fused_shared_experts_equal_the_unfused_layer(renormalize, on_output, n_shared):
    """rsf * sum_k w_k * expert_k(x) + shared(x), computed unfused, equals the fused layer in which
    the shared MLP, split along its intermediate axis into n slots, is n more experts."""
    T, E, H, I, rsf = 9, 32, 16, 12, 2.5
    x = torch.randn(T, H, dtype=torch.float64)
    w1 = torch.randn(E + n_shared, 2 * I, H, dtype=torch.float64) / 4
    w2 = torch.randn(E + n_shared, H, I, dtype=torch.float64) / 4
    shared_w1 = torch.cat([w1[E:, :I].reshape(-1, H), w1[E:, I:].reshape(-1, H)])   # [2*n*I, H]
    shared_w2 = torch.cat(list(w2[E:]), dim=1)                                        # [H, n*I]

    def mlp(e, v, a=None, b=None):
        a = w1[e] if a is None else a
        b = w2[e] if b is None else b
        g, u = (a @ v).chunk(2)
        return b @ (F.silu(g) * u)

    scores = distinct_scores(T, E, torch.float32)
    bias = torch.randn(E) * 0.1
    w, ids = moe_kernels.moe_fused_gate(scores, bias, 4, 2, 4, "sigmoid", renormalize, 0, rsf, False)
    unfused = torch.stack([rsf * sum(w[t, k].double() * mlp(int(ids[t, k]), x[t]) for k in range(4))
                           + mlp(None, x[t], shared_w1, shared_w2) for t in range(T)])

    wf, idf = moe_kernels.moe_fused_gate(scores, bias, 4, 2, 4, "sigmoid", renormalize, n_shared, rsf, on_output)
    fused = torch.stack([sum(wf[t, j].double() * mlp(int(idf[t, j]), x[t]) for j in range(4 + n_shared))
                         for t in range(T)])
    if not on_output:
        fused = fused * rsf  # the caller scales the whole output
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    assert idf[:, 4:].tolist() == [list(range(E, E + n_shared))] * T


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    scores, bias, (G, tg, k, scoring, renorm, rsf) = make_inputs("deepseek-v3", 5, torch.float32, device)
    opcheck(torch.ops.moe_kernels.moe_fused_gate.default, (scores, bias, G, tg, k, scoring, renorm, 1, rsf, False))


BAD = [
    (dict(scores=torch.zeros(4, 64, dtype=torch.int32)), "scores must be float32, float16 or bfloat16, got Int"),
    (dict(scores=torch.zeros(64)), "scores must be 2-D"),
    (dict(scores=torch.zeros(64, 4).t()), "scores must be contiguous"),
    (dict(num_expert_group=7), "num_expert_group must divide the 64 experts, got 7"),
    (dict(topk_group=9), r"topk_group must be in \[1, num_expert_group=8\], got 9"),
    (dict(topk=17), r"topk must be in \[1, 16\] \(the experts in topk_group=2 kept groups\), got 17"),
    (dict(scoring_func="relu"), 'scoring_func must be "sigmoid" or "softmax", got "relu"'),
    (dict(bias=torch.zeros(63)), r"bias must have shape \[64\]"),
    (dict(bias=torch.zeros(64, dtype=torch.float16)), "bias must be float32 or Float"),
    (dict(num_fused_shared_experts=-1), "num_fused_shared_experts must be >= 0"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor must be positive"),
    (dict(scores=torch.zeros(4, 2048)), "scores must have 1 to 1024 experts"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("override,message", BAD)
def test_rejects_bad_arguments(device, override, message):
    args = dict(scores=torch.zeros(4, 64), bias=None, num_expert_group=8, topk_group=2, topk=4,
                scoring_func="sigmoid", renormalize=True, num_fused_shared_experts=0, routed_scaling_factor=1.0,
                apply_routed_scaling_factor_on_output=False)
    args.update(override)
    if args["scores"].shape == (4, 64) and not args["scores"].is_contiguous():
        args["scores"] = torch.zeros(64, 4, device=device).t()
    args = {k: v.to(device) if isinstance(v, torch.Tensor) and v.is_contiguous() else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=message):
        moe_kernels.moe_fused_gate(**args)


# ---------------------------------------------------------------- CUDA against the CPU reference

@pytest.mark.cuda
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 7, 1000])
@pytest.mark.parametrize("n_shared,on_output", [(0, True), (1, False), (2, True)])
def test_cuda_matches_cpu(name, dtype, T, n_shared, on_output):
    scores, bias, (G, tg, k, scoring, renorm, rsf) = make_inputs(name, T, dtype)
    want_w, want_ids = moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, renorm, n_shared, rsf, on_output)
    poison_cuda_allocator(0xFF)
    w, ids = moe_kernels.moe_fused_gate(scores.cuda(), bias.cuda() if bias is not None else None, G, tg, k, scoring,
                                        renorm, n_shared, rsf, on_output)
    # Both sides run the same IEEE steps (common/portable_math.h) in the same order: same bits.
    assert torch.equal(ids.cpu(), want_ids)
    assert torch.equal(w.cpu(), want_w)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2", "kimi-k2"])
def test_cuda_matches_cpu_on_ties_and_random_data(name):
    """Plain random data (near-ties included) and many exact ties: still the same bits."""
    E, G, tg, k, scoring, with_bias, renorm, rsf = CONFIGS[name]
    scores = torch.randn(2000, E).to(torch.bfloat16)
    scores[:500] = scores[:500].round()  # many equal values per row
    bias = (torch.randn(E) * 0.1).round(decimals=1) if with_bias else None
    want = moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, renorm, 1, rsf, False)
    got = moe_kernels.moe_fused_gate(scores.cuda(), bias.cuda() if with_bias else None, G, tg, k, scoring, renorm,
                                     1, rsf, False)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@pytest.mark.cuda
def test_cuda_many_tokens():
    scores, bias, (G, tg, k, scoring, renorm, rsf) = make_inputs("deepseek-v3", 65536 + 3, torch.bfloat16)
    want = moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, renorm, 1, rsf, True)
    got = moe_kernels.moe_fused_gate(scores.cuda(), bias.cuda(), G, tg, k, scoring, renorm, 1, rsf, True)
    assert torch.equal(got[1].cpu(), want[1]) and torch.equal(got[0].cpu(), want[0])


@pytest.mark.cuda
def test_cuda_graph_replay():
    scores, bias, (G, tg, k, scoring, renorm, rsf) = make_inputs("deepseek-v3", 64, torch.float32, "cuda")
    moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, renorm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, ids = moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, renorm)
    for _ in range(2):
        scores.copy_(distinct_scores(64, 256, torch.float32))
        graph.replay()
        want_w, want_ids = moe_kernels.moe_fused_gate(scores, bias, G, tg, k, scoring, renorm)
        assert torch.equal(ids, want_ids) and torch.equal(w, want_w)
