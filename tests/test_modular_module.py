"""The modular layer as torch.nn.Modules: registered weights under checkpoint names, state_dict round
trips, .to() semantics, printing, the deprecated call styles, the activation keywords against plain
formulas, building from checkpoint-shaped tensors (DeepSeek-V3 block FP8, per-channel FP8, gpt-oss
bf16 and MXFP4, routers), and torch.compile without graph breaks."""

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moe_kernels
from moe_kernels.modular import (CutlassFp8Experts, CutlassMxfp4Experts, CutlassW4A8Experts, FusedGateRouter,
                                 MoELayer, SingleGpu, TorchExperts)

FP8 = torch.float8_e4m3fn
T, E, K, H, I = 21, 8, 2, 128, 128   # multiples of 128: every FP8 mode (blocks) and W4A8 groups

HAS_ACT_KEYWORDS = "activation" in str(torch.ops.moe_kernels.cutlass_moe_fp8.default._schema)
HAS_MXFP4 = hasattr(moe_kernels, "cutlass_moe_mxfp4") or hasattr(torch.ops.moe_kernels, "cutlass_moe_mxfp4")
HAS_W4A8 = hasattr(moe_kernels, "cutlass_moe_w4a8") or hasattr(torch.ops.moe_kernels, "cutlass_moe_w4a8")
needs_act = pytest.mark.skipif(not HAS_ACT_KEYWORDS, reason="cutlass_moe_fp8 of this build has no activation "
                               "keywords yet (branch act)")
needs_mxfp4 = pytest.mark.skipif(not HAS_MXFP4, reason="cutlass_moe_mxfp4 not in this build yet (branch fp4)")
needs_w4a8 = pytest.mark.skipif(not HAS_W4A8, reason="cutlass_moe_w4a8 not in this build yet (branch fp4)")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------- plain formulas

def gated(h, act, interleaved, alpha=1.702, limit=7.0):
    gate, up = (h[..., 0::2], h[..., 1::2]) if interleaved else (h[..., :h.shape[-1] // 2], h[..., h.shape[-1] // 2:])
    if act == "silu":
        return gate * torch.sigmoid(gate) * up
    if act == "gelu":
        return 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2))) * up
    gate = torch.minimum(gate, torch.tensor(limit, dtype=gate.dtype))
    up = torch.clamp(up, -limit, limit)
    return (up + 1) * gate * torch.sigmoid(alpha * gate)


def dense_moe(x, w, ids, w1, w2, b1=None, b2=None, act="silu", interleaved=False):
    """out[t] = sum_k w[t,k] * (W2[e] act(W1[e] x[t] + b1[e]) + b2[e]), token by token in float64;
    w1 [E, 2I, H], w2 [E, H, I]."""
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w1[e].double() @ x[t].double() + (0 if b1 is None else b1[e].double())
            y = w2[e].double() @ gated(h, act, interleaved) + (0 if b2 is None else b2[e].double())
            out[t] += float(w[t, k]) * y
    return out


def routing(seed=0, n=T):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g)
    logits = torch.randn(n, E, generator=g)
    p, ids = torch.softmax(logits, -1).topk(K, -1)
    return x, logits, p / p.sum(-1, keepdim=True), ids.to(torch.int32)


def float_weights(seed=1, e=E):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(e, 2 * I, H, generator=g) / H**0.5, torch.randn(e, H, I, generator=g) / I**0.5,
            torch.randn(e, 2 * I, generator=g) * 0.1, torch.randn(e, H, generator=g) * 0.1)


def quant_fp8(w, mode):
    """e4m3 weights and scales (multiplied to dequantize): expert [E], channel [E, N], block [E, N/128, K/128]."""
    En, N, Kd = w.shape
    if mode == "block":
        b = w.view(En, N // 128, 128, Kd // 128, 128)
        s = b.abs().amax(dim=(2, 4)) / 448
        return (b / s[:, :, None, :, None]).view(En, N, Kd).to(FP8), s
    s = w.abs().amax(dim=2) / 448 if mode == "channel" else w.abs().amax(dim=(1, 2)) / 448
    return (w / (s.unsqueeze(-1) if mode == "channel" else s.view(-1, 1, 1))).to(FP8), s


def make_experts(kind):
    w1, w2, b1, b2 = float_weights()
    if kind == "torch":
        return TorchExperts(w1, w2)
    if kind == "torch_oai":
        return TorchExperts(w1, w2, activation="swigluoai", gate_up_interleaved=True, w1_bias=b1, w2_bias=b2)
    if kind.startswith("fp8_"):
        mode = kind[4:]
        q1, s1 = quant_fp8(w1, mode)
        q2, s2 = quant_fp8(w2, mode)
        return CutlassFp8Experts(q1, q2, s1, s2)
    g = torch.Generator().manual_seed(2)
    if kind == "mxfp4":
        return CutlassMxfp4Experts(torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, generator=g),
                                   torch.randint(0, 256, (E, H, I // 2), dtype=torch.uint8, generator=g),
                                   torch.randint(118, 124, (E, 2 * I, H // 32), dtype=torch.uint8, generator=g),
                                   torch.randint(118, 124, (E, H, I // 32), dtype=torch.uint8, generator=g),
                                   activation="swigluoai", gate_up_interleaved=True, w1_bias=b1, w2_bias=b2)
    if kind == "w4a8":
        return CutlassW4A8Experts(torch.randint(-128, 128, (E, 2 * I, H // 2), dtype=torch.int8, generator=g),
                                  torch.randint(-128, 128, (E, H, I // 2), dtype=torch.int8, generator=g),
                                  torch.rand(E, 2 * I, H // 128, generator=g) / 64,
                                  torch.rand(E, H, I // 128, generator=g) / 64, torch.tensor([0.02]))
    raise AssertionError(kind)


KINDS = ["torch", "torch_oai", "fp8_expert", "fp8_channel", "fp8_block", "mxfp4", "w4a8"]
RUNNABLE = ["torch", "torch_oai", "fp8_expert", "fp8_channel", "fp8_block"]  # CPU forward available today

EXPECTED_KEYS = {
    "torch": {"w13_weight", "w2_weight"},
    "torch_oai": {"w13_weight", "w2_weight", "w13_bias", "w2_bias"},
    "fp8_expert": {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"},
    "fp8_channel": {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale"},
    "fp8_block": {"w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv"},
    "mxfp4": {"w13_weight", "w2_weight", "w13_weight_scale", "w2_weight_scale", "w13_bias", "w2_bias"},
    "w4a8": {"w13_weight", "w2_weight", "w13_weight_scale_inv", "w2_weight_scale_inv", "w13_input_scale"},
}


def make_layer(kind, with_gate=True):
    g = torch.Generator().manual_seed(3)
    router = FusedGateRouter(topk=K, weight=torch.randn(E, H, generator=g) / H**0.5,
                             linear_bias=torch.randn(E, generator=g)) if with_gate else FusedGateRouter(topk=K)
    return MoELayer(router, SingleGpu(E), make_experts(kind))


def scrambled(module):
    """The same module type and shapes with other values (a fresh layer to load a state dict into)."""
    out = {}
    for name, t in module.state_dict().items():
        if t.is_floating_point() and t.dtype != FP8:
            out[name] = torch.rand_like(t) + 0.5
        elif t.dtype == FP8:
            out[name] = (torch.rand(t.shape) + 0.5).to(FP8)
        else:
            out[name] = torch.randint_like(t, 0, 100)
    return out


# ---------------------------------------------------------------------------- modules, state_dict, .to, print

@pytest.mark.parametrize("kind", KINDS)
def test_weights_are_registered_under_checkpoint_names(kind):
    layer = make_layer(kind)
    keys = set(layer.state_dict())
    assert keys == {f"experts.{k}" for k in EXPECTED_KEYS[kind]} | {"router.weight", "router.bias"}
    for name, p in layer.named_parameters():
        assert not p.requires_grad, name
    assert dict(layer.named_modules()).keys() == {"", "router", "prepare_finalize", "experts"}


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_into_a_fresh_layer(kind):
    layer = make_layer(kind)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    fresh = make_layer(kind)
    fresh.load_state_dict(scrambled(fresh))      # make sure the load, not the construction, sets the values
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for (n1, t1), (n2, t2) in zip(layer.state_dict().items(), fresh.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1.view(torch.uint8) if t1.dtype == FP8 else t1,
                                                                 t2.view(torch.uint8) if t2.dtype == FP8 else t2), n1
    x, *_ = routing()
    if kind in RUNNABLE:
        xin = x.to(torch.bfloat16) if kind.startswith("fp8") else x
        assert torch.equal(fresh(xin), layer(xin))
    else:   # the 4-bit ops are not in every build: compare the dequantized references
        assert torch.equal(fresh.experts.reference()(x, *routing()[2:]), layer.experts.reference()(x, *routing()[2:]))


def test_load_state_dict_rejects_missing_and_wrongly_shaped_tensors():
    layer = make_layer("fp8_block")
    sd = layer.state_dict()
    del sd["experts.w13_weight_scale_inv"]
    with pytest.raises(RuntimeError, match="w13_weight_scale_inv"):
        make_layer("fp8_block").load_state_dict(sd)
    sd = make_layer("fp8_block").state_dict()
    sd["experts.w2_weight"] = sd["experts.w2_weight"][:, :, :64]
    with pytest.raises(RuntimeError, match="size mismatch for experts.w2_weight"):
        make_layer("fp8_block").load_state_dict(sd)


def test_torch_experts_to_float64_computes_in_float64():
    layer = make_layer("torch_oai").to(torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    x, _, w, ids = routing()
    out = layer.experts(x.double(), w, ids)
    assert out.dtype == torch.float64
    ex = layer.experts
    want = dense_moe(x, w, ids, ex.w13_weight, ex.w2_weight, ex.w13_bias, ex.w2_bias, "swigluoai", True)
    # float64 against float64: only the summation order differs.
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["fp8_block", "fp8_channel", "mxfp4", "w4a8"])
def test_quantized_experts_keep_their_dtypes_under_dtype_conversion(kind):
    layer = make_layer(kind)
    before = {n: t.dtype for n, t in layer.experts.state_dict().items()}
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double(),
                    lambda m: m.to("cpu", torch.float16)):
        convert(layer)
        assert {n: t.dtype for n, t in layer.experts.state_dict().items()} == before
    assert layer.router.weight.dtype == torch.float16     # the router converts like any module
    layer.to("meta")                                      # a device change moves them, dtypes kept
    assert all(t.device.type == "meta" for t in layer.state_dict().values())
    assert {n: t.dtype for n, t in layer.experts.state_dict().items()} == before


@pytest.mark.parametrize("kind", ["torch", "fp8_block"])
def test_to_device_moves_every_tensor(kind):
    layer = make_layer(kind).to("meta")
    for name, t in layer.state_dict().items():
        assert t.device.type == "meta", name
    for p in layer.parameters():
        assert isinstance(p, nn.Parameter)
    # A model that holds the layer moves it.
    model = nn.Sequential(nn.Linear(H, H), make_layer(kind, with_gate=True))
    model.to("meta")
    assert model[1].experts.w13_weight.device.type == "meta" and model[1].router.weight.device.type == "meta"


def test_print_shows_the_tree_and_the_shapes():
    text = repr(make_layer("fp8_block"))
    assert text.startswith(f"MoELayer(\n  E={E}, K={K}, H={H}, I={I}, format=fp8 block 128x128, activation=silu\n")
    assert f"(router): FusedGateRouter(topk={K}, scoring_func=softmax, gate=[{E}, {H}] +bias)" in text
    assert f"(prepare_finalize): SingleGpu(num_experts={E})" in text
    assert f"(experts): CutlassFp8Experts(E={E}, H={H}, I={I}, format=fp8 block 128x128, activation=silu)" in text
    assert "activation=swigluoai(alpha=1.702, limit=7), gate_up_interleaved=True, bias=True" in \
        repr(make_experts("torch_oai"))
    assert "format=mxfp4 (W4A16)" in repr(make_experts("mxfp4"))


def test_a_model_holding_the_layer_saves_and_loads():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(H)
            self.mlp = make_layer("torch")

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    a, b = Block(), Block()
    b.load_state_dict(scrambled(b))
    assert "mlp.experts.w13_weight" in a.state_dict() and "mlp.router.weight" in a.state_dict()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, H)           # [B, S, H]: flattened and restored by the layer
    assert torch.equal(a(x), b(x)) and a(x).shape == (2, 5, H)


@pytest.mark.parametrize("kind", ["torch", "torch_oai", "fp8_block"])
def test_layer_takes_zero_tokens_and_leading_dims(kind):
    layer = make_layer(kind)
    dtype = torch.bfloat16 if kind.startswith("fp8") else torch.float32
    assert layer(torch.randn(0, H, dtype=dtype)).shape == (0, H)
    x = torch.randn(2, 3, H, dtype=dtype)
    assert torch.equal(layer(x), layer(x.view(6, H)).view(2, 3, H))


def test_all_to_all_is_a_weightless_submodule():
    import os
    import socket

    import torch.distributed as dist
    from moe_kernels.modular import AllToAll
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        layer = MoELayer(FusedGateRouter(topk=K), AllToAll(E, dispatch_dtype=FP8, quant_group_size=128),
                         make_experts("fp8_block"))
        assert (f"(prepare_finalize): AllToAll(num_experts={E}, world=1, rank=0, dispatch_dtype=torch.float8_e4m3fn, "
                "quant_group_size=128)") in repr(layer)
        assert not any(k.startswith("prepare_finalize") for k in layer.state_dict())
        x, logits, _, _ = routing(21)
        single = MoELayer(FusedGateRouter(topk=K), SingleGpu(E), layer.experts)
        # One rank: the same rows reach the same experts; the dispatch's per-group quantization is the
        # one the FP8 block experts apply to bf16 input, so the results are the same bits.
        assert torch.equal(layer(x.to(torch.bfloat16), logits), single(x.to(torch.bfloat16), logits))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- deprecated call styles

def test_fused_gate_router_bias_keyword_is_deprecated():
    bias = torch.randn(E)
    with pytest.warns(DeprecationWarning, match="e_score_correction_bias"):
        old = FusedGateRouter(4, 2, 1, "sigmoid", True, bias)
    new = FusedGateRouter(4, 2, 1, "sigmoid", True, e_score_correction_bias=bias)
    logits = torch.randn(T, E)
    for a, b in zip(old(logits), new(logits)):
        assert torch.equal(a, b)
    assert "e_score_correction_bias" in old.state_dict() and "bias" not in old.state_dict()


def test_old_weight_attributes_warn_and_still_work():
    ex = make_experts("fp8_block")
    with pytest.warns(DeprecationWarning, match="w13_weight"):
        assert ex.w1 is ex.w13_weight
    with pytest.warns(DeprecationWarning, match="w13_scale"):
        assert ex.w1_scale is ex.w13_weight_scale_inv
    assert ex.w2_scale is ex.w2_weight_scale_inv
    with pytest.warns(DeprecationWarning):
        assert make_experts("torch").w2 is not None


def test_old_positional_composition_still_runs():
    """MoELayer(plain function router, SingleGpu, TorchExperts(w1, w2))(x, logits), as before."""
    x, logits, w, ids = routing()
    w1, w2, _, _ = float_weights()

    def softmax_topk(lg):
        p, i = torch.softmax(lg, -1).topk(K, -1)
        return p / p.sum(-1, keepdim=True), i.to(torch.int32)

    out = MoELayer(softmax_topk, SingleGpu(E), TorchExperts(w1, w2))(x, logits)
    torch.testing.assert_close(out.double(), dense_moe(x, w, ids, w1, w2), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- activations and biases

@pytest.mark.parametrize("act", ["silu", "gelu", "swigluoai"])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_torch_experts_activation_and_bias_match_the_formula(act, interleaved, bias):
    x, _, w, ids = routing(4)
    w1, w2, b1, b2 = float_weights(5)
    w1 = w1 * 4  # gate/up values beyond the swiglu limit, so that the clamps matter
    b1, b2 = (b1, b2) if bias else (None, None)
    ex = TorchExperts(w1, w2, activation=act, gate_up_interleaved=interleaved, w1_bias=b1, w2_bias=b2)
    got = ex(x, w, ids)
    # fp32 matmuls over H=128 against float64
    torch.testing.assert_close(got.double(), dense_moe(x, w, ids, w1, w2, b1, b2, act, interleaved), rtol=1e-5, atol=1e-5)


def test_swigluoai_clamps_engage():
    h = torch.tensor([[10.0, -10.0, 1.0, 8.0]])
    out = moe_kernels.modular.gated_activation(h, "swigluoai", gate_up_interleaved=True)
    # gate 10 -> 7, up -10 -> -7: (1 - 7) * 7 * sigmoid(1.702 * 7); gate 1, up 8 -> 7: 8 * sigmoid(1.702)
    want = torch.tensor([[-6 * 7 * torch.sigmoid(torch.tensor(1.702 * 7)).item(), 8 * torch.sigmoid(torch.tensor(1.702)).item()]])
    torch.testing.assert_close(out, want)


def test_experts_reject_bad_activation_and_bias_shapes():
    w1, w2, b1, b2 = float_weights()
    with pytest.raises(ValueError, match="activation must be one of"):
        TorchExperts(w1, w2, activation="relu")
    with pytest.raises(ValueError, match=r"w1_bias must be \[8, 256\]"):
        TorchExperts(w1, w2, w1_bias=b2)
    with pytest.raises(ValueError, match=r"w2_bias must be \[8, 128\]"):
        TorchExperts(w1, w2, w2_bias=b1)
    with pytest.raises(ValueError, match=r"w1_scale must be \[8, 256, 4\]"):
        CutlassMxfp4Experts(torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8), torch.zeros(E, H, I // 2, dtype=torch.uint8),
                            torch.zeros(E, 2 * I, 3, dtype=torch.uint8), torch.zeros(E, H, I // 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="a_dtype must be"):
        CutlassMxfp4Experts(torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8), torch.zeros(E, H, I // 2, dtype=torch.uint8),
                            torch.zeros(E, 2 * I, H // 32, dtype=torch.uint8), torch.zeros(E, H, I // 32, dtype=torch.uint8),
                            a_dtype=torch.float16)
    with pytest.raises(ValueError, match=r"w1_scale must be float32 \[8, 256, 1\]"):
        CutlassW4A8Experts(torch.zeros(E, 2 * I, H // 2, dtype=torch.int8), torch.zeros(E, H, I // 2, dtype=torch.int8),
                           torch.zeros(E, 2 * I, 2), torch.zeros(E, H, 1))


@needs_act
@pytest.mark.parametrize("act", ["gelu", "swigluoai"])
def test_cutlass_fp8_experts_activation_keywords_match_the_reference(act):
    """cutlass_moe_fp8's CPU reference with the third-wave keywords against TorchExperts on the
    dequantized weights. The op quantizes both GEMM inputs to e4m3 (per element <= 2^-4 relative,
    about 3.6% rms each; 3.4-4.4% measured on these shapes), so the bound is 0.1; the wiring errors
    it must catch are far above it: the wrong gate/up order gives ~1.4, a dropped bias (std 0.5 here)
    ~0.4-0.5 (measured)."""
    x, _, w, ids = routing(6)
    w1, w2, b1, b2 = float_weights(7)
    q1, s1 = quant_fp8(w1, "channel")
    q2, s2 = quant_fp8(w2, "channel")
    ex = CutlassFp8Experts(q1, q2, s1, s2, activation=act, gate_up_interleaved=act == "swigluoai", w1_bias=b1 * 5,
                           w2_bias=b2 * 5)
    got = ex(x.to(torch.bfloat16), w, ids)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, ex.reference()(x, w, ids)) < 0.1


@needs_mxfp4
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, FP8])
def test_mxfp4_experts_match_their_reference(a_dtype):
    m = make_experts("mxfp4")
    ex = CutlassMxfp4Experts(m.w13_weight, m.w2_weight, m.w13_weight_scale, m.w2_weight_scale, activation="swigluoai",
                             gate_up_interleaved=True, w1_bias=m.w13_bias, w2_bias=m.w2_bias, a_dtype=a_dtype)
    x, _, w, ids = routing(8)
    got = ex(x.to(torch.bfloat16), w, ids)
    # Against exact activations: W4A16 rounds GEMM outputs to bf16 (2^-9; 2.8e-3 measured), W4A8 quantizes
    # both GEMM inputs to e4m3 (about 3.6% rms each; 3.8% measured): bounds 2e-2 and 0.1. A wrong gate/up
    # order gives ~1.36 (measured).
    want = ex.reference()(x.to(torch.bfloat16).float(), w, ids)
    assert rel_err(got, want) < (2e-2 if a_dtype == torch.bfloat16 else 0.1)


@needs_w4a8
@pytest.mark.parametrize("static", [True, False])
def test_w4a8_experts_match_their_reference(static):
    ex = make_experts("w4a8")
    if not static:
        ex = CutlassW4A8Experts(ex.w13_weight, ex.w2_weight, ex.w13_weight_scale_inv, ex.w2_weight_scale_inv)
    x, _, w, ids = routing(9)
    x = x * 0.5   # |x| <= ~2: within the static scale's range (0.02 * 448)
    got = ex(x.to(torch.bfloat16), w, ids)
    # e4m3 at both GEMM inputs (about 3.6% rms each; 4.2% and 4.3% measured): the bound of the FP8 tests
    assert rel_err(got, ex.reference()(x, w, ids)) < 0.1


# ---------------------------------------------------------------------------- checkpoints

def e4m3_block_checkpoint(prefix, scale_name, mode, seed=10):
    """Per-expert e4m3 tensors as DeepSeek-V3 (block, weight_scale_inv [N/128, K/128]) or
    compressed-tensors (channel [N, 1]; tensor: a scalar) store them, and their fp32 dequantization."""
    g = torch.Generator().manual_seed(seed)
    sd, deq = {}, {}
    for e in range(E):
        for name, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            w = torch.randn(n, k, generator=g) / k**0.5
            if mode == "block":
                q, s = quant_fp8(w[None], "block")
                q, s = q[0], s[0]
                d = q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)
            elif mode == "channel":
                s = w.abs().amax(1, keepdim=True) / 448
                q = (w / s).to(FP8)
                d = q.float() * s
            else:
                s = w.abs().amax() / 448
                q = (w / s).to(FP8)
                d = q.float() * s
            sd[f"{prefix}{e}.{name}.weight"] = q
            sd[f"{prefix}{e}.{name}.{scale_name}"] = s.float()
            deq[(e, name)] = d
    w1 = torch.stack([torch.cat([deq[(e, "gate_proj")], deq[(e, "up_proj")]]) for e in range(E)])
    w2 = torch.stack([deq[(e, "down_proj")] for e in range(E)])
    return sd, w1, w2


@pytest.mark.parametrize("mode,scale_name", [("block", "weight_scale_inv"), ("channel", "weight_scale"),
                                             ("tensor", "weight_scale")])
def test_fp8_experts_from_a_per_expert_checkpoint(mode, scale_name, tmp_path):
    prefix = "model.layers.3.mlp.experts."
    sd, w1, w2 = e4m3_block_checkpoint(prefix, scale_name, mode)
    sd["model.layers.3.mlp.gate.weight"] = torch.randn(E, H) / H**0.5
    sd["model.layers.3.mlp.gate.e_score_correction_bias"] = torch.rand(E) * 0.1
    sd["model.layers.2.mlp.experts.0.gate_proj.weight"] = torch.zeros(1)   # other layers are not read
    from safetensors import safe_open
    from safetensors.torch import save_file
    save_file(sd, tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        ex = CutlassFp8Experts.from_checkpoint(f, prefix)
        router = FusedGateRouter.from_checkpoint(f, "model.layers.3.mlp.gate", topk=K, num_expert_group=4, topk_group=2,
                                                 scoring_func="sigmoid")
    assert ex.weight_format == {"block": "fp8 block 128x128", "channel": "fp8 per-channel",
                                "tensor": "fp8 per-channel"}[mode]
    assert torch.equal(router.e_score_correction_bias, sd["model.layers.3.mlp.gate.e_score_correction_bias"])
    layer = MoELayer(router, SingleGpu(E), ex)
    x, *_ = routing(11)
    x = x.to(torch.bfloat16)
    logits = x.float() @ sd["model.layers.3.mlp.gate.weight"].t()
    w, ids = router(logits)
    torch.testing.assert_close(router.gate_logits(x), logits)
    want = dense_moe(x.float(), w, ids, w1, w2)
    # The dequantized weights exactly (only fp32 summation order differs)...
    torch.testing.assert_close(ex.reference()(x.float(), w, ids).double(), want, rtol=1e-5, atol=1e-5)
    # ...and the FP8 layer (cutlass_moe_fp8's CPU reference): it quantizes the activations to e4m3 at both
    # GEMM inputs (3 mantissa bits: per element <= 2^-4 relative, about 3.6% rms each; 4.1-4.3% measured
    # here), so the bound is 0.1; a wrong stacking order or scale placement is off by O(1).
    assert rel_err(layer(x), want) < 0.1


def test_fp8_from_checkpoint_loads_one_ranks_experts_and_mixtral_names():
    prefix = "block_sparse_moe.experts."
    sd, w1, w2 = e4m3_block_checkpoint("p.", "weight_scale", "channel")
    renamed = {k.replace("p.", prefix).replace("gate_proj", "w1").replace("up_proj", "w3").replace("down_proj", "w2"): v
               for k, v in sd.items()}
    ex = CutlassFp8Experts.from_checkpoint(renamed, prefix, names=("w1", "w3", "w2"), experts=range(2, 6))
    assert ex.num_experts == 4
    torch.testing.assert_close(ex.reference().w13_weight, w1[2:6])
    torch.testing.assert_close(ex.reference().w2_weight, w2[2:6])
    with pytest.raises(KeyError, match="no per-expert tensors"):
        CutlassFp8Experts.from_checkpoint(renamed, prefix)   # default names: gate_proj...


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fp8_from_checkpoint_with_static_input_scale_and_interleaved_rows(device):
    """A static FP8 checkpoint (compressed-tensors: per-channel weight scales, per-expert input
    scales): static_input_scale takes the largest down_proj.input_scale as a2_scale; interleave
    reorders w13 and its scales, so the layer gives the same output (on a GPU through the fused
    GEMM1)."""
    from helpers import runs_fused_gemm1

    prefix = "model.layers.0.mlp.experts."
    sd, _, _ = e4m3_block_checkpoint(prefix, "weight_scale", "channel")
    down_scales = torch.rand(E) * 0.05 + 0.01
    for e in range(E):
        for name in ("gate_proj", "up_proj"):
            sd[f"{prefix}{e}.{name}.input_scale"] = torch.tensor(0.02)
        sd[f"{prefix}{e}.down_proj.input_scale"] = down_scales[e]
    plain = CutlassFp8Experts.from_checkpoint(sd, prefix, static_input_scale=True).to(device)
    fused = CutlassFp8Experts.from_checkpoint(sd, prefix, static_input_scale=True, interleave=True).to(device)
    assert torch.equal(plain.w2_input_scale.cpu(), down_scales.max().reshape(1))
    assert fused.gate_up_interleaved and not plain.gate_up_interleaved
    assert torch.equal(fused.w13_weight.view(torch.uint8), moe_kernels.interleave_gate_up(plain.w13_weight.view(torch.uint8)))
    x, _, w, ids = routing(3, n=300)  # 75 rows per expert: the fused GEMM1's range
    x, w, ids = x.to(device, torch.bfloat16), w.to(device), ids.to(device)
    assert torch.equal(fused(x, w, ids), plain(x, w, ids))
    assert CutlassFp8Experts.from_checkpoint(sd, prefix).w2_input_scale is None  # the default: dynamic
    if device == "cuda":
        assert runs_fused_gemm1(lambda: fused(x, w, ids)) and not runs_fused_gemm1(lambda: plain(x, w, ids))


def test_fp8_from_checkpoint_static_and_interleave_errors():
    prefix = "p."
    sd, _, _ = e4m3_block_checkpoint(prefix, "weight_scale", "channel")
    with pytest.raises(KeyError, match=r"p\.0\.down_proj\.input_scale"):
        CutlassFp8Experts.from_checkpoint(sd, prefix, static_input_scale=True)
    with pytest.raises(ValueError, match="interleave=True with gate_up_interleaved=True"):
        CutlassFp8Experts.from_checkpoint(sd, prefix, interleave=True, gate_up_interleaved=True)
    block, _, _ = e4m3_block_checkpoint(prefix, "weight_scale_inv", "block")
    with pytest.raises(ValueError, match="interleave=True needs per-channel or per-tensor weight scales"):
        CutlassFp8Experts.from_checkpoint(block, prefix, interleave=True)


def gpt_oss_checkpoint(prefix, seed=12):
    """gpt-oss's bf16 tensors as transformers' GptOssExperts / GptOssTopKRouter hold them."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}experts.gate_up_proj": (torch.randn(E, H, 2 * I, generator=g) / H**0.5 * 3).to(torch.bfloat16),
        f"{prefix}experts.gate_up_proj_bias": (torch.randn(E, 2 * I, generator=g) * 0.5).to(torch.bfloat16),
        f"{prefix}experts.down_proj": (torch.randn(E, I, H, generator=g) / I**0.5).to(torch.bfloat16),
        f"{prefix}experts.down_proj_bias": (torch.randn(E, H, generator=g) * 0.1).to(torch.bfloat16),
        f"{prefix}router.weight": (torch.randn(E, H, generator=g) / H**0.5).to(torch.bfloat16),
        f"{prefix}router.bias": (torch.randn(E, generator=g) * 0.1).to(torch.bfloat16),
    }


def gpt_oss_formula(x, sd, prefix, gate_up, down, topk=4):
    """transformers' GptOssMLP, written out: router = linear with bias, top-4, softmax over the chosen
    logits; experts x @ gate_up_proj + bias, gate/up interleaved, clamp 7, (up + 1) * gate * sigmoid(1.702 gate)."""
    logits = x.double() @ sd[f"{prefix}router.weight"].double().t() + sd[f"{prefix}router.bias"].double()
    top, ids = logits.topk(topk, -1)
    w = torch.softmax(top, -1)
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(topk):
            e = int(ids[t, k])
            gu = x[t].double() @ gate_up[e].double() + sd[f"{prefix}experts.gate_up_proj_bias"][e].double()
            gate, up = gu[::2].clamp(max=7.0), gu[1::2].clamp(-7.0, 7.0)
            y = ((up + 1) * gate * torch.sigmoid(1.702 * gate)) @ down[e].double() + sd[f"{prefix}experts.down_proj_bias"][e].double()
            out[t] += w[t, k] * y
    return out, ids


def test_gpt_oss_bf16_checkpoint():
    prefix = "model.layers.0.mlp."
    sd = gpt_oss_checkpoint(prefix)
    layer = MoELayer(FusedGateRouter.from_checkpoint(sd, prefix + "router.", topk=4),
                     SingleGpu(E), TorchExperts.from_checkpoint(sd, prefix + "experts."))
    ex = layer.experts
    assert ex.activation == "swigluoai" and ex.gate_up_interleaved and ex.w13_weight.shape == (E, 2 * I, H)
    x = routing(13)[0]
    want, ids = gpt_oss_formula(x, sd, prefix, sd[f"{prefix}experts.gate_up_proj"], sd[f"{prefix}experts.down_proj"])
    _, got_ids = layer.router(layer.router.gate_logits(x))
    assert torch.equal(got_ids.sort(-1).values, ids.to(torch.int32).sort(-1).values)
    # bf16 weights, fp32 compute against float64
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-4, atol=1e-4)


def mxfp4_checkpoint(prefix, seed=14):
    g = torch.Generator().manual_seed(seed)
    sd = {
        f"{prefix}experts.gate_up_proj_blocks": torch.randint(0, 256, (E, 2 * I, H // 32, 16), dtype=torch.uint8, generator=g),
        f"{prefix}experts.gate_up_proj_scales": torch.randint(119, 125, (E, 2 * I, H // 32), dtype=torch.uint8, generator=g),
        f"{prefix}experts.down_proj_blocks": torch.randint(0, 256, (E, H, I // 32, 16), dtype=torch.uint8, generator=g),
        f"{prefix}experts.down_proj_scales": torch.randint(119, 125, (E, H, I // 32), dtype=torch.uint8, generator=g),
    }
    full = gpt_oss_checkpoint(prefix, seed)
    for k in ("experts.gate_up_proj_bias", "experts.down_proj_bias", "router.weight", "router.bias"):
        sd[prefix + k] = full[prefix + k]
    return sd


def dequant_like_transformers(blocks, scales):
    """[E, N, K/32, 16] + [E, N, K/32] -> [E, K, N] (the bf16 layout), as transformers'
    convert_moe_packed_tensors writes it: low nibble first, ldexp by scale - 127, then transposed."""
    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    b = blocks.long()
    v = torch.empty(*blocks.shape[:-1], 32)
    v[..., 0::2], v[..., 1::2] = lut[b & 15], lut[b >> 4]
    v = torch.ldexp(v, (scales.int() - 127).unsqueeze(-1))
    return v.reshape(*blocks.shape[:2], -1).transpose(1, 2)


def test_mxfp4_gpt_oss_checkpoint():
    prefix = "model.layers.1.mlp."
    sd = mxfp4_checkpoint(prefix)
    ex = CutlassMxfp4Experts.from_checkpoint(sd, prefix + "experts")
    assert ex.w13_weight.shape == (E, 2 * I, H // 2) and ex.w13_weight.dtype == torch.uint8
    assert ex.w13_bias.dtype == torch.float32 and ex.activation == "swigluoai" and ex.gate_up_interleaved
    gate_up = dequant_like_transformers(sd[f"{prefix}experts.gate_up_proj_blocks"], sd[f"{prefix}experts.gate_up_proj_scales"])
    down = dequant_like_transformers(sd[f"{prefix}experts.down_proj_blocks"], sd[f"{prefix}experts.down_proj_scales"])
    try:   # the layout's authority, where this transformers has it
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
        assert torch.equal(convert_moe_packed_tensors(sd[f"{prefix}experts.gate_up_proj_blocks"],
                                                      sd[f"{prefix}experts.gate_up_proj_scales"], dtype=torch.float32), gate_up)
    except ImportError:
        pass
    x = routing(15)[0]
    want, _ = gpt_oss_formula(x, sd, prefix, gate_up, down)
    router = FusedGateRouter.from_checkpoint(sd, prefix + "router.", topk=4)
    ref = MoELayer(router, SingleGpu(E), ex.reference())
    # E2M1 x 2^k weights are exact in fp32: only summation order differs
    torch.testing.assert_close(ref(x).double(), want, rtol=1e-4, atol=1e-4)
    if HAS_MXFP4:   # the op's CPU reference (branch fp4): bf16 activations and GEMM outputs (2^-9)
        got = MoELayer(router, SingleGpu(E), ex)(x.to(torch.bfloat16))
        assert rel_err(got, want) < 2e-2


def test_w4a8_per_expert_checkpoint():
    """DeepSeek-R1 W4AFP8-style tensors: int8 [N, K/2] (low nibble the even element, signed),
    weight_scale_inv [N, K/128], input_scale per expert (the maximum is taken)."""
    g = torch.Generator().manual_seed(22)
    prefix, sd, deq = "model.layers.5.mlp.experts.", {}, {}
    for e in range(E):
        for name, (n, k) in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            q = torch.randint(-8, 8, (n, k), generator=g)
            s = torch.rand(n, k // 128, generator=g) / 32 + 1e-3
            packed = ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).to(torch.uint8).view(torch.int8)
            sd[f"{prefix}{e}.{name}.weight"] = packed
            sd[f"{prefix}{e}.{name}.weight_scale_inv"] = s.to(torch.bfloat16)
            sd[f"{prefix}{e}.{name}.input_scale"] = torch.rand((), generator=g) * 0.01 + 0.001
            deq[(e, name)] = q.float() * s.to(torch.bfloat16).float().repeat_interleave(128, 1)
    ex = CutlassW4A8Experts.from_checkpoint(sd, prefix)
    assert ex.w13_weight.dtype == torch.int8 and ex.w13_weight_scale_inv.dtype == torch.float32
    want_a1 = max(float(sd[f"{prefix}{e}.{n}.input_scale"]) for e in range(E) for n in ("gate_proj", "up_proj"))
    assert ex.w13_input_scale.item() == pytest.approx(want_a1, rel=0, abs=0)
    assert ex.w2_input_scale.item() == max(float(sd[f"{prefix}{e}.down_proj.input_scale"]) for e in range(E))
    assert CutlassW4A8Experts.from_checkpoint(sd, prefix, static_input_scales=False).w13_input_scale is None
    w1 = torch.stack([torch.cat([deq[(e, "gate_proj")], deq[(e, "up_proj")]]) for e in range(E)])
    w2 = torch.stack([deq[(e, "down_proj")] for e in range(E)])
    x, _, w, ids = routing(23)
    # int4 x scale is exact in fp32: only summation order differs
    torch.testing.assert_close(ex.reference()(x, w, ids).double(), dense_moe(x, w, ids, w1, w2), rtol=1e-5, atol=1e-5)


def test_from_checkpoint_names_the_missing_tensor():
    sd = gpt_oss_checkpoint("m.")
    del sd["m.experts.down_proj"]
    with pytest.raises(KeyError, match="m.experts.down_proj"):
        TorchExperts.from_checkpoint(sd, "m.experts.")
    with pytest.raises(ValueError, match="use CutlassMxfp4Experts.from_checkpoint"):
        TorchExperts.from_checkpoint(mxfp4_checkpoint("m."), "m.experts.")


# ---------------------------------------------------------------------------- torch.compile

class Model(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = nn.Linear(H, H)
        self.moe = layer

    def forward(self, x):
        return self.moe(self.proj(x.float()).to(x.dtype))


@pytest.mark.parametrize("kind", ["torch", "torch_oai", "fp8_channel", "fp8_block"])
def test_compile_fullgraph_traces_without_graph_breaks(kind):
    """fullgraph=True raises at the first graph break. TorchExperts takes its sync-free path under
    compile (every expert on every row, kept by mask); the FP8 experts' op has a fake kernel (its CPU
    reference runs)."""
    torch._dynamo.reset()
    model = Model(make_layer(kind))
    x = routing(16)[0]
    x = x.to(torch.bfloat16) if kind.startswith("fp8") else x
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    if kind.startswith("fp8"):
        assert torch.equal(compiled, eager)
    else:  # the compiled TorchExperts computes each row in a full-size matmul: fp32 rounding only
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GPU

@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["fp8_expert", "fp8_channel", "fp8_block"])
@pytest.mark.parametrize("with_gate", [False, True])
def test_compiled_layer_equals_eager_on_cuda(kind, with_gate):
    torch._dynamo.reset()
    layer = make_layer(kind, with_gate=with_gate).cuda()
    x, logits, _, _ = routing(17, n=200)
    x, logits = x.to(torch.bfloat16).cuda(), logits.cuda()
    args = (x,) if with_gate else (x, logits)
    with torch.no_grad():
        eager = layer(*args)
        compiled = torch.compile(layer, fullgraph=True)(*args)
    if with_gate:   # inductor may compute the gate's fp32 matmul differently: near-ties could flip a choice
        assert rel_err(compiled, eager) < 1e-2
    else:           # only the library's ops in the graph: the same kernels, the same bits
        assert torch.equal(compiled, eager)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["fp8_channel", "fp8_block"])
def test_layer_moved_to_cuda_matches_the_cpu_layer(kind):
    layer = make_layer(kind)
    x = routing(18)[0].to(torch.bfloat16)
    cpu = layer(x)
    layer.cuda()
    assert all(t.is_cuda for t in layer.state_dict().values())
    # CUTLASS GEMMs against the CPU reference: fp32 accumulation order and bf16 output rounding
    assert rel_err(layer(x.cuda()).cpu(), cpu) < 1e-2


@pytest.mark.cuda
@needs_act
def test_cutlass_fp8_experts_swigluoai_with_biases_on_cuda():
    x, _, w, ids = routing(19, n=100)
    w1, w2, b1, b2 = float_weights(20)
    q1, s1 = quant_fp8(w1, "block")
    q2, s2 = quant_fp8(w2, "block")
    ex = CutlassFp8Experts(q1, q2, s1, s2, activation="swigluoai", gate_up_interleaved=True, w1_bias=b1 * 5,
                           w2_bias=b2 * 5)
    want = ex.reference()(x, w, ids)
    got = ex.cuda()(x.to(torch.bfloat16).cuda(), w.cuda(), ids.cuda())
    assert rel_err(got.cpu(), want) < 0.1   # the bound of the CPU test above, same reasoning
