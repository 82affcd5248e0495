"""cutlass_grouped_gemm_fp8_act_quant (GEMM1 with the gated activation and the static fp8
quantization in the epilogue): the CPU implementation against the unfused ops and a float64
formula; bad arguments; on a GPU, the fused CUTLASS epilogue byte for byte against the plain GEMM
(the same tile configuration forced) followed by silu_and_mul_quant_fp8, and the layer's fused path
(its default where it applies; a configuration forced with MOE_KERNELS_GEMM_CONFIG=gated_<name>)
against its unfused path (MOE_KERNELS_FUSED_GEMM1=0)."""

import os

import pytest
import torch
from torch.library import opcheck

import moe_kernels

from fp8_helpers import FP8, quantize_per_expert
from helpers import poison_cuda_allocator, random_topk_ids, runs_fused_gemm1

ACTS = ["silu", "gelu", "swigluoai"]
SHAPES = [  # (rows per expert, N = 2I, K)
    ([5, 0, 37, 1, 130, 0, 2, 64], 256, 128),
    ([0, 0, 300, 0], 64, 512),           # one expert takes every row
    ([3, 1], 16, 16),                    # smallest aligned sizes
    ([129, 257, 0], 768, 2048),          # partial row and column tiles, long K
    ([0, 0, 0], 32, 32),                 # no rows at all
    ([65, 3], 576, 128),                 # 16-byte stores, a partial column tile in both configurations
    ([7, 0, 70], 208, 64),               # N % 32 != 0: the byte-by-byte stores
]
FORCED = "coop_128x256x128_c1x2"
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")  # the plain GEMM's configuration with the fused one's tile


def make_problem(counts, N, K, per_token=False, per_channel=False, bias=False, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(counts), 0)
    M = int(offsets[-1])
    a = (torch.randn(M, K, generator=g) / 0.02).clamp(-448, 448).to(FP8)
    a_scale = torch.tensor([0.02]) * (0.5 + torch.rand(M, 1, generator=g)) if per_token else torch.tensor([0.02])
    b, b_scale = quantize_per_expert(torch.randn(E, N, K, generator=g))
    if per_channel:
        b_scale = b_scale.reshape(E, 1) * (0.5 + torch.rand(E, N, generator=g))
    out_scale = torch.tensor([0.05])
    b1 = torch.randn(E, N, generator=g) if bias else None
    tensors = [a, b, a_scale, b_scale, offsets, out_scale, b1]
    return [t.to(device) if t is not None else None for t in tensors]


def unfused(a, b, a_s, b_s, off, out_scale, activation, bias):
    h = moe_kernels.cutlass_grouped_gemm_fp8(a, b, a_s, b_s, off)
    q, _ = moe_kernels.silu_and_mul_quant_fp8(h, out_scale, activation=activation, gate_up_interleaved=True,
                                              bias=bias, expert_offsets=off if bias is not None else None)
    return q


def formula(a, b, a_s, b_s, off, out_scale, activation, bias):
    """float64 GEMM per expert rounded to bf16, + bias, gated activation of interleaved columns,
    / out_scale."""
    a, b = a.double().cpu(), b.double().cpu()
    E, N = b.shape[0], b.shape[1]
    sa = a_s.double().cpu().reshape(-1, 1).expand(a.shape[0], 1)
    sb = b_s.double().cpu().reshape(E, -1)
    h = torch.zeros(a.shape[0], N, dtype=torch.float64)
    o = off.tolist()
    for e in range(E):
        h[o[e]:o[e + 1]] = (a[o[e]:o[e + 1]] * sa[o[e]:o[e + 1]]) @ (b[e] * sb[e].reshape(-1, 1)).t()
    # The op's contract: the GEMM output is rounded to bf16 before the bias (as the unfused layer),
    # which matters where the bias cancels most of it.
    h = h.to(torch.bfloat16).double()
    for e in range(E):
        if bias is not None:
            h[o[e]:o[e + 1]] += bias[e].double().cpu()
    g, u = h[:, 0::2], h[:, 1::2]
    if activation == "silu":
        y = torch.nn.functional.silu(g) * u
    elif activation == "gelu":
        y = torch.nn.functional.gelu(g) * u
    else:
        g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
        y = (u + 1) * g * torch.sigmoid(1.702 * g)
    return y / out_scale.double().cpu()


@pytest.mark.parametrize("counts,N,K", SHAPES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("scales", ["tensor", "token_channel"])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_equals_the_unfused_ops(counts, N, K, activation, scales, bias):
    args = make_problem(counts, N, K, per_token=scales != "tensor", per_channel=scales != "tensor", bias=bias)
    a, b, a_s, b_s, off, out_scale, b1 = args
    q = moe_kernels.cutlass_grouped_gemm_fp8_act_quant(a, b, a_s, b_s, off, out_scale, activation, bias=b1)
    assert q.dtype == FP8 and q.shape == (a.shape[0], N // 2)
    assert torch.equal(q.view(torch.uint8), unfused(*args[:6], activation, b1).view(torch.uint8))


@pytest.mark.parametrize("counts,N,K", SHAPES[:4])
@pytest.mark.parametrize("activation", ACTS)
def test_cpu_matches_the_float64_formula(counts, N, K, activation):
    args = make_problem(counts, N, K, per_token=True, per_channel=True, bias=True, seed=1)
    q = moe_kernels.cutlass_grouped_gemm_fp8_act_quant(*args[:6], activation, bias=args[6])
    ref = formula(*args[:6], activation, args[6]).clamp(-448, 448)
    # bf16 rounding of the GEMM output (2^-9 relative), then one e4m3 rounding (2^-4 relative): the
    # quantized value is within 1/16 of the exact one plus e4m3's smallest step near zero.
    torch.testing.assert_close(q.double(), ref, rtol=0.07, atol=2 ** -9 * 1.5)


def test_opcheck_cpu():
    args = make_problem([5, 0, 37], 64, 32, per_token=True, per_channel=True, bias=True)
    # test_schema is left out, as for cutlass_grouped_gemm_fp8: its mutation check multiplies the
    # float8 inputs, which torch does not implement on the CPU.
    opcheck(torch.ops.moe_kernels.cutlass_grouped_gemm_fp8_act_quant.default,
            (*args[:6], "swigluoai", 1.702, 7.0, args[6]), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("change,message", [
    (lambda p: p.update(b_s=torch.ones(p["b"].shape[0], 1, 1)), "block-scaled"),
    (lambda p: p.update(out_scale=torch.tensor([0.1, 0.2])), "out_scale must hold one value"),
    (lambda p: p.update(out_scale=torch.tensor([0.1], dtype=torch.float64)), "out_scale must be float32"),
    (lambda p: p.update(activation="relu"), "relu"),
    (lambda p: p.update(bias=torch.zeros(p["b"].shape[0], 3)), "bias must be"),
    (lambda p: p.update(bias=torch.zeros(p["b"].shape[0], p["b"].shape[1], dtype=torch.float64)), "bias must be float32"),
])
def test_bad_arguments_name_what_is_wrong(change, message):
    a, b, a_s, b_s, off, out_scale, _ = make_problem([4, 3], 32, 32)
    p = dict(a=a, b=b, a_s=a_s, b_s=b_s, off=off, out_scale=out_scale, activation="silu", bias=None)
    change(p)
    with pytest.raises(RuntimeError, match="cutlass_grouped_gemm_fp8"):
        try:
            moe_kernels.cutlass_grouped_gemm_fp8_act_quant(p["a"], p["b"], p["a_s"], p["b_s"], p["off"],
                                                           p["out_scale"], p["activation"], bias=p["bias"])
        except RuntimeError as e:
            assert message in str(e), str(e)
            raise


@pytest.mark.parametrize("name,change,message", [
    ("a dtype", lambda p: p.update(a=p["a"].float()), "a must be float8_e4m3fn, got Float"),
    ("b shape", lambda p: p.update(b=p["b"][0]), "b must be 3-D [E, N, K]"),
    ("b contiguity", lambda p: p.update(b=p["b"].transpose(1, 2).contiguous().transpose(1, 2)),
     "b must be contiguous"),
    ("a_scales shape", lambda p: p.update(a_s=torch.ones(3)), "a_scales must be [1] (per tensor) or [M]"),
    ("b_scales dtype", lambda p: p.update(b_s=p["b_s"].double()), "b_scales must be float32"),
    ("offsets dtype", lambda p: p.update(off=p["off"].int()), "expert_offsets must be int64"),
    ("offsets shape", lambda p: p.update(off=p["off"][:-1]), "expert_offsets must have shape [3]"),
    ("bias contiguity", lambda p: p.update(bias=torch.zeros(p["b"].shape[1], 2).t()), "bias must be contiguous"),
    ("block scales with bad K", lambda p: p.update(b_s=torch.ones(2, 1, 1)), "block-scaled weights"),
])
def test_every_argument_check_names_this_op_and_the_argument(name, change, message):
    a, b, a_s, b_s, off, out_scale, _ = make_problem([4, 3], 32, 32)
    p = dict(a=a, b=b, a_s=a_s, b_s=b_s, off=off, bias=None)
    change(p)
    with pytest.raises(RuntimeError, match="cutlass_grouped_gemm_fp8_act_quant: ") as err:
        moe_kernels.cutlass_grouped_gemm_fp8_act_quant(p["a"], p["b"], p["a_s"], p["b_s"], p["off"], out_scale,
                                                       bias=p["bias"])
    assert message in str(err.value), (name, str(err.value))


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["out_scale", "bias", "a_scales"])
def test_cuda_arguments_on_another_device_are_named(which):
    args = make_problem([4, 3], 32, 32, bias=True, device="cuda")
    a, b, a_s, b_s, off, out_scale, b1 = args
    if which == "out_scale":
        out_scale = out_scale.cpu()
    elif which == "bias":
        b1 = b1.cpu()
    else:
        a_s = a_s.cpu()
    with pytest.raises(RuntimeError, match=f"cutlass_grouped_gemm_fp8_act_quant: {which} must be on cuda:0"):
        moe_kernels.cutlass_grouped_gemm_fp8_act_quant(a, b, a_s, b_s, off, out_scale, bias=b1)


@pytest.mark.cuda
@pytest.mark.parametrize("counts,N,K", SHAPES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("scales", ["tensor", "token_channel"])
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_fused_epilogue_equals_the_plain_gemm_then_act_quant(counts, N, K, activation, scales, bias, monkeypatch):
    args = make_problem(counts, N, K, per_token=scales != "tensor", per_channel=scales != "tensor", bias=bias,
                        device="cuda", seed=2)
    poison_cuda_allocator(0xFF)
    q = moe_kernels.cutlass_grouped_gemm_fp8_act_quant(*args[:6], activation, bias=args[6])
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", FORCED)
    ref = unfused(*args[:6], activation, args[6])
    assert torch.equal(q.view(torch.uint8), ref.view(torch.uint8))
    # And close to the CPU reference, whose fp32 dot products round differently than the MMA's.
    cpu = moe_kernels.cutlass_grouped_gemm_fp8_act_quant(*[t.cpu() if t is not None else None for t in args[:6]],
                                                         activation, bias=args[6].cpu() if bias else None)
    assert_within_one_e4m3_step_mostly(q, cpu)


def e4m3_line(q):
    """e4m3 codes (sign-magnitude bytes) on one increasing integer line: adjacent values differ by 1."""
    c = q.cpu().view(torch.uint8).int()
    return torch.where(c >= 128, -(c - 128), c)


def assert_within_one_e4m3_step_mostly(got, want):
    """CUDA against the CPU reference: a GEMM output one bf16 unit apart (another summation order)
    moves its e4m3 result by at most one step (up to 12.5% relative), except where a bias cancels
    most of the output and amplifies that unit; so nearly every byte is within one step."""
    steps = (e4m3_line(got) - e4m3_line(want)).abs()
    if steps.numel():
        assert (steps > 1).float().mean().item() < 0.005, steps.max()
        assert (steps == 0).float().mean().item() > 0.8


@pytest.mark.cuda
@pytest.mark.parametrize("config", ["gated_pingpong_128x128x128_c1x2", "gated_coop_128x256x128_c1x2"])
@pytest.mark.parametrize("counts,N,K", [SHAPES[0], SHAPES[3], SHAPES[5], SHAPES[6]])
def test_cuda_every_fused_configuration_gives_the_same_bytes(config, counts, N, K, monkeypatch):
    args = make_problem(counts, N, K, per_token=True, per_channel=True, bias=True, device="cuda", seed=4)
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", config)
    q = moe_kernels.cutlass_grouped_gemm_fp8_act_quant(*args[:6], "swigluoai", bias=args[6])
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", FORCED)
    assert torch.equal(q.view(torch.uint8), unfused(*args[:6], "swigluoai", args[6]).view(torch.uint8))


@pytest.mark.cuda
def test_cuda_unknown_fused_configuration_is_an_error(monkeypatch):
    args = make_problem([4, 3], 32, 32, device="cuda")
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", "gated_nonesuch")
    with pytest.raises(RuntimeError, match="MOE_KERNELS_GEMM_CONFIG=gated_nonesuch names no compiled configuration"):
        moe_kernels.cutlass_grouped_gemm_fp8_act_quant(*args[:6])


@pytest.mark.cuda
def test_cuda_opcheck_and_graph_capture():
    args = make_problem([40, 0, 77], 256, 128, per_token=True, per_channel=True, bias=True, device="cuda")
    opcheck(torch.ops.moe_kernels.cutlass_grouped_gemm_fp8_act_quant.default, (*args[:6], "silu", 1.702, 7.0, args[6]),
            test_utils=OPCHECK_UTILS)
    eager = moe_kernels.cutlass_grouped_gemm_fp8_act_quant(*args[:6], bias=args[6])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_kernels.cutlass_grouped_gemm_fp8_act_quant(*args[:6], bias=args[6])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager.view(torch.uint8), captured.view(torch.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("T,E,K,H,I", [(512, 8, 2, 256, 128), (1000, 16, 4, 512, 384), (333, 4, 1, 128, 64)])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("config", [None, "gated_pingpong_128x128x128_c1x2", "gated_coop_128x256x128_c1x2"])
def test_cuda_layer_fused_path_gives_the_same_bytes(T, E, K, H, I, activation, bias, config, monkeypatch):
    torch.manual_seed(3)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    ids = random_topk_ids(T, K, E, device="cuda")
    w = torch.rand(T, K, device="cuda")
    w1, s1 = quantize_per_expert(moe_kernels.interleave_gate_up(torch.randn(E, 2 * I, H)))
    w2, s2 = quantize_per_expert(torch.randn(E, H, I))
    w1, s1, w2, s2 = w1.cuda(), s1.cuda(), w2.cuda(), s2.cuda()
    b1 = torch.randn(E, 2 * I, device="cuda") if bias else None
    a1, a2 = torch.tensor([0.02], device="cuda"), torch.tensor([0.05], device="cuda")
    assert T * K // E > 32  # the fused path's condition

    def layer():
        return moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, s1, s2, a1, a2, activation=activation,
                                           gate_up_interleaved=True, w1_bias=b1)

    monkeypatch.setenv("MOE_KERNELS_FUSED_GEMM1", "0")
    unfused_layer = layer()  # GEMM1 and the activation kernel apart
    assert not runs_fused_gemm1(layer)
    monkeypatch.delenv("MOE_KERNELS_FUSED_GEMM1")
    if config is not None:
        monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", config)
    fused = layer()  # the default (config None) or the forced fused configuration
    assert runs_fused_gemm1(layer)  # the [M, 2I] bf16 and the activation pass are gone
    assert torch.equal(fused, layer())  # run to run
    assert torch.equal(fused, unfused_layer)
    monkeypatch.delenv("MOE_KERNELS_GEMM_CONFIG", raising=False)
    cpu = moe_kernels.cutlass_moe_fp8(x.cpu(), w1.cpu(), w2.cpu(), w.cpu(), ids.cpu(), s1.cpu(), s2.cpu(), a1.cpu(),
                                      a2.cpu(), activation=activation, gate_up_interleaved=True,
                                      w1_bias=b1.cpu() if bias else None)
    err = (fused.float().cpu() - cpu.float()).norm() / cpu.float().norm()
    assert err < 0.03
    assert os.environ.get("MOE_KERNELS_GEMM_CONFIG") is None


@pytest.mark.cuda
def test_cuda_layer_takes_the_fused_gemm1_only_where_it_applies(monkeypatch):
    E, K, H, I = 8, 2, 256, 128
    w1, s1 = quantize_per_expert(moe_kernels.interleave_gate_up(torch.randn(E, 2 * I, H)))
    w2, s2 = quantize_per_expert(torch.randn(E, H, I))
    w1, s1, w2, s2 = w1.cuda(), s1.cuda(), w2.cuda(), s2.cuda()
    a1, a2 = torch.tensor([0.02], device="cuda"), torch.tensor([0.05], device="cuda")

    def layer(T, a2_scale=a2, interleaved=True):
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids = random_topk_ids(T, K, E, device="cuda")
        w = torch.rand(T, K, device="cuda")
        return lambda: moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, s1, s2, a1, a2_scale,
                                                   gate_up_interleaved=interleaved)

    assert runs_fused_gemm1(layer(512))                          # 128 rows per expert
    assert not runs_fused_gemm1(layer(128))                      # 32 rows per expert: the plain GEMM's small tiles
    assert not runs_fused_gemm1(layer(512, a2_scale=None))       # a dynamic output scale
    assert not runs_fused_gemm1(layer(512, interleaved=False))   # gate and up in halves
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", FORCED)        # a plain configuration forced: the plain path
    assert not runs_fused_gemm1(layer(512))
    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", "gated_coop_128x256x128_c1x2")
    assert runs_fused_gemm1(layer(512))
    monkeypatch.delenv("MOE_KERNELS_GEMM_CONFIG")
    monkeypatch.setenv("MOE_KERNELS_FUSED_GEMM1", "0")
    assert not runs_fused_gemm1(layer(512))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_interleave_gate_up_gives_the_same_layer(device):
    """A user's concatenated w13 (with per-channel scales and a bias) interleaved once at load: the
    layer with gate_up_interleaved=True (on a GPU, the fused GEMM1) equals the layer on the original
    weights; per-expert scales need nothing."""
    torch.manual_seed(5)
    T, E, K, H, I = 300, 4, 2, 128, 64
    x = torch.randn(T, H, dtype=torch.bfloat16)
    ids = random_topk_ids(T, K, E)
    w = torch.rand(T, K)
    w13 = torch.randn(E, 2 * I, H)
    s13 = w13.abs().amax(2) / 448.0  # per channel
    w13_q = (w13 / s13[:, :, None]).to(FP8)
    w2, s2 = quantize_per_expert(torch.randn(E, H, I))
    b13 = torch.randn(E, 2 * I)
    a1, a2 = torch.tensor([0.02]), torch.tensor([0.05])
    args = [t.to(device) for t in (x, w13_q, w2, w, ids, s13, s2, a1, a2, b13)]
    x, w13_q, w2, w, ids, s13, s2, a1, a2, b13 = args
    s2c = s2[:, None].expand(E, H).contiguous()
    concatenated = moe_kernels.cutlass_moe_fp8(x, w13_q, w2, w, ids, s13, s2c, a1, a2, per_out_ch=True, w1_bias=b13)
    il = moe_kernels.interleave_gate_up
    interleaved = moe_kernels.cutlass_moe_fp8(x, il(w13_q), w2, w, ids, il(s13), s2c, a1, a2, per_out_ch=True,
                                              gate_up_interleaved=True, w1_bias=il(b13))
    assert torch.equal(interleaved, concatenated)
    assert torch.equal(il(torch.arange(8).view(1, 8)), torch.tensor([[0, 4, 1, 5, 2, 6, 3, 7]]))


def test_interleave_gate_up_rejects_an_odd_row_count():
    with pytest.raises(ValueError, match=r"interleave_gate_up: t must be \[E, 2I, \.\.\.\] with an even dimension 1"):
        moe_kernels.interleave_gate_up(torch.zeros(2, 3, 4))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_cutlass_fp8_experts_with_interleaved_weights_take_the_fused_gemm1(device):
    """docs/modular.md's recipe: CutlassFp8Experts on interleave_gate_up(w13) (per-channel scales
    interleaved too) with a static a2_scale equals the module on the checkpoint's order; on a GPU it
    runs the fused GEMM1."""
    from moe_kernels.modular import CutlassFp8Experts

    torch.manual_seed(6)
    T, E, K, H, I = 256, 4, 2, 128, 64
    w13 = torch.randn(E, 2 * I, H)
    s13 = w13.abs().amax(2) / 448.0
    w13_q = (w13 / s13[:, :, None]).to(FP8)
    w2 = torch.randn(E, H, I)
    s2 = w2.abs().amax(2) / 448.0
    w2_q = (w2 / s2[:, :, None]).to(FP8)
    a2 = torch.tensor([0.05])
    il = moe_kernels.interleave_gate_up
    plain = CutlassFp8Experts(w13_q, w2_q, s13, s2, a2_scale=a2).to(device)
    fused = CutlassFp8Experts(il(w13_q), w2_q, il(s13), s2, a2_scale=a2, gate_up_interleaved=True).to(device)
    x = torch.randn(T, H, dtype=torch.bfloat16, device=device)
    ids = random_topk_ids(T, K, E, device=device)
    w = torch.rand(T, K, device=device)
    assert torch.equal(fused(x, w, ids), plain(x, w, ids))
    if device == "cuda":
        assert runs_fused_gemm1(lambda: fused(x, w, ids)) and not runs_fused_gemm1(lambda: plain(x, w, ids))


def test_interleave_gate_up_rejects_one_dimension_and_takes_strided_views():
    with pytest.raises(ValueError, match=r"interleave_gate_up: t must be \[E, 2I, \.\.\.\] with an even dimension 1, got shape \(8,\)"):
        moe_kernels.interleave_gate_up(torch.zeros(8))
    t = torch.arange(32).view(2, 4, 4).transpose(1, 2)  # not contiguous: [E=2, 2I=4, 4]
    got = moe_kernels.interleave_gate_up(t)
    assert got.is_contiguous()
    assert torch.equal(got, t[:, [0, 2, 1, 3]])
