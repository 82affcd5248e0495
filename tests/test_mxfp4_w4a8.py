"""4-bit experts: grouped_gemm_mxfp4 / grouped_gemm_w4a8 and the cutlass_moe_mxfp4 / cutlass_moe_w4a8
layers, against plain fp32/fp64 torch formulas built from weights decoded here (independently of the
library), on the CPU references and (marked cuda) on the GPU against those references.

Tolerances: the ops round to bfloat16 where the formula does not — GEMM outputs once (relative
error <= 2^-9), the layer three times in series (GEMM1's activated output, GEMM2's output, the
unpermuted sum) — and accumulate in fp32 in another order; with e4m3 activations the formula
quantizes with the library's own scaled_fp8_quant, so only a bf16 ulp of GEMM1's output can flip an
e4m3 rounding of one element (a 1/sqrt(I) share of a row's result). Hence rtol 1e-2 and an atol of
1e-2 of the largest magnitude (elements that cancel to near zero): several times the bound, far
below any real error (a wrong nibble order, scale, bias row or activation changes results by
tens of percent).
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import moe_kernels

from helpers import DEVICES, poison_cuda_allocator, random_expert_map, random_topk_ids

FP8 = torch.float8_e4m3fn
ACTIVATIONS = ["silu", "gelu", "swigluoai"]
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], dtype=torch.float64)


# ---- the formulas ----

def unpack_codes(w):
    """uint8 [..., K/2] -> int64 codes [..., K], the low nibble first (the even element)."""
    w = w.cpu().long()
    return torch.stack([w & 0xF, w >> 4], dim=-1).flatten(-2)


def decode_mxfp4(w, s):
    """E2M1 codes times 2^(s - 127) per 32 along K (s = 255: NaN), float64; exact in bf16."""
    scale = torch.exp2(s.cpu().double() - 127)
    scale[s.cpu() == 255] = float("nan")
    return E2M1[unpack_codes(w)] * scale.repeat_interleave(32, dim=-1)


def decode_int4(w, s):
    """Signed nibbles times the scale per 128 along K, the scale rounded to bf16 first (as SGLang keeps
    W4AFP8 scales) and the product rounded to bf16 (the GEMM's input)."""
    codes = unpack_codes(w)
    q = codes - 16 * (codes >= 8).long()
    scale = s.cpu().to(torch.bfloat16).double().repeat_interleave(128, dim=-1)
    return (q.double() * scale).to(torch.bfloat16).double()


def activation_formula(gate, up, activation, alpha=1.702, limit=7.0):
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(gate) * up
    g = gate.clamp(max=limit)
    u = up.clamp(min=-limit, max=limit)
    return (u + 1) * g * torch.sigmoid(alpha * g)


def split_gate_up(y, interleaved):
    half = y.shape[-1] // 2
    return (y[..., 0::2], y[..., 1::2]) if interleaved else (y[..., :half], y[..., half:])


def gemm_formula(a, a_scale, w_dec, offsets, bias=None, activation="none", interleaved=False, alpha=1.702,
                 limit=7.0):
    """float64 [offsets[-1], N or N/2]: per expert rows @ decoded weight^T, * a_scale, + bias, act."""
    a = a.cpu().double()
    outs = []
    offs = offsets.tolist()
    for e in range(len(offs) - 1):
        y = a[offs[e]:offs[e + 1]] @ w_dec[e].t()
        if a_scale is not None:
            s = a_scale.cpu().double().reshape(-1)
            y = y * (s if s.numel() == 1 else s[offs[e]:offs[e + 1]])[:, None]
        if bias is not None:
            y = y + bias[e].cpu().double()
        if activation != "none":
            y = activation_formula(*split_gate_up(y, interleaved), activation, alpha, limit)
        outs.append(y)
    return torch.cat(outs)


def quantize_rows(x, static_scale=None):
    """The layer's activation quantization, through the library's scaled_fp8_quant (tested on its own):
    per token, or with a static per-tensor scale; returned dequantized in float64."""
    q, s = moe_kernels.scaled_fp8_quant(x.cpu(), None if static_scale is None else static_scale.cpu(), True)
    return q.double() * s.double().reshape(-1, 1) if s.numel() > 1 else q.double() * s.double()


def layer_formula(x, w1_dec, w2_dec, topk_weights, topk_ids, *, activation="silu", interleaved=False, alpha=1.702,
                  limit=7.0, w1_bias=None, w2_bias=None, fp8=False, a1_scale=None, a2_scale=None, expert_map=None):
    """float64 [T, H]: sum_k w[t, k] * (W2[e] act(W1[e] x_t + b1[e]) + b2[e]) over the kept choices, with
    GEMM1's activated output rounded to bf16 (and requantized with fp8) as the layer stores it."""
    x = x.cpu()
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float64)
    xin = quantize_rows(x, a1_scale) if fp8 else x.double()
    ids = topk_ids.cpu().long()
    emap = None if expert_map is None else expert_map.cpu().long()
    for e_global in ids.unique().tolist():
        e = e_global if emap is None else int(emap[e_global])
        if e < 0:
            continue
        t_idx, k_idx = (ids == e_global).nonzero(as_tuple=True)
        h = xin[t_idx] @ w1_dec[e].t()
        if w1_bias is not None:
            h = h + w1_bias[e].cpu().double()
        h = activation_formula(*split_gate_up(h, interleaved), activation, alpha, limit).to(torch.bfloat16)
        h = quantize_rows(h, a2_scale) if fp8 else h.double()
        y = h @ w2_dec[e].t()
        if w2_bias is not None:
            y = y + w2_bias[e].cpu().double()
        y = y.to(torch.bfloat16).double()
        out.index_add_(0, t_idx, topk_weights.cpu().double()[t_idx, k_idx][:, None] * y)
    return out


def assert_matches(out, ref):
    ref = ref.double()
    assert out.dtype == torch.bfloat16
    assert out.shape == ref.shape
    atol = 1e-2 * max(ref.abs().max().item(), 1e-6) if ref.numel() else 0.0
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-2, atol=atol)


# ---- data ----

def random_mxfp4(E, N, K, device="cpu"):
    """Random codes, and E8M0 scales 2^-6 .. 2^-3 (products of order one on unit inputs)."""
    w = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8)
    s = torch.randint(121, 125, (E, N, K // 32), dtype=torch.uint8)
    return w.to(device), s.to(device)


def random_int4(E, N, K, device="cpu"):
    w = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8)
    s = (torch.rand(E, N, K // 128) + 0.5) * (2.0 / K**0.5)
    return w.to(device), s.float().to(device)


def offsets_of(rows):
    return torch.tensor([0] + torch.tensor(rows).cumsum(0).tolist(), dtype=torch.int64)


def gemm_problem(fmt, rows, N, K, a_fp8, per_row=True, device="cpu", extra_rows=3):
    """a [sum(rows) + extra_rows, K] (rows past the offsets are never written), weights, scales."""
    E = len(rows)
    M = sum(rows) + extra_rows
    w, s = random_mxfp4(E, N, K) if fmt == "mxfp4" else random_int4(E, N, K)
    x = torch.randn(M, K)
    if a_fp8:
        a_scale = (torch.rand(M, 1) + 0.5) * 0.02 if per_row else torch.tensor([0.03])
        a = (x / a_scale).clamp(-448, 448).to(FP8)
    else:
        a, a_scale = x.to(torch.bfloat16), None
    off = offsets_of(rows)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dev(a), dev(a_scale), dev(w), dev(s), dev(off)


def gemm_op(fmt):
    return moe_kernels.grouped_gemm_mxfp4 if fmt == "mxfp4" else moe_kernels.grouped_gemm_w4a8


def decode(fmt, w, s):
    return decode_mxfp4(w, s) if fmt == "mxfp4" else decode_int4(w, s)


def layer_weights(fmt, E, H, I, device="cpu", bias=False):
    w1, s1 = random_mxfp4(E, 2 * I, H, device) if fmt == "mxfp4" else random_int4(E, 2 * I, H, device)
    w2, s2 = random_mxfp4(E, H, I, device) if fmt == "mxfp4" else random_int4(E, H, I, device)
    b1 = torch.randn(E, 2 * I).to(device) if bias else None
    b2 = torch.randn(E, H).to(device) if bias else None
    return w1, w2, s1, s2, b1, b2


def routing(T, K, E, ids_dtype=torch.int32, device="cpu"):
    w = torch.softmax(torch.randn(T, K), dim=-1)
    ids = random_topk_ids(T, K, E, dtype=ids_dtype)
    return w.to(device), ids.to(device)


# ---- GEMM ops on the CPU ----

@pytest.mark.parametrize("a_fp8", [False, True])
@pytest.mark.parametrize("activation", ["none"] + ACTIVATIONS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_grouped_gemm_mxfp4_matches_formula(a_fp8, activation, interleaved):
    rows, N, K = [5, 0, 9, 1], 192, 160  # an empty expert; K not a multiple of 128 (the kernel's K tile)
    a, a_s, w, s, off = gemm_problem("mxfp4", rows, N, K, a_fp8)
    bias = torch.randn(len(rows), N)
    out = moe_kernels.grouped_gemm_mxfp4(a, w, s, off, a_s, bias, activation, interleaved)
    assert out.shape == (a.shape[0], N // 2 if activation != "none" else N)
    ref = gemm_formula(a.float(), a_s, decode_mxfp4(w, s), off, bias, activation, interleaved)
    assert_matches(out[: off[-1]], ref)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("activation", ["none", "swigluoai"])
def test_grouped_gemm_w4a8_matches_formula(per_row, activation):
    rows, N, K = [3, 7, 0], 128, 384
    a, a_s, w, s, off = gemm_problem("int4", rows, N, K, True, per_row)
    out = moe_kernels.grouped_gemm_w4a8(a, w, s, off, a_s, None, activation, False, 1.5, 5.0)
    ref = gemm_formula(a.float(), a_s, decode_int4(w, s), off, None, activation, False, 1.5, 5.0)
    assert_matches(out[: off[-1]], ref)


def test_mxfp4_decodes_every_code_and_scale_edge():
    """Each of the 16 codes at scales 2^-127 (s = 0), 2^0 and 2^127 (s = 254: 2 * 2^127 and above
    overflow to +-inf), against a one-hot input."""
    K, N = 32, 16 * 3
    codes = torch.arange(16, dtype=torch.uint8).repeat_interleave(3)  # row n holds code n // 3
    w = torch.zeros(1, N, K // 2, dtype=torch.uint8)
    w[0, :, 0] = codes << 4  # element 1 (high nibble of byte 0) holds the code, every other one 0
    s = torch.tensor([0, 127, 254], dtype=torch.uint8).repeat(16).view(1, N, 1)
    a = torch.zeros(1, K, dtype=torch.bfloat16)
    a[0, 1] = 1  # selects the odd (high-nibble) element
    out = moe_kernels.grouped_gemm_mxfp4(a, w, s, offsets_of([1]))
    want = E2M1[codes.long()] * torch.exp2(torch.tensor([-127.0, 0.0, 127.0], dtype=torch.float64)).repeat(16)
    torch.testing.assert_close(out[0].double(), want.to(torch.bfloat16).double(), rtol=0, atol=0)


def test_int4_decodes_signed_nibbles():
    K, N = 128, 16
    w = (torch.arange(16, dtype=torch.uint8) | (torch.arange(16, dtype=torch.uint8) << 4)).view(1, N, 1)
    w = w.expand(1, N, K // 2).contiguous()
    s = torch.full((1, N, 1), 0.5)
    a = torch.zeros(1, K, dtype=FP8)
    a[0, 0] = 1
    out = moe_kernels.grouped_gemm_w4a8(a, w, s, offsets_of([1]), torch.tensor([1.0]))
    want = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1], dtype=torch.float64) * 0.5
    torch.testing.assert_close(out[0].double(), want, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_gemm_opcheck(fmt):
    # No rows past the offsets: those are left unwritten, and opcheck compares whole outputs.
    a, a_s, w, s, off = gemm_problem(fmt, [2, 0, 3], 64, 128, True, extra_rows=0)
    bias = torch.randn(3, 64)
    op = torch.ops.moe_kernels.grouped_gemm_mxfp4 if fmt == "mxfp4" else torch.ops.moe_kernels.grouped_gemm_w4a8
    # test_schema is left out: its mutation check multiplies the inputs, which torch does not
    # implement for float8 tensors on the CPU (as test_gemm.py).
    opcheck(op.default, (a, w, s, off, a_s, bias, "swigluoai", True, 1.702, 7.0),
            test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    if fmt == "mxfp4":
        a_bf = torch.randn(5, 128).to(torch.bfloat16)
        opcheck(op.default, (a_bf, w, s, off, None, None, "none", False, 1.702, 7.0))


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_word_decoders_equal_scalar_definitions(tmp_path):
    """The kernels decode 8 codes a word with bit tricks and bf16x2 arithmetic; on the host (the same
    functions, intrinsics emulated) they must equal the scalar definitions for every code, nibble
    position and E8M0 scale, and for random words under INT4 scales across bf16's range."""
    root = Path(__file__).resolve().parent.parent
    exe = tmp_path / "decode_check"
    subprocess.run(["g++", "-std=c++20", "-O1", f"-I{root / 'csrc'}", str(root / "tests" / "test_mxfp4_w4a8_decode.cpp"),
                    "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert " 0 mismatches" in result.stdout


# ---- layers on the CPU ----

def run_mxfp4_layer(x, w1, w2, tw, ids, s1, s2, **kw):
    return moe_kernels.cutlass_moe_mxfp4(x, w1, w2, tw, ids, s1, s2, **kw)


@pytest.mark.parametrize("a_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("T", [1, 3])
def test_mxfp4_layer_gpt_oss_layout(a_dtype, T):
    """gpt-oss: H = I = 2880, interleaved gate/up rows, swigluoai, fp32 biases on both GEMMs."""
    E, K, H, I = 4, 2, 2880, 2880
    w1, w2, s1, s2, b1, b2 = layer_weights("mxfp4", E, H, I, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E)
    kw = dict(activation="swigluoai", interleaved=True, w1_bias=b1, w2_bias=b2)
    out = run_mxfp4_layer(x, w1, w2, tw, ids, s1, s2, activation="swigluoai", gate_up_interleaved=True, w1_bias=b1,
                          w2_bias=b2, a_dtype=a_dtype)
    ref = layer_formula(x, decode_mxfp4(w1, s1), decode_mxfp4(w2, s2), tw, ids, fp8=a_dtype == FP8, **kw)
    assert_matches(out, ref)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("interleaved", [False, True])
def test_mxfp4_layer_activations(activation, a_dtype, interleaved):
    E, K, H, I, T = 6, 2, 96, 64, 7
    w1, w2, s1, s2, b1, b2 = layer_weights("mxfp4", E, H, I, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E)
    out = run_mxfp4_layer(x, w1, w2, tw, ids, s1, s2, activation=activation, gate_up_interleaved=interleaved,
                          swiglu_alpha=1.5, swiglu_limit=3.0, w1_bias=b1, w2_bias=b2, a_dtype=a_dtype)
    ref = layer_formula(x, decode_mxfp4(w1, s1), decode_mxfp4(w2, s2), tw, ids, activation=activation,
                        interleaved=interleaved, alpha=1.5, limit=3.0, w1_bias=b1, w2_bias=b2, fp8=a_dtype == FP8)
    assert_matches(out, ref)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_layer_shapes_and_id_dtypes(fmt, T, ids_dtype):
    E, K, H, I = 8, 3, 128, 128
    w1, w2, s1, s2, _, _ = layer_weights(fmt, E, H, I)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E, ids_dtype)
    if fmt == "mxfp4":
        out = moe_kernels.cutlass_moe_mxfp4(x, w1, w2, tw, ids, s1, s2)
    else:
        out = moe_kernels.cutlass_moe_w4a8(x, w1, w2, tw, ids, s1, s2)
    ref = layer_formula(x, decode(fmt, w1, s1), decode(fmt, w2, s2), tw, ids, fp8=fmt == "int4")
    assert out.shape == (T, H)
    assert_matches(out, ref)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_layer_all_tokens_on_one_expert_and_empty_experts(fmt):
    E, K, H, I, T = 5, 1, 128, 256, 9
    w1, w2, s1, s2, b1, b2 = layer_weights(fmt, E, H, I, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw = torch.rand(T, K)
    ids = torch.full((T, K), 3, dtype=torch.int32)
    kw = dict(activation="gelu", w1_bias=b1, w2_bias=b2)
    layer = moe_kernels.cutlass_moe_mxfp4 if fmt == "mxfp4" else moe_kernels.cutlass_moe_w4a8
    out = layer(x, w1, w2, tw, ids, s1, s2, **kw)
    ref = layer_formula(x, decode(fmt, w1, s1), decode(fmt, w2, s2), tw, ids, fp8=fmt == "int4", **kw)
    assert_matches(out, ref)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_layer_expert_map_drops_other_experts(fmt):
    E_global, E_local, K, H, I, T = 12, 5, 4, 128, 128, 11
    w1, w2, s1, s2, b1, b2 = layer_weights(fmt, E_local, H, I, bias=True)
    emap = random_expert_map(E_global, E_local)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E_global)
    kw = dict(activation="swigluoai", w1_bias=b1, w2_bias=b2)
    if fmt == "mxfp4":
        out = moe_kernels.cutlass_moe_mxfp4(x, w1, w2, tw, ids, s1, s2, a_dtype=FP8, expert_map=emap,
                                            num_local_experts=E_local, **kw)
    else:
        out = moe_kernels.cutlass_moe_w4a8(x, w1, w2, tw, ids, s1, s2, expert_map=emap, num_local_experts=E_local,
                                           **kw)
    ref = layer_formula(x, decode(fmt, w1, s1), decode(fmt, w2, s2), tw, ids, fp8=True, expert_map=emap,
                        interleaved=False, **kw)
    assert_matches(out, ref)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_w4a8_layer_static_and_dynamic_scales(static, activation):
    E, K, H, I, T = 4, 2, 256, 128, 6
    w1, w2, s1, s2, b1, b2 = layer_weights("int4", E, H, I, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E, torch.int64)
    a1 = torch.tensor([x.float().abs().max().item() / 400]) if static else None
    a2 = torch.tensor([0.05]) if static else None
    out = moe_kernels.cutlass_moe_w4a8(x, w1, w2, tw, ids, s1, s2, a1, a2, activation=activation,
                                       gate_up_interleaved=True, w1_bias=b1, w2_bias=b2)
    ref = layer_formula(x, decode_int4(w1, s1), decode_int4(w2, s2), tw, ids, activation=activation,
                        interleaved=True, w1_bias=b1, w2_bias=b2, fp8=True, a1_scale=a1, a2_scale=a2)
    assert_matches(out, ref)


@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_layer_opcheck(fmt):
    E, K, H, I, T = 3, 2, 128, 128, 5
    w1, w2, s1, s2, b1, b2 = layer_weights(fmt, E, H, I, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if fmt == "mxfp4":
        opcheck(torch.ops.moe_kernels.cutlass_moe_mxfp4.default, (x, w1, w2, tw, ids, s1, s2),
                dict(activation="swigluoai", gate_up_interleaved=True, w1_bias=b1, w2_bias=b2, a_dtype=FP8),
                test_utils=utils)
    else:
        opcheck(torch.ops.moe_kernels.cutlass_moe_w4a8.default, (x, w1, w2, tw, ids, s1, s2, None, None),
                dict(w1_bias=b1, w2_bias=b2), test_utils=utils)


# ---- SGLang's packed W4AFP8 scales ----

def sglang_pack(scales, pack):
    """SGLang's interleave_scales as its source describes it: [E, N, G] -> [E, G/p, N*p], bf16."""
    E, N, G = scales.shape
    return scales.to(torch.bfloat16).reshape(E, N, G // pack, pack).permute(0, 2, 1, 3).reshape(E, G // pack, N * pack).contiguous()


@pytest.mark.parametrize("k, pack", [(1024, 4), (7168, 4), (768, 2), (768, 1), (384, 1)])  # 768: newer / older SGLang
def test_w4a8_scales_from_sglang_inverts_the_packing(k, pack):
    E, N = 3, 40
    ours = torch.rand(E, N, k // 128) + 0.1
    packed = sglang_pack(ours, pack)
    got = moe_kernels.w4a8_scales_from_sglang(packed, N, k)
    assert got.dtype == torch.float32 and got.shape == (E, N, k // 128)
    torch.testing.assert_close(got, ours.to(torch.bfloat16).float(), rtol=0, atol=0)
    # The same bytes viewed as a one-byte type ([E, K/512, N*8]).
    got_bytes = moe_kernels.w4a8_scales_from_sglang(packed.view(torch.uint8), N, k)
    torch.testing.assert_close(got_bytes, got, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"scales must be \[E, K/\(128\*p\), N\*p\]"):
        moe_kernels.w4a8_scales_from_sglang(packed[:, :, 1:].contiguous(), N, k)


# ---- errors name the argument ----

@pytest.mark.parametrize("device", DEVICES)
def test_gemm_rejects_bad_arguments(device):
    a, a_s, w, s, off = gemm_problem("mxfp4", [2, 3], 64, 64, False, device=device)
    g = moe_kernels.grouped_gemm_mxfp4
    cases = [
        (dict(a=a.float()), "grouped_gemm_mxfp4: a must be bfloat16 or float8_e4m3fn, got Float"),
        (dict(w=w.view(torch.int8)), "grouped_gemm_mxfp4: w must be uint8"),
        (dict(w=w[:, :, :16].contiguous()), r"grouped_gemm_mxfp4: w must be \[E, N, K/2\] with K = a.size\(1\) = 64"),
        (dict(w_scale=s.float()), r"grouped_gemm_mxfp4: w_scale must be uint8 \(E8M0 exponents\), got Float"),
        (dict(w_scale=s[:, :32].contiguous()), r"grouped_gemm_mxfp4: w_scale must be \[E, N, K/32\]"),
        (dict(expert_offsets=off.int()), "grouped_gemm_mxfp4: expert_offsets must be int64, got Int"),
        (dict(expert_offsets=off[:2].contiguous()), r"grouped_gemm_mxfp4: expert_offsets must be \[E \+ 1\]"),
        (dict(bias=torch.randn(2, 64, device=device).double()), "grouped_gemm_mxfp4: bias must be float32, got Double"),
        (dict(bias=torch.randn(2, 32, device=device)), r"grouped_gemm_mxfp4: bias must be \[E, N\] = \[2, 64\]"),
        (dict(a_scale=torch.ones(1, device=device)), "grouped_gemm_mxfp4: a_scale must be None with bfloat16 a"),
        (dict(activation="relu"), "grouped_gemm_mxfp4: activation must be \"none\", \"silu\", \"gelu\" or "
                                  "\"swigluoai\", got \"relu\""),
        (dict(a=a[:, :48].contiguous(), w=w[:, :, :24].contiguous(), w_scale=s[:, :, :1].contiguous()),
         "grouped_gemm_mxfp4: K \\(a.size\\(1\\)\\) must be a positive multiple of 32 \\(the weight scale group\\), got 48"),
    ]
    base = dict(a=a, w=w, w_scale=s, expert_offsets=off, a_scale=None, bias=None, activation="none")
    for change, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            g(**{**base, **change})
    a8 = a.float().to(FP8)
    with pytest.raises(RuntimeError, match="grouped_gemm_mxfp4: a_scale is required with float8_e4m3fn a"):
        g(a8, w, s, off)
    with pytest.raises(RuntimeError, match=r"grouped_gemm_mxfp4: a_scale must be \[1\] \(per tensor\) or \[M\]"):
        g(a8, w, s, off, torch.ones(3, device=device))
    a4, a4_s, w4, s4, off4 = gemm_problem("int4", [2, 3], 64, 128, True, device=device)
    with pytest.raises(RuntimeError, match="grouped_gemm_w4a8: a must be float8_e4m3fn, got BFloat16"):
        moe_kernels.grouped_gemm_w4a8(a4.float().to(torch.bfloat16), w4, s4, off4)
    with pytest.raises(RuntimeError, match="grouped_gemm_w4a8: w_scale must be float32, got Byte"):
        moe_kernels.grouped_gemm_w4a8(a4, w4, s4.to(torch.uint8), off4, a4_s)
    with pytest.raises(RuntimeError, match="grouped_gemm_w4a8: K \\(a.size\\(1\\)\\) must be a positive multiple of 128 \\(the weight"):
        moe_kernels.grouped_gemm_w4a8(a4[:, :64].contiguous(), w4[:, :, :32].contiguous(), s4, off4, a4_s)


@pytest.mark.parametrize("device", DEVICES)
def test_layers_reject_bad_arguments(device):
    E, H, I, T = 4, 128, 128, 3
    w1, w2, s1, s2, b1, b2 = layer_weights("mxfp4", E, H, I, device, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16).to(device)
    tw, ids = routing(T, 2, E, device=device)
    L = moe_kernels.cutlass_moe_mxfp4
    base = dict(hidden_states=x, w1=w1, w2=w2, topk_weights=tw, topk_ids=ids, w1_scale=s1, w2_scale=s2)
    cases = [
        (dict(hidden_states=x.float()), "cutlass_moe_mxfp4: hidden_states must be bfloat16, got Float"),
        (dict(w1=w1[:, :128].contiguous()), r"cutlass_moe_mxfp4: w1 must be uint8 \[E, 2I, H/2\] = \[4, 256, 64\]"),
        (dict(w1=w1.view(torch.int8)), "cutlass_moe_mxfp4: w1 must be uint8 \\(two 4-bit codes a byte\\), got Char"),
        (dict(w2=w2[:, :64].contiguous()), r"cutlass_moe_mxfp4: w2 must be uint8 \[E, H, I/2\]"),
        (dict(w1_scale=s1.float()), r"cutlass_moe_mxfp4: w1_scale must be uint8 \(E8M0 exponents\), got Float"),
        (dict(w2_scale=s2[:, :, :2].contiguous()), r"cutlass_moe_mxfp4: w2_scale must be \[E, H, I/32\] = \[4, 128, 4\]"),
        (dict(w1_bias=b1.double()), "cutlass_moe_mxfp4: w1_bias must be float32, got Double"),
        (dict(w1_bias=b1[:, :I].contiguous()), r"cutlass_moe_mxfp4: w1_bias must be \[E, 2I\] = \[4, 256\]"),
        (dict(w2_bias=b2[:2].contiguous()), r"cutlass_moe_mxfp4: w2_bias must be \[E, H\] = \[4, 128\]"),
        (dict(a_dtype=torch.float16), r"cutlass_moe_mxfp4: a_dtype must be bfloat16 \(W4A16\) or float8_e4m3fn "
                                      r"\(W4A8\), got Half"),
        (dict(activation="relu"), "cutlass_moe_mxfp4: activation must be \"silu\", \"gelu\" or \"swigluoai\", "
                                  "got \"relu\""),
        (dict(topk_ids=ids.float()), "cutlass_moe_mxfp4: topk_ids must be int32 or int64, got Float"),
        (dict(topk_weights=tw[:, :1].contiguous()), r"cutlass_moe_mxfp4: topk_weights must be \[T, K\]"),
        (dict(num_local_experts=3), "cutlass_moe_mxfp4: num_local_experts must be -1 or 4"),
        (dict(expert_map=torch.zeros(8, dtype=torch.int64, device=device)),
         "cutlass_moe_mxfp4: expert_map must be int32, got Long"),
        (dict(hidden_states=x[:, :96].contiguous()),
         r"cutlass_moe_mxfp4: w1 must be uint8 \[E, 2I, H/2\] = \[4, 256, 48\]"),
        (dict(hidden_states=x[:, :112].contiguous()),
         r"cutlass_moe_mxfp4: H \(hidden_states.size\(1\)\) must be a positive multiple of 32, got 112"),
    ]
    for change, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            L(**{**base, **change})
    q1, q2, f1, f2, _, _ = layer_weights("int4", E, H, I, device)
    W = moe_kernels.cutlass_moe_w4a8
    with pytest.raises(RuntimeError, match=r"cutlass_moe_w4a8: a1_scale must be \[1\] \(a static per-tensor scale\)"):
        W(x, q1, q2, tw, ids, f1, f2, torch.ones(2, device=device))
    with pytest.raises(RuntimeError, match="cutlass_moe_w4a8: a2_scale must be float32, got Double"):
        W(x, q1, q2, tw, ids, f1, f2, None, torch.ones(1, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="cutlass_moe_w4a8: w1_scale must be float32, got Byte"):
        W(x, q1, q2, tw, ids, f1.to(torch.uint8), f2)
    with pytest.raises(RuntimeError, match=r"cutlass_moe_w4a8: I \(2 \* w2.size\(2\)\) must be a positive multiple "
                                           "of 128, got 64"):
        W(x, q1, q2[:, :, :32].contiguous(), tw, ids, f1, f2)


# ---- CUDA against the CPU references ----

def to_cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


def assert_cuda_gemm_equals_cpu(fmt, rows, N, K, a_fp8, activation, interleaved):
    """The GEMM on the GPU (allocator NaN-poisoned) against its CPU reference on one random problem with
    a bias; rows past the experts' last row are not compared (the op leaves them unwritten)."""
    a, a_s, w, s, off = gemm_problem(fmt, rows, N, K, a_fp8)
    bias = torch.randn(len(rows), N)
    want = gemm_op(fmt)(a, w, s, off, a_s, bias, activation, interleaved)
    poison_cuda_allocator(0xFF)
    got = gemm_op(fmt)(*to_cuda(a, w, s, off, a_s, bias), activation, interleaved)
    assert_matches(got[: off[-1]], want[: off[-1]].double())


@pytest.mark.cuda
@pytest.mark.parametrize("fmt, a_fp8", [("mxfp4", False), ("mxfp4", True), ("int4", True)])
@pytest.mark.parametrize("activation", ["none"] + ACTIVATIONS)
@pytest.mark.parametrize("rows", [[1, 0, 2, 1], [40, 0, 17, 90, 1]])  # the 16-row and the 64-row tiles
def test_cuda_gemm_equals_cpu_reference(fmt, a_fp8, activation, rows):
    N, K = 2 * 2880 if activation != "none" else 2880, 2880 if fmt == "mxfp4" else 2944
    assert_cuda_gemm_equals_cpu(fmt, rows, N, K, a_fp8, activation, True)


@pytest.mark.cuda
@pytest.mark.parametrize("config", ["mxfp4_gemv", "mxfp4_bm16", "mxfp4_bm64", "int4_gemv", "int4_bm16", "int4_bm64"])
@pytest.mark.parametrize("rows", [[1, 0, 2, 1], [40, 0, 17, 90, 1]])
def test_cuda_every_config_equals_cpu_reference(config, rows, monkeypatch):
    """Each compiled configuration, forced (MOE_KERNELS_W4_GEMM_CONFIG), on few and on many rows per
    expert, with a K tail (MXFP4 K = 2880 = 22.5 tiles of 128) and an N tail (N = 2880 = 45 tiles of 64,
    22.5 of 128)."""
    fmt = config.split("_")[0]
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", config)
    K = 2880 if fmt == "mxfp4" else 2944
    for activation, N in (("none", 2880), ("swigluoai", 2 * 2880)):
        assert_cuda_gemm_equals_cpu(fmt, rows, N, K, True, activation, False)


@pytest.mark.cuda
def test_cuda_unknown_config_name_is_an_error(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", "bm32")
    a, a_s, w, s, off = gemm_problem("mxfp4", [2, 3], 64, 64, False, device="cuda")
    with pytest.raises(RuntimeError, match="grouped_gemm_mxfp4: MOE_KERNELS_W4_GEMM_CONFIG=bm32 names no configuration"):
        moe_kernels.grouped_gemm_mxfp4(a, w, s, off)


@pytest.mark.cuda
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, FP8])
# gpt-oss-20b's H = I = 2880 where the CPU reference stays quick; many rows per expert (the 64-row
# tiles) on smaller sizes.
@pytest.mark.parametrize("T, H, I", [(0, 2880, 2880), (1, 2880, 2880), (7, 2880, 2880), (64, 2880, 2880),
                                     (1000, 256, 512)])
def test_cuda_mxfp4_layer_equals_cpu_reference(a_dtype, T, H, I):
    E, K = 32, 4
    w1, w2, s1, s2, b1, b2 = layer_weights("mxfp4", E, H, I, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E)
    kw = dict(activation="swigluoai", gate_up_interleaved=True, a_dtype=a_dtype)
    want = moe_kernels.cutlass_moe_mxfp4(x, w1, w2, tw, ids, s1, s2, w1_bias=b1, w2_bias=b2, **kw)
    poison_cuda_allocator(0xFF)
    x_, w1_, w2_, tw_, ids_, s1_, s2_, b1_, b2_ = to_cuda(x, w1, w2, tw, ids, s1, s2, b1, b2)
    got = moe_kernels.cutlass_moe_mxfp4(x_, w1_, w2_, tw_, ids_, s1_, s2_, w1_bias=b1_, w2_bias=b2_, **kw)
    assert_matches(got, want.double())


@pytest.mark.cuda
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("T", [1, 64, 300])
def test_cuda_w4a8_layer_equals_cpu_reference(static, T):
    """Half of 32 global experts local (expert_map), 8 choices per token."""
    E, K, H, I = 16, 8, 512, 256
    w1, w2, s1, s2, b1, b2 = layer_weights("int4", E, H, I, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16)
    a1 = torch.tensor([0.01]) if static else None
    a2 = torch.tensor([0.05]) if static else None
    emap = random_expert_map(E * 2, E)
    tw, ids = routing(T, K, E * 2, torch.int64)
    kw = dict(expert_map=emap, num_local_experts=E, activation="silu")
    want = moe_kernels.cutlass_moe_w4a8(x, w1, w2, tw, ids, s1, s2, a1, a2, w1_bias=b1, w2_bias=b2, **kw)
    poison_cuda_allocator(0xFF)
    x_, w1_, w2_, tw_, ids_, s1_, s2_, a1_, a2_, b1_, b2_ = to_cuda(x, w1, w2, tw, ids, s1, s2, a1, a2, b1, b2)
    got = moe_kernels.cutlass_moe_w4a8(x_, w1_, w2_, tw_, ids_, s1_, s2_, a1_, a2_, w1_bias=b1_, w2_bias=b2_,
                                       **{**kw, "expert_map": emap.cuda()})
    assert_matches(got, want.double())


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
@pytest.mark.parametrize("case", ["one_expert", "int64_ids_odd_T", "gelu_plain_layout"])
def test_cuda_layer_cases_equal_cpu_reference(fmt, case):
    """The CPU tests' remaining grid on the GPU: every token on one expert (the others empty), int64 ids
    with an odd T, gelu with gate/up stacked (not interleaved)."""
    E, H, I = 6, 256, 256
    w1, w2, s1, s2, b1, b2 = layer_weights(fmt, E, H, I, bias=True)
    T, K = (33, 1) if case == "one_expert" else (7, 3)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E, torch.int64 if case == "int64_ids_odd_T" else torch.int32)
    if case == "one_expert":
        ids = torch.full((T, K), 4, dtype=torch.int32)
    kw = dict(activation="gelu" if case == "gelu_plain_layout" else "swigluoai",
              gate_up_interleaved=case != "gelu_plain_layout")
    layer = moe_kernels.cutlass_moe_mxfp4 if fmt == "mxfp4" else moe_kernels.cutlass_moe_w4a8
    if fmt == "mxfp4":
        kw["a_dtype"] = FP8 if case == "one_expert" else torch.bfloat16
    want = layer(x, w1, w2, tw, ids, s1, s2, w1_bias=b1, w2_bias=b2, **kw)
    poison_cuda_allocator(0xFF)
    x_, w1_, w2_, tw_, ids_, s1_, s2_, b1_, b2_ = to_cuda(x, w1, w2, tw, ids, s1, s2, b1, b2)
    got = layer(x_, w1_, w2_, tw_, ids_, s1_, s2_, w1_bias=b1_, w2_bias=b2_, **kw)
    assert_matches(got, want.double())


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_cuda_layer_graph_replay(fmt):
    E, K, H, I, T = 8, 2, 256, 128, 64
    w1, w2, s1, s2, b1, b2 = to_cuda(*layer_weights(fmt, E, H, I, bias=True))
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    tw, ids = routing(T, K, E, device="cuda")

    def layer():
        if fmt == "mxfp4":
            return moe_kernels.cutlass_moe_mxfp4(x, w1, w2, tw, ids, s1, s2, w1_bias=b1, w2_bias=b2, a_dtype=FP8)
        return moe_kernels.cutlass_moe_w4a8(x, w1, w2, tw, ids, s1, s2, w1_bias=b1, w2_bias=b2)

    layer()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer()
    x.copy_(torch.randn_like(x))
    ids.copy_(random_topk_ids(T, K, E, device="cuda"))
    graph.replay()
    torch.testing.assert_close(out, layer(), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_rejects_arguments_on_other_devices():
    a, a_s, w, s, off = gemm_problem("mxfp4", [2, 3], 64, 64, False, device="cuda")
    with pytest.raises(RuntimeError, match="grouped_gemm_mxfp4: w_scale must be on cuda:0 \\(as a\\), got cpu"):
        moe_kernels.grouped_gemm_mxfp4(a, w, s.cpu(), off)
    E, H, I, T = 4, 128, 128, 3
    w1, w2, s1, s2, b1, b2 = layer_weights("mxfp4", E, H, I, "cuda", bias=True)
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    tw, ids = routing(T, 2, E, device="cuda")
    with pytest.raises(RuntimeError, match="cutlass_moe_mxfp4: w1_bias must be on cuda:0 \\(as hidden_states\\), got cpu"):
        moe_kernels.cutlass_moe_mxfp4(x, w1, w2, tw, ids, s1, s2, w1_bias=b1.cpu())
