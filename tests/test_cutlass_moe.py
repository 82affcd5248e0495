"""cutlass_moe_fp8, the FP8 expert layer: against a bf16-free float reference MoE built from the
dequantized weights; expert parallelism through expert_map; T = 0; CUDA graphs; bad inputs."""

import pytest
import torch
import torch.nn.functional as F

import moe_kernels

from fp8_helpers import quantize_per_expert, rel_error
from helpers import DEVICES, random_topk_ids


def quantize_per_channel(w):
    """w [E, N, K] float -> (w_q e4m3, scale [E, N] f32): one scale per output channel."""
    scale = w.abs().amax(dim=2).clamp(min=1e-12) / 448.0
    return (w / scale[:, :, None]).to(torch.float8_e4m3fn), scale.float()


def make_layer(T, E, K, H, I, device="cpu", per_channel=False):
    x = torch.randn(T, H).to(torch.bfloat16)
    quantize = quantize_per_channel if per_channel else quantize_per_expert
    w1_q, w1_s = quantize(torch.randn(E, 2 * I, H) / H**0.5)
    w2_q, w2_s = quantize(torch.randn(E, H, I) / I**0.5)
    w = torch.softmax(torch.randn(T, K), dim=-1)
    ids = random_topk_ids(T, K, E)
    return [t.to(device) for t in (x, w1_q, w2_q, w, ids, w1_s, w2_s)]


def fake_quant(v, scale=None, per_token=False):
    """e4m3 round trip computed in fp32 as the layer quantizes (times the reciprocal of the scale):
    with a per-tensor scale (amax / 448 when not given), or with per_token one scale per row (row
    amax / 448, floored at 1 / (448 * 512))."""
    if scale is None and per_token:
        scale = (v.abs().amax(dim=1, keepdim=True).float() / 448).clamp(min=1 / (448 * 512))
    elif scale is None:
        scale = v.abs().max().float() / 448
    else:
        scale = torch.tensor(scale, dtype=torch.float32)
    q = (v.float() * (1 / scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.double() * scale.double()


def dequantize(w_q, s):
    return w_q.float() * (s[:, :, None] if s.dim() == 2 else s[:, None, None])


def reference(x, w1_q, w2_q, w, ids, w1_s, w2_s, local=None, a1=None, a2=None, per_token=False):
    """sum_k w[t,k] * W2[e] q(silu(W1g[e] q(x)) * W1u[e] q(x)) in float64, with the dequantized
    weights and the activations rounded to e4m3 where the layer quantizes them (q: per tensor; the
    intermediate's dynamic scale spans the rows of every expert computed here). With `local` (a
    set of experts) only those experts contribute."""
    w1 = dequantize(w1_q.cpu(), w1_s.cpu()).double()
    w2 = dequantize(w2_q.cpu(), w2_s.cpu()).double()
    x, w, ids = x.cpu().double(), w.cpu().double(), ids.cpu()
    xq = fake_quant(x, None if a1 is None else a1.item(), per_token)
    I = w2.shape[2]
    experts = [e for e in ids.unique().tolist() if local is None or e in local]
    # GEMM1's output is bf16 in the layer: round h the same way before the activation.
    hs = {e: (xq[(ids == e).nonzero(as_tuple=True)[0]] @ w1[e].t()).to(torch.bfloat16).double() for e in experts}
    ys = {e: F.silu(h[:, :I]) * h[:, I:] for e, h in hs.items()}
    if a2 is not None:
        a2 = a2.item()
    elif not per_token:  # the dynamic scale spans every row computed here
        a2 = (torch.cat(list(ys.values())).abs().max().float() / 448).item()
    out = torch.zeros_like(x)
    for e in experts:
        t, k = (ids == e).nonzero(as_tuple=True)
        out.index_add_(0, t, (fake_quant(ys[e], a2, per_token) @ w2[e].t()) * w[t, k].unsqueeze(1))
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("static_scales", [False, True])
def test_layer_matches_reference(device, T, static_scales):
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(T, 8, 2, 256, 128, device)
    a1 = torch.tensor([x.float().abs().max().item() / 448], device=device) if static_scales else None
    a2 = torch.tensor([0.01], device=device) if static_scales else None
    out = moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s, a1, a2)
    assert out.shape == x.shape and out.dtype == x.dtype
    # Same quantization points as the reference; what differs is fp32 vs float64 sums, bf16
    # intermediates and the odd e4m3 rounding that flips: well under 3e-2.
    assert rel_error(out.cpu(), reference(x, w1, w2, w, ids, w1_s, w2_s, a1=a1, a2=a2)) < 3e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_act_token,per_out_ch", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("T", [1, 200])
def test_layer_per_token_per_channel(device, per_act_token, per_out_ch, T):
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(T, 8, 2, 256, 128, device, per_channel=per_out_ch)
    out = moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s, per_act_token=per_act_token,
                                      per_out_ch=per_out_ch)
    ref = reference(x, w1, w2, w, ids, w1_s, w2_s, per_token=per_act_token)
    assert rel_error(out.cpu(), ref) < 3e-2


@pytest.mark.cuda
def test_cuda_expert_map_per_token():
    T, E, K, H, I = 300, 16, 4, 256, 128
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(T, E, K, H, I, "cuda", per_channel=True)
    local = sorted(torch.randperm(E)[: E // 2].tolist())
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[local] = torch.arange(len(local), dtype=torch.int32)
    out = moe_kernels.cutlass_moe_fp8(x, w1[local], w2[local], w, ids, w1_s[local], w2_s[local],
                                      per_act_token=True, per_out_ch=True, expert_map=emap.cuda(),
                                      num_local_experts=len(local))
    ref = reference(x, w1, w2, w, ids, w1_s, w2_s, set(local), per_token=True)
    assert rel_error(out.cpu(), ref) < 3e-2


@pytest.mark.cuda
@pytest.mark.parametrize("T,E,K,H,I", [(256, 16, 4, 512, 256), (1000, 64, 8, 1024, 256), (1000, 8, 4, 256, 128),
                                       (0, 8, 2, 256, 128)])
def test_cuda_layer_matches_reference(T, E, K, H, I):
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(T, E, K, H, I, "cuda")
    out = moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s)
    assert out.shape == (T, H)
    if T:
        assert rel_error(out.cpu(), reference(x, w1, w2, w, ids, w1_s, w2_s)) < 3e-2


@pytest.mark.cuda
def test_cuda_expert_map_keeps_local_experts():
    T, E, K, H, I = 300, 16, 4, 256, 128
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(T, E, K, H, I, "cuda")
    local = sorted(torch.randperm(E)[: E // 2].tolist())
    emap = torch.full((E,), -1, dtype=torch.int32)
    emap[local] = torch.arange(len(local), dtype=torch.int32)
    a2 = torch.tensor([0.01], device="cuda")
    out = moe_kernels.cutlass_moe_fp8(x, w1[local], w2[local], w, ids, w1_s[local], w2_s[local], None, a2,
                                      expert_map=emap.cuda(), num_local_experts=len(local))
    assert rel_error(out.cpu(), reference(x, w1, w2, w, ids, w1_s, w2_s, set(local), a2=a2)) < 3e-2


@pytest.mark.cuda
def test_cuda_layer_graph_replay():
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(64, 8, 2, 256, 128, "cuda")
    a1, a2 = torch.tensor([0.01], device="cuda"), torch.tensor([0.01], device="cuda")
    moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s, a1, a2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s, a1, a2)
    x.copy_(torch.randn_like(x))
    ids.copy_(random_topk_ids(64, 2, 8, device="cuda"))
    graph.replay()
    want = moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s, a1, a2)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_rejects_bad_arguments(device):
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(4, 8, 2, 64, 32, device)
    layer = moe_kernels.cutlass_moe_fp8
    with pytest.raises(RuntimeError, match=r"w1_scale and w2_scale must be \[E\] per expert"):
        layer(x, w1, w2, w, ids, w1_s, w2_s, per_out_ch=True)
    with pytest.raises(RuntimeError, match="hidden_states must be bfloat16, float16 or float8_e4m3fn .*got Float"):
        layer(x.float(), w1, w2, w, ids, w1_s, w2_s)
    with pytest.raises(RuntimeError, match=r"w1 must be \[E, 2I, H\]"):
        layer(x, w1[:, :32], w2, w, ids, w1_s, w2_s)
    with pytest.raises(RuntimeError, match="with expert_map, a2_scale \\(static\\) or per_act_token=True is required"):
        layer(x, w1, w2, w, ids, w1_s, w2_s, expert_map=torch.arange(8, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="apply_router_weight_on_input needs topk == 1"):
        layer(x, w1, w2, w, ids, w1_s, w2_s, apply_router_weight_on_input=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["static", "per_token", "per_token_1d"])
def test_layer_prequantized_input_equals_bf16_input(device, mode):
    # fp8 rows with their scale (as an all-to-all delivers them) give the bytes of the layer on the
    # bf16 rows quantized the same way; the output is bf16.
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(9, 8, 2, 256, 128, device, per_channel=True)
    if mode == "static":
        a1 = torch.tensor([x.float().abs().max().item() / 448], device=device)
        kwargs = dict(per_out_ch=True, a2_scale=torch.tensor([0.01], device=device))
        q, s = moe_kernels.scaled_fp8_quant(x, a1)
        want = moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s, a1_scale=a1, **kwargs)
    else:
        kwargs = dict(per_out_ch=True, per_act_token=True)
        q, s = moe_kernels.scaled_fp8_quant(x, None, True)
        s = s.reshape(-1) if mode == "per_token_1d" else s  # [T] or [T, 1]
        want = moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s, **kwargs)
    got = moe_kernels.cutlass_moe_fp8(q, w1, w2, w, ids, w1_s, w2_s, a1_scale=s, **kwargs)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_rejects_bad_prequantized_scales(device):
    x, w1, w2, w, ids, w1_s, w2_s = make_layer(4, 8, 2, 256, 128, device)
    q = x.to(torch.float8_e4m3fn)
    layer = moe_kernels.cutlass_moe_fp8
    with pytest.raises(RuntimeError, match="a1_scale is required with float8_e4m3fn hidden_states"):
        layer(q, w1, w2, w, ids, w1_s, w2_s)
    with pytest.raises(RuntimeError, match=r"a1_scale must be \[1\] \(per tensor\) or \[T\] / \[T, 1\] "
                                           r"\(per token, T=4\) .*per-group scales need block mode.* got shape \[4, 2\]"):
        layer(q, w1, w2, w, ids, w1_s, w2_s, a1_scale=torch.ones(4, 2, device=device))
    with pytest.raises(RuntimeError, match=r"a1_scale must be float32, got Half"):
        layer(q, w1, w2, w, ids, w1_s, w2_s, a1_scale=torch.ones(1, device=device).half())
