"""The HF transformers integration (moe_kernels.integrations.transformers): tiny random Qwen3-MoE,
Mixtral, DeepSeek-V3 and gpt-oss models give eager's logits with "moe_kernels" and close ones with
"moe_kernels_fp8" (gpt-oss: interleaved swigluoai experts with fp32 biases); every experts layout
HF declares; errors naming what is unsupported; the opt-in fused router; the FP8-checkpoint path;
the example script."""

import inspect
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers", minversion="5.0")
moe_integration = pytest.importorskip("transformers.integrations.moe")

from fp8_helpers import rel_error  # noqa: E402
from test_cutlass_moe import fake_quant  # noqa: E402

import moe_kernels as moe_kernels_pkg  # noqa: E402
from moe_kernels.integrations import hf_experts_fp8  # noqa: E402
from moe_kernels.integrations.transformers import (  # noqa: E402
    EXPERTS_IMPLEMENTATIONS,
    FP8_EXPERTS_IMPLEMENTATIONS,
    FUSED_ROUTERS,
    register,
    restore_router,
    use_fused_router,
)

ExpertsInterface = moe_integration.ExpertsInterface
use_experts_implementation = moe_integration.use_experts_implementation
ROOT = Path(__file__).resolve().parent.parent

register()

# Tiny configurations: 2 layers, hidden 64, few experts. Dimensions are multiples of 16 so that
# the FP8 layer (K % 16, N % 8) and torch._grouped_mm (16-byte strides) take them.
ARCHS = {  # name: (config class name, arguments)
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(
        vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=2,
        topk_group=1, num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5)),
}

# The FP8 layer's own tolerance (tests/test_cutlass_moe.py): against a reference with the same
# quantization points, what differs is fp32 vs float64 sums, bf16 intermediates and the odd e4m3
# rounding that flips: well under 3e-2.
FP8_SAME_QUANT_TOL = 3e-2
# Against unquantized eager: e4m3 keeps 3 mantissa bits, a rounding error of ~2.4% rms of the
# value; a product of two quantized operands ~3.4%, which a dot product of random terms keeps as
# its relative error. GEMM1 is off by ~3.4%, silu(gate) * up by ~4.8% (two such factors), and
# GEMM2 adds its own ~3.4% on top: ~6% for the layer, as measured (5.5-6.5% on the logits of the
# models below, 3 seeds each). 1e-1 still catches a wrong scale, layout or gate (errors of order
# 1); the 3e-2 comparison above is the precise check.
FP8_VS_EAGER_TOL = 1e-1


def randomize(model: nn.Module) -> nn.Module:
    """Experts and routers with weights of unit-scale outputs: HF's init (std 0.02) leaves the experts'
    contribution far below rounding of the residual stream and the routing near uniform, which
    would hide a wrong expert or weight; DeepSeek's correction bias random so that it matters."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
                m.gate_up_proj.normal_(0, 1 / math.sqrt(m.gate_up_proj.shape[-1]))
                m.down_proj.normal_(0, 1 / math.sqrt(m.down_proj.shape[-1]))
            if type(m).__name__ in FUSED_ROUTERS:
                m.weight.normal_(0, 1 / math.sqrt(m.weight.shape[-1]))
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.normal_(0, 0.1)
    return model


def make_model(arch, dtype=torch.float32, device="cpu", **config):
    config_class, arguments = ARCHS[arch]
    config = getattr(transformers, config_class)(**{**arguments, **config})
    model = transformers.AutoModelForCausalLM.from_config(config)
    return randomize(model).to(device=device, dtype=dtype).eval()


def logits(model, implementation, input_ids):
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        return model(input_ids).logits.float()


def tokens(batch=2, length=6, device="cpu"):
    return torch.randint(0, 128, (batch, length), device=device)


# ----------------------------------------------------------------------------------------- register


def test_register_adds_the_names_and_is_idempotent():
    register()
    register()
    interface = ExpertsInterface()
    for name, forward in EXPERTS_IMPLEMENTATIONS.items():
        assert interface[name] is forward
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    fp8_interface = fp8.FP8ExpertsInterface()
    assert fp8_interface["moe_kernels"] is FP8_EXPERTS_IMPLEMENTATIONS["moe_kernels"]
    # The built-ins are still there, and each name is listed once.
    assert {"grouped_mm", "batched_mm"} <= set(interface)
    assert sorted(interface).count("moe_kernels") == 1


def test_unknown_implementation_is_still_rejected():
    model = make_model("qwen3_moe")
    with pytest.raises((ValueError, KeyError)):
        model.set_experts_implementation("moe_kernels_typo")


# ---------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_eager(arch):
    model = make_model(arch)
    ids = tokens()
    want = logits(model, "eager", ids)
    got = logits(model, "moe_kernels", ids)
    # fp32 throughout; only the summation order differs (fp32 combine in k order vs index_add_ in
    # expert order): ~1e-7 relative.
    assert rel_error(got, want) < 1e-4


# Models whose only MoE layer is the last: an earlier layer's FP8 error would move the next
# router's inputs, and near-tied tokens would then pick other experts, an O(1) change that says
# nothing about the FP8 layer (measured: 10-16% logit error with two MoE layers, 3-5% with one).
ONE_MOE_LAYER = {"qwen3_moe": {"mlp_only_layers": [0]}, "mixtral": {"num_hidden_layers": 1}, "deepseek_v3": {}}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fp8_logits_close_to_eager(arch):
    model = make_model(arch, **ONE_MOE_LAYER[arch])
    ids = tokens()
    want = logits(model, "eager", ids)
    got = logits(model, "moe_kernels_fp8", ids)
    assert got.isfinite().all()
    assert rel_error(got, want) < FP8_VS_EAGER_TOL


def test_generate_matches_eager():
    model = make_model("qwen3_moe")
    ids = tokens(batch=1, length=4)
    outs = {}
    for implementation in ("eager", "moe_kernels"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            outs[implementation] = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                                  pad_token_id=0)
    assert torch.equal(outs["eager"], outs["moe_kernels"])


def test_experts_take_zero_tokens():
    model = make_model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.config._experts_implementation = "moe_kernels"
    out = experts(torch.randn(0, 64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    assert out.shape == (0, 64)


# ----------------------------------------------------------------------------- layout variants


def _config(hidden_act="silu"):
    return types.SimpleNamespace(_experts_implementation="eager", hidden_act=hidden_act)


def _toy_experts(E=4, H=32, I=16, hidden_act="silu", **declared):
    """An experts module with the layout declared to use_experts_implementation; its eager forward
    is the specification: one token and one choice at a time."""
    has_gate = declared.get("has_gate", True)
    has_bias = declared.get("has_bias", False)
    transposed = declared.get("is_transposed", False)
    concatenated = declared.get("is_concatenated", True)
    post_norm = declared.get("has_post_expert_norm", False)

    class ToyExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            self.act_fn = transformers.activations.ACT2FN[config.hidden_act]
            up = 2 * I if has_gate else I
            w_up = torch.randn(E, up, H) / H**0.5
            w_down = torch.randn(E, H, I) / I**0.5
            if transposed:
                w_up, w_down = w_up.transpose(1, 2).contiguous(), w_down.transpose(1, 2).contiguous()
            name = "gate_up_proj" if has_gate else "up_proj"
            setattr(self, name, nn.Parameter(w_up))
            self.down_proj = nn.Parameter(w_down)
            if has_bias:
                setattr(self, name + "_bias", nn.Parameter(torch.randn(E, up)))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H))
            if post_norm:
                self.post_expert_norm = nn.LayerNorm(H)
                nn.init.normal_(self.post_expert_norm.weight)

        if not concatenated:
            def _apply_gate(self, h):
                return self.act_fn(h[..., 0::2]) * h[..., 1::2]

        def _linear(self, x, w, b):
            y = x @ w if transposed else x @ w.T
            return y + b if b is not None else y

        def forward(self, x, top_k_index, top_k_weights):
            w_up = self.gate_up_proj if has_gate else self.up_proj
            b_up = (self.gate_up_proj_bias if has_gate else self.up_proj_bias) if has_bias else None
            out = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for k in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, k])
                    if e >= self.num_experts:  # an expert-parallel sentinel
                        continue
                    h = self._linear(x[t], w_up[e], None if b_up is None else b_up[e])
                    h = self._apply_gate(h) if has_gate else self.act_fn(h)
                    y = self._linear(h, self.down_proj[e], self.down_proj_bias[e] if has_bias else None)
                    if post_norm:
                        y = self.post_expert_norm(y)
                    out[t] += top_k_weights[t, k] * y
            return out

    supported = inspect.signature(use_experts_implementation).parameters
    missing = [name for name in declared if name not in supported]
    if missing:
        pytest.skip(f"transformers {transformers.__version__} has no {missing} in use_experts_implementation")
    return use_experts_implementation(ToyExperts, **declared)(_config(hidden_act))


def _routing(T, K, E):
    ids = torch.rand(T, E).argsort(dim=1)[:, :K]
    return ids, torch.softmax(torch.randn(T, K), dim=-1)


def _run(module, implementation, x, ids, w):
    module.config._experts_implementation = implementation
    with torch.no_grad():
        return module(x, ids, w)


LAYOUTS = {
    "default": {},
    "transposed": {"is_transposed": True},
    "bias": {"has_bias": True},
    "transposed_bias": {"is_transposed": True, "has_bias": True},
    "interleaved": {"is_concatenated": False},
    "no_gate": {"has_gate": False},
    "post_expert_norm": {"has_post_expert_norm": True},
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_eager(layout):
    module = _toy_experts(**LAYOUTS[layout])
    x = torch.randn(13, 32)
    ids, w = _routing(13, 2, 4)
    assert rel_error(_run(module, "moe_kernels", x, ids, w), _run(module, "eager", x, ids, w)) < 1e-5


@pytest.mark.parametrize("hidden_act", ["gelu", "relu"])
def test_any_activation_matches_eager(hidden_act):
    module = _toy_experts(hidden_act=hidden_act)
    x = torch.randn(9, 32)
    ids, w = _routing(9, 2, 4)
    assert rel_error(_run(module, "moe_kernels", x, ids, w), _run(module, "eager", x, ids, w)) < 1e-5


def test_gpt_oss_experts_match_eager():
    # A real class declaring interleaved, transposed, biased experts with a clamped SwiGLU.
    config = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4,
                                       num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=16, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    experts = model.model.layers[0].mlp.experts
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(11, 32)
    ids, w = _routing(11, 2, 4)
    assert rel_error(_run(experts, "moe_kernels", x, ids, w), _run(experts, "eager", x, ids, w)) < 1e-5


def test_expert_parallel_sentinels_are_dropped():
    # HF's expert parallelism gives other ranks' choices the id E with weight 0.
    module = _toy_experts()
    module._is_expert_parallel = True
    x = torch.randn(10, 32)
    ids, w = _routing(10, 2, 4)
    ids[::3, 1] = 4
    w[::3, 1] = 0
    want = _run(module, "eager", x, ids, w)
    assert rel_error(_run(module, "moe_kernels", x, ids, w), want) < 1e-5
    assert rel_error(_run(module, "moe_kernels_fp8", x, ids, w), want) < FP8_VS_EAGER_TOL


# ------------------------------------------------------------------------------------ FP8 (bf16)


def _quantize_per_channel(w):
    w = w.float()
    scale = w.abs().amax(dim=2).clamp(min=1e-12) / 448.0
    return (w / scale[:, :, None]).to(torch.float8_e4m3fn).double() * scale[:, :, None].double()


def _same_quant_reference(module, x, ids, w, spec=None):
    """float64 experts with the weights rounded to e4m3 per output channel and the activations
    per token, where the FP8 layer quantizes them (GEMM1's and GEMM2's outputs rounded to bf16 as
    the layer writes them, the biases added after that in fp32); the gate is `spec`'s formula
    (silu on halves by default), in fp32 on the bias-added values."""
    spec = spec or hf_experts_fp8.GateSpec()
    w_up, w_down = module.gate_up_proj.detach(), module.down_proj.detach()
    if getattr(module, "is_transposed", False):
        w_up, w_down = w_up.transpose(1, 2), w_down.transpose(1, 2)
    w1, w2 = _quantize_per_channel(w_up), _quantize_per_channel(w_down)
    has_bias = getattr(module, "has_bias", False)
    b1 = module.gate_up_proj_bias.detach().float() if has_bias else None
    b2 = module.down_proj_bias.detach().float() if has_bias else None
    xq = fake_quant(x.to(torch.bfloat16), per_token=True)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = (xq[t:t + 1] @ w1[e].T).to(torch.bfloat16).float()
            if b1 is not None:
                h = h + b1[e]
            y = spec.formula(h.double())
            o = (fake_quant(y, per_token=True) @ w2[e].T).to(torch.bfloat16).float()
            if b2 is not None:
                o = o + b2[e]
            out[t] += w[t, k].double() * o[0].double()
    return out


def test_fp8_experts_match_quantized_reference():
    module = _toy_experts(E=4, H=64, I=32)
    x = torch.randn(17, 64)
    ids, w = _routing(17, 2, 4)
    got = _run(module, "moe_kernels_fp8", x, ids, w)
    assert got.dtype == x.dtype
    assert rel_error(got, _same_quant_reference(module, x, ids, w)) < FP8_SAME_QUANT_TOL


def test_fp8_weights_cached_and_refreshed_when_they_change():
    module = _toy_experts(E=4, H=64, I=32)
    x = torch.randn(8, 64)
    ids, w = _routing(8, 2, 4)
    first = _run(module, "moe_kernels_fp8", x, ids, w)
    cached = hf_experts_fp8.per_channel_fp8_weights(module, hf_experts_fp8.ExpertsLayout.of(module))
    assert hf_experts_fp8.per_channel_fp8_weights(module, hf_experts_fp8.ExpertsLayout.of(module)) is cached
    with torch.no_grad():
        module.down_proj.mul_(-2)  # in place: same storage, new version
    second = _run(module, "moe_kernels_fp8", x, ids, w)
    # Scaling the weights by a power of two scales the e4m3 values' scales exactly.
    torch.testing.assert_close(second, -2 * first, rtol=0, atol=0)
    module.gate_up_proj = nn.Parameter(torch.randn_like(module.gate_up_proj) / 8)  # replaced
    third = _run(module, "moe_kernels_fp8", x, ids, w)
    assert rel_error(third, _same_quant_reference(module, x, ids, w)) < FP8_SAME_QUANT_TOL


def test_fp8_transposed_weights():
    module = _toy_experts(E=4, H=64, I=32, is_transposed=True)
    x = torch.randn(12, 64)
    ids, w = _routing(12, 2, 4)
    want = _run(module, "eager", x, ids, w)
    assert rel_error(_run(module, "moe_kernels_fp8", x, ids, w), want) < FP8_VS_EAGER_TOL


@pytest.mark.parametrize("declared,spec", [
    ({"hidden_act": "gelu"}, ("gelu", False)),
    ({"is_concatenated": False}, ("silu", True)),  # the toy's own gate on interleaved values
    ({"is_concatenated": False, "hidden_act": "gelu"}, ("gelu", True)),
    ({"has_bias": True}, ("silu", False)),
    ({"has_bias": True, "is_transposed": True, "hidden_act": "gelu"}, ("gelu", False)),
])
def test_fp8_gates_layouts_and_biases_match_quantized_reference(declared, spec):
    module = _toy_experts(E=4, H=64, I=32, **declared)
    x = torch.randn(17, 64)
    ids, w = _routing(17, 2, 4)
    got = _run(module, "moe_kernels_fp8", x, ids, w)
    want_spec = hf_experts_fp8.GateSpec(*spec)
    assert hf_experts_fp8.gate_spec(module, hf_experts_fp8.ExpertsLayout.of(module), "x") == want_spec
    assert rel_error(got, _same_quant_reference(module, x, ids, w, want_spec)) < FP8_SAME_QUANT_TOL
    assert rel_error(got, _run(module, "eager", x, ids, w)) < FP8_VS_EAGER_TOL


@pytest.mark.parametrize("declared,match", [
    ({"hidden_act": "relu"}, "ReLU.*'relu'.*only silu\\(gate\\) \\* up, gelu\\(gate\\) \\* up"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "GELUTanh.*'gelu_pytorch_tanh'"),
    ({"is_concatenated": False, "hidden_act": "relu"}, "own gate function ToyExperts._apply_gate.*checked on a probe"),
    ({"has_gate": False}, "has_gate=False"),
    ({"has_post_expert_norm": True}, "has_post_expert_norm=True"),
])
def test_fp8_rejects_what_it_cannot_compute(declared, match):
    module = _toy_experts(E=4, H=64, I=32, **declared)
    x = torch.randn(4, 64)
    ids, w = _routing(4, 2, 4)
    with pytest.raises(ValueError, match=match):
        _run(module, "moe_kernels_fp8", x, ids, w)


def test_fp8_unsupported_activation_in_a_model_is_named():
    model = make_model("mixtral", hidden_act="relu")
    ids = tokens()
    with pytest.raises(ValueError, match='"moe_kernels_fp8": MixtralExperts uses the activation ReLU'):
        logits(model, "moe_kernels_fp8", ids)
    # The bf16 implementation runs the module's own activation.
    assert rel_error(logits(model, "moe_kernels", ids), logits(model, "eager", ids)) < 1e-4


# ------------------------------------------------------------------------------------- gpt-oss

# Tiny gpt-oss: H = 64 and I = 48 (multiples of 16, not of 128, as gpt-oss's 2880), top-4 of 8
# experts, one decoder layer (its MoE last, so that FP8 noise cannot flip a later router's choice).
GPT_OSS = dict(vocab_size=128, hidden_size=64, intermediate_size=48, num_local_experts=8, num_experts_per_tok=4,
               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def make_gpt_oss(device="cpu", dtype=torch.float32):
    """Experts with GEMM1 outputs of std ~4 (many beyond the +-7 clamps, so that they bite), unit
    biases (as large as the GEMM outputs: a missing bias cannot hide) and a router with a bias."""
    model = transformers.AutoModelForCausalLM.from_config(transformers.GptOssConfig(**GPT_OSS)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "GptOssExperts":
                m.gate_up_proj.normal_(0, 4 / math.sqrt(m.gate_up_proj.shape[1]))  # [E, H, 2I]: fan-in H
                m.down_proj.normal_(0, 1 / math.sqrt(m.down_proj.shape[1]))
                m.gate_up_proj_bias.normal_(0, 1)
                m.down_proj_bias.normal_(0, 1)
            if type(m).__name__ == "GptOssTopKRouter":
                m.weight.normal_(0, 1 / math.sqrt(m.weight.shape[-1]))
                m.bias.normal_(0, 0.5)
    return model.to(device=device, dtype=dtype)


def test_gpt_oss_gate_is_recognized_as_interleaved_swigluoai():
    experts = make_gpt_oss().model.layers[0].mlp.experts
    spec = hf_experts_fp8.gate_spec(experts, hf_experts_fp8.ExpertsLayout.of(experts), "moe_kernels_fp8")
    assert spec == hf_experts_fp8.GateSpec("swigluoai", True, 1.702, 7.0)


def test_gpt_oss_fp8_experts_match_quantized_reference():
    experts = make_gpt_oss().model.layers[0].mlp.experts
    x = torch.randn(19, 64)
    ids, w = _routing(19, 4, 8)
    got = _run(experts, "moe_kernels_fp8", x, ids, w)
    spec = hf_experts_fp8.GateSpec("swigluoai", True, 1.702, 7.0)
    want = _same_quant_reference(experts, x, ids, w, spec)
    assert rel_error(got, want) < FP8_SAME_QUANT_TOL
    # The clamps bite on this data: without them the reference moves far beyond the tolerance.
    unclamped = _same_quant_reference(experts, x, ids, w, spec._replace(swiglu_limit=1e9))
    assert rel_error(got, unclamped) > 3 * FP8_SAME_QUANT_TOL


def test_gpt_oss_logits():
    # bf16 path: eager's arithmetic (the module's own gate, biases per row's expert); FP8 path:
    # within the FP8 layer's error against unquantized eager (FP8_VS_EAGER_TOL's derivation; 5.7%
    # measured here, a missing bias or clamp gives far more).
    model = make_gpt_oss()
    ids = tokens()
    want = logits(model, "eager", ids)
    assert rel_error(logits(model, "moe_kernels", ids), want) < 1e-4
    got = logits(model, "moe_kernels_fp8", ids)
    assert got.isfinite().all()
    assert rel_error(got, want) < FP8_VS_EAGER_TOL


@pytest.mark.cuda
def test_cuda_gpt_oss_fp8_experts_match_quantized_reference():
    experts = make_gpt_oss("cuda").model.layers[0].mlp.experts
    x = torch.randn(40, 64)
    ids, w = _routing(40, 4, 8)
    got = _run(experts, "moe_kernels_fp8", x.cuda(), ids.cuda(), w.cuda())
    spec = hf_experts_fp8.GateSpec("swigluoai", True, 1.702, 7.0)
    assert rel_error(got.cpu(), _same_quant_reference(experts.cpu(), x, ids, w, spec)) < FP8_SAME_QUANT_TOL


@pytest.mark.cuda
def test_cuda_gpt_oss_logits():
    model = make_gpt_oss("cuda", torch.bfloat16)
    ids = tokens(device="cuda")
    want = logits(model, "eager", ids)
    assert rel_error(logits(model, "moe_kernels", ids), want) < BF16_TOL
    assert rel_error(logits(model, "moe_kernels_fp8", ids), want) < FP8_VS_EAGER_TOL


# ----------------------------------------------------------------- gpt-oss MXFP4 checkpoints

MXFP4_GPT_OSS = dict(GPT_OSS, intermediate_size=96)  # H = 64, I = 96: multiples of 32, not of 128


def write_mxfp4_gpt_oss(directory):
    """A tiny gpt-oss MXFP4 checkpoint as OpenAI's are stored: the experts' weights as
    ``*_blocks`` [E, N, K/32, 16] uint8 (random E2M1 codes) and ``*_scales`` [E, N, K/32] uint8
    (E8M0 around 2^-4: GEMM1 outputs of std ~4, beyond swigluoai's clamps), unit random biases,
    config.json with quantization_config mxfp4. Returns the tensors written."""
    from safetensors.torch import save_file

    config = transformers.GptOssConfig(**MXFP4_GPT_OSS)
    model = randomize(transformers.AutoModelForCausalLM.from_config(config))
    with torch.no_grad():
        model.model.layers[0].mlp.router.bias.normal_(0, 0.5)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
    for name in list(tensors):
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            N, K = (2 * I, H) if name.endswith("gate_up_proj") else (H, I)
            del tensors[name]
            tensors[name + "_blocks"] = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8)
            tensors[name + "_scales"] = torch.randint(122, 125, (E, N, K // 32), dtype=torch.uint8)
        elif "experts" in name and name.endswith("_bias"):
            tensors[name] = torch.randn_like(tensors[name])
    save_file(tensors, str(directory / "model.safetensors"))
    config.quantization_config = {"quant_method": "mxfp4"}
    config.save_pretrained(directory)
    return tensors


def load_mxfp4_gpt_oss(directory):
    # Without a GPU (and its Triton kernels) transformers dequantizes MXFP4 at load; saying so
    # explicitly also works where accelerate or the `kernels` package are missing.
    # .float(): transformers 5.17 (the GPU machine's) leaves the dequantized experts in bf16 beside an
    # fp32 model, and its own eager forward then fails on the dtype mismatch; bf16 -> fp32 is exact.
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=transformers.Mxfp4Config(dequantize=True)).float().eval()


needs_mxfp4 = pytest.mark.skipif(not hasattr(moe_kernels_pkg, "cutlass_moe_mxfp4"),
                                 reason="this build of moe_kernels has no cutlass_moe_mxfp4")


@needs_mxfp4
def test_mxfp4_gpt_oss_checkpoint_runs_through_cutlass_moe_mxfp4(tmp_path):
    from moe_kernels.integrations.transformers import use_mxfp4_experts
    from moe_kernels.modular.checkpoint import dequantize_mxfp4

    tensors = write_mxfp4_gpt_oss(tmp_path)
    model = load_mxfp4_gpt_oss(tmp_path)
    experts = model.model.layers[0].mlp.experts
    prefix = "model.layers.0.mlp.experts."
    E, N = tensors[prefix + "gate_up_proj_scales"].shape[:2]
    # transformers' dequantization is the same function of the same bytes (exact in fp32).
    w1 = dequantize_mxfp4(tensors[prefix + "gate_up_proj_blocks"].reshape(E, N, -1),
                          tensors[prefix + "gate_up_proj_scales"])
    assert torch.equal(experts.gate_up_proj.float(), w1.transpose(1, 2))
    ids = tokens()
    want = logits(model, "eager", ids)  # eager on the dequantized weights: the same weights exactly
    assert use_mxfp4_experts(model, tmp_path) == ["model.layers.0.mlp.experts"]
    assert model.config._experts_implementation == "moe_kernels_mxfp4"
    with torch.no_grad():
        got = model(ids).logits.float()
    # W4A16: the same weights, bf16 activations and bf16 GEMM outputs (eager stays fp32 here):
    # a few bf16 roundings, 0.3% measured; BF16_TOL as for the bf16 path.
    assert rel_error(got, want) < BF16_TOL
    # The experts alone, with the same routing, against eager on the dequantized weights.
    x = torch.randn(21, 64)
    ids_, w = _routing(21, 4, 8)
    assert rel_error(_run(experts, "moe_kernels_mxfp4", x, ids_, w), _run(experts, "eager", x, ids_, w)) < BF16_TOL


@needs_mxfp4
def test_mxfp4_w4a8_and_errors(tmp_path):
    from moe_kernels.integrations.transformers import use_mxfp4_experts

    write_mxfp4_gpt_oss(tmp_path)
    model = load_mxfp4_gpt_oss(tmp_path)
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(21, 64)
    ids, w = _routing(21, 4, 8)
    with pytest.raises(ValueError, match='"moe_kernels_mxfp4": GptOssExperts has no MXFP4 weights; call '
                                         r".*use_mxfp4_experts\(model, checkpoint\)"):
        _run(experts, "moe_kernels_mxfp4", x, ids, w)
    use_mxfp4_experts(model, tmp_path / "model.safetensors", a_dtype=torch.float8_e4m3fn)
    # e4m3 activations before both GEMMs: the FP8 tolerance against unquantized eager.
    assert rel_error(_run(experts, "moe_kernels_mxfp4", x, ids, w), _run(experts, "eager", x, ids, w)) < FP8_VS_EAGER_TOL
    with pytest.raises(ValueError, match="use_mxfp4_experts: the checkpoint holds no .*gate_up_proj_blocks"):
        use_mxfp4_experts(model, {})
    # Same module names, other experts (Mixtral: 4 experts, H = 64, I = 32): named, not loaded.
    with pytest.raises(ValueError, match=r"use_mxfp4_experts: model.layers.0.mlp.experts \(MixtralExperts\) has "
                                         r"E=4, 2I=64, H=64.*the checkpoint's are \[8, 192, 32\]"):
        use_mxfp4_experts(make_model("mixtral"), tmp_path)


@pytest.mark.cuda
@needs_mxfp4
def test_cuda_mxfp4_gpt_oss_checkpoint(tmp_path):
    from moe_kernels.integrations.transformers import use_mxfp4_experts

    write_mxfp4_gpt_oss(tmp_path)
    model = load_mxfp4_gpt_oss(tmp_path).cuda()
    ids = tokens(device="cuda")
    want = logits(model, "eager", ids)
    use_mxfp4_experts(model, tmp_path)
    with torch.no_grad():
        got = model(ids).logits.float()
    assert rel_error(got, want) < BF16_TOL


# ----------------------------------------------------------------------- FP8 checkpoints (block)


def _fp8_checkpoint_experts(E=2, H=256, I=128, **options):
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E)
    config._experts_implementation = "moe_kernels"
    cls = use_experts_implementation(fp8.FP8Experts, experts_interface=fp8.ALL_FP8_EXPERTS_FUNCTIONS)
    module = cls(config, block_size=options.pop("block_size", (128, 128)), **options)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(module, name)
            w.copy_((torch.randn(w.shape) * 64).clamp(-448, 448).to(torch.float8_e4m3fn))
            scale = getattr(module, name + "_scale_inv")
            scale.copy_(torch.rand(scale.shape) / 100 / math.sqrt(w.shape[-1]) + 1e-4)
    return module


def _dequantize_blocks(w, scale):
    return w.double() * scale.double().repeat_interleave(128, 1).repeat_interleave(128, 2)


def _group_fake_quant(v):
    """e4m3 round trip per token per 128 columns (scale = amax / 448), as the block layer quantizes."""
    groups = v.double().unflatten(-1, (-1, 128))
    scale = (groups.abs().amax(-1, keepdim=True) / 448).clamp(min=1e-12)
    return ((groups / scale).float().clamp(-448, 448).to(torch.float8_e4m3fn).double() * scale).flatten(-2)


def test_fp8_checkpoint_rejects_unsupported_formats():
    x = torch.randn(3, 256)
    ids, w = _routing(3, 2, 2)
    with pytest.raises(ValueError, match="weight_block_size=None"):
        _run(_fp8_checkpoint_experts(block_size=None), "moe_kernels", x, ids, w)
    with pytest.raises(ValueError, match="activation_scheme='static'"):
        _run(_fp8_checkpoint_experts(activation_scheme="static"), "moe_kernels", x, ids, w)


def test_fp8_checkpoint_without_block_support_names_the_issue():
    if hf_experts_fp8.block_fp8_supported():
        pytest.skip("this build's cutlass_moe_fp8 takes block-scaled weights")
    module = _fp8_checkpoint_experts()
    ids, w = _routing(3, 2, 2)
    with pytest.raises(NotImplementedError, match="issue 10"):
        _run(module, "moe_kernels", torch.randn(3, 256), ids, w)


def test_fp8_checkpoint_matches_block_reference():
    if not hf_experts_fp8.block_fp8_supported():
        pytest.skip(f"cutlass_moe_fp8 without block-scaled weights in this build: {hf_experts_fp8.BLOCK_FP8_ISSUE}")
    module = _fp8_checkpoint_experts()
    x = torch.randn(9, 256).to(torch.bfloat16)
    ids, w = _routing(9, 2, 2)
    got = _run(module, "moe_kernels", x, ids, w)
    w1 = _dequantize_blocks(module.gate_up_proj, module.gate_up_proj_scale_inv)
    w2 = _dequantize_blocks(module.down_proj, module.down_proj_scale_inv)
    I = w2.shape[2]
    want = torch.zeros(x.shape, dtype=torch.float64)
    xq = _group_fake_quant(x)
    for t in range(9):
        for k in range(2):
            e = int(ids[t, k])
            h = (xq[t:t + 1] @ w1[e].T).to(torch.bfloat16).double()
            y = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
            want[t] += w[t, k].double() * (_group_fake_quant(y) @ w2[e].T)[0]
    assert rel_error(got, want) < FP8_SAME_QUANT_TOL


# --------------------------------------------------------------------------------- fused router


def _routers(model):
    return [m for m in model.modules() if type(m).__name__ in FUSED_ROUTERS]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_router_same_ids_and_weights(arch):
    model = make_model(arch)
    routers = _routers(model)
    h = torch.randn(33, 64)
    want = [r(h) for r in routers]
    names = use_fused_router(model)
    assert len(names) == len(routers) > 0
    assert use_fused_router(model) == names  # idempotent
    for router, (logits_want, w_want, ids_want) in zip(routers, want):
        logits_got, w_got, ids_got = router(h)
        torch.testing.assert_close(logits_got, logits_want, rtol=0, atol=0)
        assert ids_got.dtype == ids_want.dtype and w_got.dtype == w_want.dtype
        # DeepSeek-V3's HF router takes an unsorted top-k: compare the selections in id order.
        order_got, order_want = ids_got.argsort(dim=1), ids_want.argsort(dim=1)
        assert torch.equal(ids_got.gather(1, order_got), ids_want.gather(1, order_want))
        # fp32 softmax / sigmoid and renormalization in a different order: ~1e-7 relative.
        torch.testing.assert_close(w_got.gather(1, order_got), w_want.gather(1, order_want), rtol=1e-5, atol=1e-6)
    ids = tokens()
    fused = logits(model, "moe_kernels", ids)
    restore_router(model)
    assert rel_error(fused, logits(model, "eager", ids)) < 1e-4


def test_fused_router_rejects_a_model_without_supported_routers():
    with pytest.raises(ValueError, match="no router of a supported class"):
        use_fused_router(nn.Linear(4, 4))


# ------------------------------------------------------------------------------------- example


def test_example_runs_on_cpu():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_generate.py"), "--device", "cpu", "--layers", "1",
         "--hidden", "64", "--experts", "4", "--moe-intermediate", "32", "--prompt-tokens", "4",
         "--new-tokens", "2", "--implementations", "eager,moe_kernels,moe_kernels_fp8"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("eager", "moe_kernels", "moe_kernels_fp8", "tokens/s"):
        assert name in result.stdout


# ------------------------------------------------------------------------------------------ GPU

# bf16 against eager bf16: both round every GEMM output to bf16 (eager also its index_add_ sums,
# we accumulate the combine in fp32): measured 0.4-1% on the logits of these models (CPU, bf16,
# 3 seeds); 2e-2 leaves twice that.
BF16_TOL = 2e-2
# bf16 noise moves router inputs, and a near-tied top-k choice can then flip (an O(1) change of
# that token's output, nothing to do with the experts' arithmetic). Two ways to compare without
# that risk: the MoE layer last and alone (its router sees the same inputs in both runs), or every
# expert chosen (K = E: the routing weights are continuous in the inputs).
EVERY_EXPERT = {"qwen3_moe": {"num_experts_per_tok": 8}, "mixtral": {"num_experts_per_tok": 4},
                "deepseek_v3": {"num_experts_per_tok": 8, "topk_group": 2}}


@pytest.mark.cuda
@pytest.mark.parametrize("routing", ["one_moe_layer", "every_expert"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cuda_bf16_logits_match_eager(arch, routing):
    config = ONE_MOE_LAYER[arch] if routing == "one_moe_layer" else EVERY_EXPERT[arch]
    model = make_model(arch, dtype=torch.bfloat16, device="cuda", **config)
    ids = tokens(device="cuda")
    assert rel_error(logits(model, "moe_kernels", ids), logits(model, "eager", ids)) < BF16_TOL


@pytest.mark.cuda
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cuda_fp8_logits_close_to_eager(arch):
    model = make_model(arch, dtype=torch.bfloat16, device="cuda", **ONE_MOE_LAYER[arch])
    ids = tokens(device="cuda")
    got = logits(model, "moe_kernels_fp8", ids)
    assert got.isfinite().all()
    assert rel_error(got, logits(model, "eager", ids)) < FP8_VS_EAGER_TOL


@pytest.mark.cuda
def test_cuda_fp8_matches_quantized_reference():
    module = _toy_experts(E=8, H=256, I=128).to("cuda", torch.bfloat16)
    x = torch.randn(70, 256, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(70, 2, 8)
    got = _run(module, "moe_kernels_fp8", x, ids.cuda(), w.cuda())
    module.cpu()
    assert rel_error(got.cpu(), _same_quant_reference(module, x.cpu(), ids, w)) < FP8_SAME_QUANT_TOL


@pytest.mark.cuda
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cuda_bf16_layouts_match_eager(layout):
    module = _toy_experts(**LAYOUTS[layout]).to("cuda", torch.bfloat16)
    x = torch.randn(13, 32, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(13, 2, 4)
    ids, w = ids.cuda(), w.cuda()
    want = _run(module.float(), "eager", x.float(), ids, w)  # the specification, in fp32
    module.to(torch.bfloat16)
    assert rel_error(_run(module, "moe_kernels", x, ids, w), want) < BF16_TOL


@pytest.mark.cuda
def test_cuda_bf16_decode_token():
    model = make_model("qwen3_moe", dtype=torch.bfloat16, device="cuda", **ONE_MOE_LAYER["qwen3_moe"])
    ids = tokens(batch=1, length=1, device="cuda")
    assert rel_error(logits(model, "moe_kernels", ids), logits(model, "eager", ids)) < BF16_TOL


@pytest.mark.cuda
def test_cuda_fp8_checkpoint_matches_block_reference():
    if not hf_experts_fp8.block_fp8_supported():
        pytest.skip(f"cutlass_moe_fp8 without block-scaled weights in this build: {hf_experts_fp8.BLOCK_FP8_ISSUE}")
    module = _fp8_checkpoint_experts(E=4).to("cuda")
    x = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(40, 2, 4)
    got = _run(module, "moe_kernels", x, ids.cuda(), w.cuda())
    module.cpu()
    want = _run(module, "moe_kernels", x.cpu(), ids, w)  # the CPU reference of the same op
    assert rel_error(got.cpu(), want) < FP8_SAME_QUANT_TOL


@pytest.mark.cuda
def test_cuda_experts_forward_compiles_without_graph_breaks():
    model = make_model("qwen3_moe", dtype=torch.bfloat16, device="cuda")
    experts = model.model.layers[0].mlp.experts
    experts.config._experts_implementation = "moe_kernels"
    x = torch.randn(24, 64, device="cuda", dtype=torch.bfloat16)
    ids, w = _routing(24, 2, 8)
    ids, w = ids.cuda(), w.cuda().to(torch.bfloat16)
    want = _run(experts, "moe_kernels", x, ids, w)
    torch._dynamo.reset()
    compiled = torch.compile(experts, fullgraph=True)
    with torch.no_grad():
        got = compiled(x, ids, w)
    # Inductor may fuse the gate's elementwise ops and round once instead of twice in bf16.
    assert rel_error(got, want) < BF16_TOL


@pytest.mark.cuda
def test_cuda_compiled_model_matches_eager_mode():
    # Every expert chosen: the compiled dense layers round differently in bf16 (see EVERY_EXPERT).
    model = make_model("qwen3_moe", dtype=torch.bfloat16, device="cuda", **EVERY_EXPERT["qwen3_moe"])
    ids = tokens(device="cuda")
    want = logits(model, "moe_kernels", ids)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        got = compiled(ids).logits.float()
    assert rel_error(got, want) < BF16_TOL
    assert rel_error(got, logits(model, "eager", ids)) < BF16_TOL
