"""scaled_fp8_quant, silu_and_mul_quant_fp8: CPU reference against plain torch formulas, CUDA
against the CPU reference (byte for byte), opcheck, bad inputs, CUDA graphs."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import moe_kernels

from helpers import DEVICES, poison_cuda_allocator

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_SCALE = 1.0 / (448.0 * 512.0)  # the floor of dynamic scales (vLLM's)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MODES = ["static", "per_tensor", "per_token"]


# ---------------------------------------------------------------- plain torch formulas (the spec)

def random_input(M, K, dtype, device="cpu"):
    """Rows of different magnitudes (10^-2 .. 10^2), so that per-token scales differ."""
    x = torch.randn(M, K) * torch.pow(10.0, torch.empty(M, 1).uniform_(-2, 2))
    return x.to(dtype).to(device)


def formula_scale(y, per_token):
    """Dynamic scale: max(amax / 448, 1 / (448 * 512)), in fp32."""
    a = y.abs()
    if per_token:
        amax = a.amax(dim=1, keepdim=True) if y.shape[1] > 0 else torch.zeros(y.shape[0], 1)
    else:
        amax = a.max().reshape(1) if y.numel() > 0 else torch.zeros(1)
    return torch.clamp(amax / E4M3_MAX, min=MIN_SCALE)


def formula_quant(y, scale):
    """q = e4m3(clamp(y * (1 / scale), -448, 448)), the product in fp32."""
    return (y * scale.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def formula_silu_and_mul(x):
    I = x.shape[1] // 2
    xf = x.float()
    return F.silu(xf[:, :I]) * xf[:, I:]


def static_scale_for(y):
    """A static scale that saturates the largest values (about 30% of the range beyond +-448)."""
    amax = y.abs().max() if y.numel() > 0 else torch.tensor(1.0)
    return (amax.float() / E4M3_MAX * 0.7).reshape(1)


def run_op(op, x, mode, scale=None):
    if mode == "static":
        return op(x, scale, False)
    return op(x, None, mode == "per_token")


def e4m3_half_ulp(v):
    """Half the spacing of the e4m3 grid around |v| (subnormal spacing 2^-9 below 2^-6)."""
    exponent = torch.floor(torch.log2(v.abs().clamp(min=2.0**-6)))
    return torch.pow(2.0, exponent - 3) / 2


def assert_within_half_ulp(q, v):
    """q (e4m3) is v (fp64, unsaturated) rounded to the e4m3 grid, allowing for the fp32 rounding
    differences of two silu implementations: |q - clamp(v)| <= half an e4m3 step (+ 1e-5 relative)."""
    want = v.clamp(-E4M3_MAX, E4M3_MAX)
    err = (q.double() - want).abs()
    bound = e4m3_half_ulp(want) * (1 + 1e-5) + 1e-5 * want.abs()
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} values off by more than half an e4m3 step: q={q.double()[bad][:5]}, v={want[bad][:5]}"


def assert_same_bytes(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype == FP8
    ab, bb = a.cpu().view(torch.uint8), b.cpu().view(torch.uint8)
    # Any NaN code matches any other: a NaN made by arithmetic (silu(-inf) = -inf * 0) is negative
    # on x86 (the CPU reference) and positive on NVIDIA GPUs, and e4m3 keeps the sign (0xFF vs 0x7F;
    # seen on the H200 run of 2026-12-04). Every other byte must be equal.
    both_nan = ((ab & 0x7F) == 0x7F) & ((bb & 0x7F) == 0x7F)
    diff = (ab != bb) & ~both_nan
    assert not diff.any(), f"{int(diff.sum())} bytes differ, e.g. {ab[diff][:8].tolist()} vs {bb[diff][:8].tolist()}"


# ---------------------------------------------------------------- CPU reference semantics

SHAPES = [(0, 64), (1, 64), (7, 2056), (1000, 96), (7, 7), (33, 1), (5, 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_scaled_fp8_quant_matches_formula(dtype, M, K, mode):
    x = random_input(M, K, dtype)
    y = x.float()
    given = static_scale_for(y)
    q, scale = run_op(moe_kernels.scaled_fp8_quant, x, mode, given)
    want_scale = given if mode == "static" else formula_scale(y, mode == "per_token")
    # Same fp32 operations as the reference (amax, IEEE division, floor): equal bits.
    assert scale.dtype == torch.float32 and scale.shape == want_scale.shape
    assert torch.equal(scale, want_scale)
    assert q.shape == (M, K)
    assert_same_bytes(q, formula_quant(y, want_scale))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,I", [(0, 64), (1, 64), (7, 1028), (1000, 48), (7, 7), (3, 0)])
@pytest.mark.parametrize("mode", MODES)
def test_silu_and_mul_quant_matches_formula(dtype, M, I, mode):
    x = random_input(M, 2 * I, dtype)
    y = formula_silu_and_mul(x)
    given = static_scale_for(y)
    q, scale = run_op(moe_kernels.silu_and_mul_quant_fp8, x, mode, given)
    assert q.shape == (M, I) and q.dtype == FP8
    if mode == "static":
        assert torch.equal(scale, given)
    else:
        # Our silu's exponential is a polynomial within 1 ulp of exp: amax within a few fp32 ulp.
        torch.testing.assert_close(scale, formula_scale(y, mode == "per_token"), rtol=1e-6, atol=0)
    # Against the exact value y / scale: one e4m3 rounding (half a step), whatever the fp32 path.
    assert_within_half_ulp(q, y.double() / scale.double())


def test_silu_and_mul_quant_equals_quant_of_its_activation_when_exact():
    # Where silu is exact in fp32 (gate = 0 gives 0; large gate gives gate itself), the fused op
    # must give the bytes of scaled_fp8_quant of the product.
    gate = torch.tensor([[0.0, 100.0, -0.0, 90.0], [200.0, 0.0, 150.0, 81.0]])
    up = torch.randn(2, 4)
    q, scale = moe_kernels.silu_and_mul_quant_fp8(torch.cat([gate, up], dim=1), None, True)
    want_q, want_scale = moe_kernels.scaled_fp8_quant(gate * up, None, True)
    assert torch.equal(scale, want_scale)
    assert_same_bytes(q, want_q)


def test_scaled_fp8_quant_saturates_beyond_448_times_scale():
    x = torch.tensor([[1000.0, -1000.0, 224.0, -224.0, 225.0, 1e30, -float("inf"), 223.0, 0.0]])
    q, _ = moe_kernels.scaled_fp8_quant(x, torch.tensor([0.5]))
    assert q.float().tolist() == [[448.0, -448.0, 448.0, -448.0, 448.0, 448.0, -448.0, 448.0, 0.0]]


def test_silu_and_mul_quant_saturates_beyond_448_times_scale():
    # silu(g) = g for g >= 80 in fp32 (e^-80 is below an ulp of 1); silu(-1000) = -0.
    gate = torch.tensor([[1000.0, 224.0, 1e30, 1000.0, 0.0, -1000.0, 2.0]])
    up = torch.tensor([[100.0, 100.0, 100.0, -100.0, 100.0, 100.0, 1.0]])
    q, _ = moe_kernels.silu_and_mul_quant_fp8(torch.cat([gate, up], dim=1), torch.tensor([0.5]))
    silu2 = 2.0 / (1.0 + torch.exp(torch.tensor(-2.0, dtype=torch.float64))).item()
    assert q.float()[0, :6].tolist() == [448.0, 448.0, 448.0, -448.0, 0.0, -0.0]
    assert abs(q.float()[0, 6].item() - silu2 / 0.5) <= 0.125  # 3.52 on the e4m3 grid (step 0.25)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_token", [False, True])
def test_dynamic_scale_maps_amax_to_448(dtype, per_token):
    x = random_input(9, 300, dtype)
    q, scale = moe_kernels.scaled_fp8_quant(x, None, per_token)
    qa = q.float().abs()
    if per_token:
        assert (qa.amax(dim=1) == E4M3_MAX).all()
    else:
        assert qa.max() == E4M3_MAX


@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
@pytest.mark.parametrize("per_token", [False, True])
def test_all_zero_rows_get_the_minimum_scale(op, per_token):
    fn = getattr(moe_kernels, op)
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    if per_token:
        x[1] = torch.randn(64).bfloat16()  # one non-zero row among zero rows
    q, scale = fn(x, None, per_token)
    assert not q.float().isnan().any()
    if per_token:
        for r in (0, 2, 3):
            assert scale[r].item() == pytest.approx(MIN_SCALE, rel=1e-7) and (q[r].float() == 0).all()
        assert scale[1].item() > MIN_SCALE
    else:
        assert scale.item() == pytest.approx(MIN_SCALE, rel=1e-7) and (q.float() == 0).all()


def test_tiny_rows_use_the_scale_floor():
    x = torch.randn(3, 128) * 1e-4  # amax / 448 < 1 / (448 * 512)
    q, scale = moe_kernels.scaled_fp8_quant(x, None, True)
    assert torch.equal(scale, torch.full((3, 1), MIN_SCALE, dtype=torch.float32))
    assert_same_bytes(q, formula_quant(x, scale))


@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
def test_static_scale_ignores_per_token(op):
    fn = getattr(moe_kernels, op)
    x = torch.randn(5, 32)
    s = torch.tensor([0.01])
    q1, s1 = fn(x, s, True)
    q2, s2 = fn(x, s, False)
    assert s1.shape == (1,) and torch.equal(s1, s)
    assert_same_bytes(q1, q2)


@pytest.mark.parametrize("device", DEVICES)
def test_static_scale_is_returned_as_a_copy(device):
    x = torch.randn(5, 32, device=device)
    for s in (torch.tensor([0.02], device=device), torch.tensor(0.02, device=device)):  # [1] or a scalar
        q, out = moe_kernels.scaled_fp8_quant(x, s)
        assert out.shape == (1,) and out.item() == s.item()
        assert out.data_ptr() != s.data_ptr()  # an op output must not alias an input


# ---------------------------------------------------------------- opcheck (fake kernels, schemas)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("M", [0, 9])
def test_opcheck(device, op, mode, M):
    x = random_input(M, 24, torch.bfloat16, device)
    scale = torch.tensor([0.05], device=device)
    args = (x, scale, False) if mode == "static" else (x, None, mode == "per_token")
    opcheck(getattr(torch.ops.moe_kernels, op).default, args)


def test_torch_compile_traces_ops():
    def act(x, h):
        q, s = moe_kernels.scaled_fp8_quant(x, None, True)
        q2, s2 = moe_kernels.silu_and_mul_quant_fp8(h, None, False)
        return q.float() * s, q2.float() * s2

    x, h = torch.randn(6, 32), torch.randn(6, 64)
    compiled = torch.compile(act, backend="eager", fullgraph=True)
    for g, w in zip(compiled(x, h), act(x, h)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------- bad inputs

BAD = [
    (dict(x=torch.zeros(8)), "x must be 2-D"),
    (dict(x=torch.zeros(4, 8, dtype=torch.int32)), "x must be bfloat16, float16 or float32, got Int"),
    (dict(x=torch.zeros(4, 8).to(FP8)), "x must be bfloat16, float16 or float32, got Float8_e4m3fn"),
    (dict(x=torch.zeros(8, 4).t()), "x must be contiguous"),
    (dict(scale=torch.ones(1, dtype=torch.float64)), "scale must be float32, got Double"),
    (dict(scale=torch.ones(2)), r"scale must have shape \[1\] \(a static per-tensor scale\), got shape \[2\]"),
    (dict(scale=torch.ones(4, 1)), r"scale must have shape \[1\]"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
@pytest.mark.parametrize("override,message", BAD)
def test_rejects_bad_arguments(device, op, override, message):
    args = dict(x=torch.zeros(4, 8), scale=None, per_token=False)
    args.update(override)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=f"{op}: {message}"):
        getattr(moe_kernels, op)(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_rejects_odd_columns(device):
    with pytest.raises(RuntimeError, match=r"silu_and_mul_quant_fp8: x must have an even number of columns .* got 7"):
        moe_kernels.silu_and_mul_quant_fp8(torch.zeros(4, 7, device=device))
    with pytest.raises(RuntimeError, match=r"silu_and_mul_quant_fp8: x must be 2-D \[M, 2I\]"):
        moe_kernels.silu_and_mul_quant_fp8(torch.zeros(4, device=device))


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
def test_rejects_scale_on_another_device(op):
    fn = getattr(moe_kernels, op)
    with pytest.raises(RuntimeError, match=f"{op}: scale must be on cuda:0 \\(as x\\), got cpu"):
        fn(torch.zeros(4, 8, device="cuda"), torch.ones(1))
    with pytest.raises(RuntimeError, match=f"{op}: scale must be on cpu \\(as x\\), got cuda:0"):
        fn(torch.zeros(4, 8), torch.ones(1, device="cuda"))


# ---------------------------------------------------------------- CUDA against the CPU reference

def cpu_quant_with_scale(op, x, scale):
    """The CPU reference's q for the given (GPU-computed) scale: the dynamic scale of the GPU may
    differ from the CPU's in its last bit (it should not, but a tolerance is allowed on it), and
    q is then compared byte for byte under the same scale, without double-rounding flakiness."""
    fn = getattr(moe_kernels, op)
    x, scale = x.cpu(), scale.cpu()
    if scale.shape == (1,):
        return fn(x, scale)[0]
    rows = [fn(x[r:r + 1], scale[r].reshape(1))[0] for r in range(x.shape[0])]  # per token
    return torch.cat(rows) if rows else fn(x, torch.ones(1))[0]


def check_cuda_matches_cpu(op, x, mode, poison=0xFF):
    fn = getattr(moe_kernels, op)
    y = formula_silu_and_mul(x) if op == "silu_and_mul_quant_fp8" else x.float()
    given = static_scale_for(y)
    want_q, want_scale = run_op(fn, x, mode, given)
    poison_cuda_allocator(poison)
    q, scale = run_op(fn, x.cuda(), mode, given.cuda())
    torch.cuda.synchronize()
    assert q.device.type == "cuda" and scale.device.type == "cuda"
    assert q.shape == want_q.shape and scale.shape == want_scale.shape
    if mode == "static":
        assert torch.equal(scale.cpu(), given)
    else:
        # Same operations on both sides (exact max, IEEE division): equal in practice.
        torch.testing.assert_close(scale.cpu(), want_scale, rtol=1e-6, atol=0)
    assert_same_bytes(q, cpu_quant_with_scale(op, x, scale))
    assert not q.cpu().float().isnan().any()  # finite inputs: an unwritten (poisoned) byte is NaN


CUDA_SHAPES = [(0, 64), (1, 4096), (7, 2056), (1000, 2056), (7, 7), (1000, 7), (33, 2), (9, 12), (5, 0),
               (64, 7168), (3, 10240), (5, 12288), (2, 16384), (1000, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K", CUDA_SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_scaled_fp8_quant_cuda_matches_cpu(dtype, M, K, mode):
    check_cuda_matches_cpu("scaled_fp8_quant", random_input(M, K, dtype), mode)


CUDA_SILU_SHAPES = [(0, 64), (1, 2048), (7, 1028), (1000, 2056), (7, 7), (1000, 3), (33, 2), (9, 12), (5, 0),
                    (64, 1536), (3, 10240), (5, 12288), (2, 14336), (1000, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,I", CUDA_SILU_SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_silu_and_mul_quant_cuda_matches_cpu(dtype, M, I, mode):
    check_cuda_matches_cpu("silu_and_mul_quant_fp8", random_input(M, 2 * I, dtype), mode)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("poison", [0xFF, 0x00])
def test_cuda_matches_cpu_on_misaligned_rows(op, mode, poison):
    # A view with a storage offset of one element: 16-byte loads are impossible, narrower ones used.
    M, K = 37, 1024
    base = torch.randn(M * K + 1).bfloat16()
    check_cuda_matches_cpu(op, base[1:].view(M, K), mode, poison)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_special_values(op, mode):
    # All-zero rows (minimum scale), saturation (static), gates far in both tails of silu.
    x = random_input(64, 512, torch.bfloat16)
    x[3] = 0
    x[10:20] = 0
    x[40, :10] = torch.tensor([-100.0, 100.0, -88.5, 88.5, -80.5, 80.5, 1e4, -1e4, 79.5, -79.5]).bfloat16()
    check_cuda_matches_cpu(op, x, mode)
    q, scale = run_op(getattr(moe_kernels, op), x.cuda(), mode, torch.tensor([1e-3], device="cuda"))
    if mode == "per_token":
        assert torch.equal(scale[3].cpu(), torch.tensor([MIN_SCALE])) and (q[3].float() == 0).all()


@pytest.mark.cuda
def test_cuda_all_zero_tensor_dynamic_per_tensor():
    for op in ("scaled_fp8_quant", "silu_and_mul_quant_fp8"):
        q, scale = getattr(moe_kernels, op)(torch.zeros(100, 256, device="cuda", dtype=torch.float16))
        assert scale.item() == pytest.approx(MIN_SCALE, rel=1e-7)
        assert (q.float() == 0).all()


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay():
    x = torch.randn(300, 2056, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(300, 2 * 1536, device="cuda", dtype=torch.bfloat16)
    static = torch.tensor([0.01], device="cuda")

    def run():
        outs = []
        for mode in MODES:
            outs += run_op(moe_kernels.scaled_fp8_quant, x, mode, static)
            outs += run_op(moe_kernels.silu_and_mul_quant_fp8, h, mode, static)
        return outs

    run()  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(2):  # new inputs, copied into the captured buffers
        x.copy_(torch.randn_like(x) * 3)
        h.copy_(torch.randn_like(h))
        static.fill_(torch.rand(()).item() * 0.02 + 1e-3)
        graph.replay()
        for got, want in zip(captured, run()):
            if got.dtype == FP8:
                assert_same_bytes(got, want)
            else:
                assert torch.equal(got, want)


@pytest.mark.cuda
def test_ops_run_on_the_current_stream():
    x = torch.randn(500, 4096, device="cuda")
    x_new = torch.randn(500, 4096, device="cuda") * 5
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # An op launched on any other stream would run before this copy and read the old x.
        torch.cuda._sleep(50_000_000)
        x.copy_(x_new)
        q, scale = moe_kernels.scaled_fp8_quant(x, None, False)
        q2, scale2 = moe_kernels.silu_and_mul_quant_fp8(x, None, True)
    side.synchronize()
    want_q, want_scale = moe_kernels.scaled_fp8_quant(x_new.cpu(), None, False)
    assert torch.equal(scale.cpu(), want_scale)
    assert_same_bytes(q, want_q)
    want_q2, want_scale2 = moe_kernels.silu_and_mul_quant_fp8(x_new.cpu(), None, True)
    assert torch.equal(scale2.cpu(), want_scale2)
    assert_same_bytes(q2, want_q2)


# ---------------------------------------------------------------- per-group scales (1 x group_size)

GROUP_AMAX_FLOOR = 1e-10  # vLLM's and SGLang's eps on a group's amax


def formula_group_scales(y, g):
    """max(amax over the group's finite values, 1e-10) / 448 per (row, group), in fp32: [T, K // g]."""
    T, K = y.shape
    a = y.abs()
    a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    amax = a.reshape(T, K // g, g).amax(dim=2) if T * K > 0 else torch.zeros(T, K // g)
    return amax.clamp(min=GROUP_AMAX_FLOOR) / E4M3_MAX


def formula_group_quant(y, scales, g):
    """q = e4m3(clamp(y / scale, -448, 448)), an fp32 division by the scale of the element's group."""
    return (y / scales.repeat_interleave(g, dim=1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)


def assert_group_scales_layout(scales, T, G, column_major):
    assert scales.shape == (T, G) and scales.dtype == torch.float32
    if column_major and T > 1 and G > 1:
        assert scales.stride() == (1, T)
    elif not column_major:
        assert scales.is_contiguous()


GROUP_SHAPES = [(0, 128, 128), (1, 128, 128), (7, 384, 128), (33, 7168, 128), (5, 256, 64), (9, 48, 16),
                (3, 21, 7), (4, 2048, 1024), (6, 0, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,g", GROUP_SHAPES)
@pytest.mark.parametrize("column_major", [False, True])
def test_group_quant_matches_formula(dtype, T, K, g, column_major):
    x = random_input(T, K, dtype)
    # Groups of very different magnitudes inside one row, so that the per-group scales matter.
    if T * K:
        x = (x.float() * torch.pow(10.0, torch.empty(1, K // g).uniform_(-2, 2)).repeat_interleave(g, dim=1)).to(dtype)
    y = x.float()
    q, scales = moe_kernels.per_token_group_quant_fp8(x, g, column_major)
    want = formula_group_scales(y, g)
    assert_group_scales_layout(scales, T, K // g, column_major)
    # The same fp32 operations (an exact max, one IEEE division): equal bits.
    assert torch.equal(scales, want)
    assert q.shape == (T, K)
    assert_same_bytes(q, formula_group_quant(y, want, g))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_quant_maps_each_group_amax_to_448(dtype):
    x = random_input(5, 512, dtype)
    q, scales = moe_kernels.per_token_group_quant_fp8(x, 128)
    assert (q.float().abs().reshape(5, 4, 128).amax(dim=2) == E4M3_MAX).all()
    # Dequantized, every value is within half an e4m3 step of x: 2^-4 relative for normals, half
    # the subnormal spacing (2^-10) times the scale below 2^-6.
    s = scales.repeat_interleave(128, dim=1)
    err = (q.float() * s - x.float()).abs()
    assert (err <= 2.0**-4 * x.float().abs() + 2.0**-10 * s).all()


def test_group_quant_default_group_size_is_128():
    x = random_input(3, 512, torch.bfloat16)
    q, scales = moe_kernels.per_token_group_quant_fp8(x)
    assert scales.shape == (3, 4)
    q2, scales2 = moe_kernels.per_token_group_quant_fp8(x, 128, False)
    assert torch.equal(scales, scales2)
    assert_same_bytes(q, q2)


def test_group_quant_saturates_infinities_and_floors_zero_groups():
    x = torch.randn(2, 256)
    x[0, 3], x[0, 70] = float("inf"), -float("inf")  # group 0 of row 0
    x[1, 128:] = 0  # group 1 of row 1: all zero
    x[1, 0:128] = float("inf")  # group 0 of row 1: all +inf
    q, scales = moe_kernels.per_token_group_quant_fp8(x, 128)
    finite = x[0, :128][torch.isfinite(x[0, :128])]
    assert scales[0, 0].item() == (finite.abs().max() / E4M3_MAX).item()  # infinities left out of amax
    assert q[0, 3].float().item() == E4M3_MAX and q[0, 70].float().item() == -E4M3_MAX
    assert not q.float().isnan().any()
    assert torch.equal(scales[1], torch.full((2,), GROUP_AMAX_FLOOR, dtype=torch.float32) / E4M3_MAX)
    assert (q[1, :128].float() == E4M3_MAX).all() and (q[1, 128:].float() == 0).all()
    assert_same_bytes(q, formula_group_quant(x, formula_group_scales(x, 128), 128))


def test_group_quant_column_major_holds_the_same_values():
    x = random_input(37, 1024, torch.bfloat16)
    q_r, s_r = moe_kernels.per_token_group_quant_fp8(x, 128, False)
    q_c, s_c = moe_kernels.per_token_group_quant_fp8(x, 128, True)
    assert s_c.stride() == (1, 37) and s_c.t().is_contiguous()
    assert torch.equal(s_r, s_c)
    assert_same_bytes(q_r, q_c)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,I,g", [(0, 128, 128), (1, 128, 128), (7, 768, 128), (33, 256, 64), (5, 48, 16)])
def test_silu_and_mul_group_quant_matches_formula(dtype, M, I, g):
    x = random_input(M, 2 * I, dtype)
    y = formula_silu_and_mul(x)
    q, scales = moe_kernels.silu_and_mul_quant_fp8(x, None, False, g)
    assert q.shape == (M, I) and q.dtype == FP8
    assert scales.shape == (M, I // g) and scales.is_contiguous()
    # Our silu's exponential is a polynomial within 1 ulp of exp: amax within a few fp32 ulp.
    torch.testing.assert_close(scales, formula_group_scales(y, g), rtol=1e-6, atol=0)
    # Against the exact y / scale: one e4m3 rounding (half a step), whatever the fp32 path.
    assert_within_half_ulp(q, y.double() / scales.double().repeat_interleave(g, dim=1))


def test_silu_and_mul_group_quant_equals_group_quant_of_its_activation_when_exact():
    # silu is exact in fp32 for gate = 0 and gate >= 80: the fused op must give the bytes of
    # per_token_group_quant_fp8 of the product.
    gate = torch.tensor([0.0, 100.0, -0.0, 90.0, 200.0, 81.0, 150.0, 0.0]).repeat(3, 16)  # [3, 128]
    up = torch.randn(3, 128)
    q, scales = moe_kernels.silu_and_mul_quant_fp8(torch.cat([gate, up], dim=1), None, False, 32)
    want_q, want_scales = moe_kernels.per_token_group_quant_fp8(gate * up, 32)
    assert torch.equal(scales, want_scales)
    assert_same_bytes(q, want_q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("T", [0, 9])
def test_group_quant_opcheck(device, column_major, T):
    x = random_input(T, 256, torch.bfloat16, device)
    opcheck(torch.ops.moe_kernels.per_token_group_quant_fp8.default, (x, 128, column_major))
    opcheck(torch.ops.moe_kernels.silu_and_mul_quant_fp8.default, (x, None, False, 64))


def test_torch_compile_traces_group_ops():
    def act(x, h):
        q, s = moe_kernels.per_token_group_quant_fp8(x, 64, True)
        q2, s2 = moe_kernels.silu_and_mul_quant_fp8(h, None, False, 32)
        return q.float() * s.repeat_interleave(64, dim=1), q2.float() * s2.repeat_interleave(32, dim=1)

    x, h = torch.randn(6, 128), torch.randn(6, 128)
    compiled = torch.compile(act, backend="eager", fullgraph=True)
    for g, w in zip(compiled(x, h), act(x, h)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


GROUP_BAD = [
    (dict(x=torch.zeros(4, 100)), r"x's K \(its columns\) must be a multiple of group_size=128, got K=100"),
    (dict(x=torch.zeros(4, 128), group_size=0), "group_size must be positive, got 0"),
    (dict(x=torch.zeros(4, 128), group_size=-128), "group_size must be positive, got -128"),
    (dict(x=torch.zeros(4, 128, dtype=torch.int32)), "x must be bfloat16, float16 or float32, got Int"),
    (dict(x=torch.zeros(4, 128).to(FP8)), "x must be bfloat16, float16 or float32, got Float8_e4m3fn"),
    (dict(x=torch.zeros(128)), "x must be 2-D"),
    (dict(x=torch.zeros(128, 4).t()), "x must be contiguous"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("override,message", GROUP_BAD)
def test_group_quant_rejects_bad_arguments(device, override, message):
    args = dict(group_size=128, column_major_scales=False)
    args.update(override)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=f"per_token_group_quant_fp8: {message}"):
        torch.ops.moe_kernels.per_token_group_quant_fp8(args["x"], args["group_size"], args["column_major_scales"])


SILU_GROUP_BAD = [
    (dict(x=torch.zeros(4, 200)), r"x's I \(half its columns, the columns of q\) must be a multiple of "
                                  r"group_size=128, got I=100"),
    (dict(group_size=-1), "group_size must be >= 0"),
    (dict(scale=torch.ones(1)), "scale must be None with group_size > 0"),
    (dict(per_token=True), "per_token must be False with group_size > 0"),
    (dict(x=torch.zeros(4, 256, dtype=torch.float64)), "x must be bfloat16, float16 or float32, got Double"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("override,message", SILU_GROUP_BAD)
def test_silu_and_mul_group_quant_rejects_bad_arguments(device, override, message):
    args = dict(x=torch.zeros(4, 256), scale=None, per_token=False, group_size=128)
    args.update(override)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(RuntimeError, match=f"silu_and_mul_quant_fp8: {message}"):
        moe_kernels.silu_and_mul_quant_fp8(**args)


# ---------------------------------------------------------------- per-group: CUDA against the CPU reference

def check_group_cuda_matches_cpu(op, x, g, column_major=False, poison=0xFF):
    """CUDA and CPU give the same scales (bits) and the same bytes: both take an exact max and
    one IEEE division per value; outputs are poisoned beforehand, so an unwritten one fails."""
    if op == "per_token_group_quant_fp8":
        fn = lambda t: moe_kernels.per_token_group_quant_fp8(t, g, column_major)  # noqa: E731
    else:
        fn = lambda t: moe_kernels.silu_and_mul_quant_fp8(t, None, False, g)  # noqa: E731
    want_q, want_scales = fn(x)
    poison_cuda_allocator(poison)
    q, scales = fn(x.cuda())
    torch.cuda.synchronize()
    assert q.device.type == "cuda" and scales.device.type == "cuda"
    assert scales.shape == want_scales.shape and scales.stride() == want_scales.stride()
    assert torch.equal(scales.cpu(), want_scales)
    assert_same_bytes(q, want_q)
    assert not q.cpu().float().isnan().any()  # finite inputs: an unwritten (poisoned) byte is NaN


# (T, K, group_size): 16-byte vectors with 1, 2, 16 vectors a group; 32 lanes looping twice (fp32
# g=256, bf16 g=1024); odd group sizes (scalar loads); T = 0, 1, odd; DeepSeek-V3's H and I.
CUDA_GROUP_SHAPES = [(0, 128, 128), (1, 7168, 128), (7, 2048, 128), (1000, 7168, 128), (33, 384, 128),
                     (9, 256, 64), (65, 64, 16), (5, 1024, 256), (3, 4096, 1024), (11, 21, 7), (4, 96, 3),
                     (4096, 512, 128), (2, 0, 128)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K,g", CUDA_GROUP_SHAPES)
@pytest.mark.parametrize("column_major", [False, True])
def test_group_quant_cuda_matches_cpu(dtype, T, K, g, column_major):
    check_group_cuda_matches_cpu("per_token_group_quant_fp8", random_input(T, K, dtype), g, column_major)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,I,g", [(0, 128, 128), (1, 2048, 128), (7, 1536, 128), (1000, 768, 128), (33, 256, 64),
                                   (65, 64, 16), (5, 1024, 256), (3, 4096, 1024), (11, 21, 7), (2, 0, 128)])
def test_silu_and_mul_group_quant_cuda_matches_cpu(dtype, M, I, g):
    check_group_cuda_matches_cpu("silu_and_mul_quant_fp8", random_input(M, 2 * I, dtype), g)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["per_token_group_quant_fp8", "silu_and_mul_quant_fp8"])
@pytest.mark.parametrize("poison", [0xFF, 0x00])
def test_group_quant_cuda_matches_cpu_on_misaligned_rows(op, poison):
    # A view with a storage offset of one element: 16-byte loads are impossible, scalar ones used.
    T, K = 37, 1024
    base = torch.randn(T * K + 1).bfloat16()
    check_group_cuda_matches_cpu(op, base[1:].view(T, K), 128, poison=poison)


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["per_token_group_quant_fp8", "silu_and_mul_quant_fp8"])
def test_group_quant_cuda_special_values(op):
    # Zero groups (floor), infinities (left out of amax, saturated), NaN (stays NaN), silu's tails.
    x = random_input(64, 512, torch.bfloat16)
    x[3] = 0
    x[5, :128] = 0
    x[40, :10] = torch.tensor([-100.0, 100.0, -88.5, 88.5, -80.5, 80.5, 1e4, -1e4, 79.5, -79.5]).bfloat16()
    x[50, 7], x[50, 300], x[51, 0:128] = float("inf"), -float("inf"), float("inf")
    x[60, 9] = float("nan")
    fn = (lambda t: moe_kernels.per_token_group_quant_fp8(t, 128)) if op == "per_token_group_quant_fp8" else \
        (lambda t: moe_kernels.silu_and_mul_quant_fp8(t, None, False, 64))
    want_q, want_scales = fn(x)
    q, scales = fn(x.cuda())
    assert torch.equal(scales.cpu(), want_scales)
    assert_same_bytes(q, want_q)


@pytest.mark.cuda
def test_group_quant_cuda_graph_capture_and_replay():
    x = torch.randn(300, 7168, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(300, 2 * 2048, device="cuda", dtype=torch.bfloat16)

    def run():
        return [*moe_kernels.per_token_group_quant_fp8(x, 128), *moe_kernels.per_token_group_quant_fp8(x, 128, True),
                *moe_kernels.silu_and_mul_quant_fp8(h, None, False, 128)]

    run()  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(2):  # new inputs, copied into the captured buffers
        x.copy_(torch.randn_like(x) * 3)
        h.copy_(torch.randn_like(h))
        graph.replay()
        for got, want in zip(captured, run()):
            if got.dtype == FP8:
                assert_same_bytes(got, want)
            else:
                assert torch.equal(got, want)


# ---------------------------------------------------------------- per-token row lengths (CUDA)
#
# The per-token kernel (fp8_quant.cuh) gives a row to a block; its y waits in shared memory up to
# 10240 columns and is recomputed from x beyond. These column counts sit on either side of that
# bound, of the 16-byte vector widths (8 bf16/fp16 values, 4 fp32) and of powers of two, odd counts
# (the scalar path) among them, up to rows several times longer than the shared-memory bound.
# (An experiment of issue 22 gave rows to teams of warps holding them in registers; it measured no
# gain on the H200 and was reverted. These tests stay as row-length coverage.)
TOKEN_BRANCH_COLS = [128, 129, 255, 257, 512, 513, 1023, 1024, 1025, 1032, 2048, 2049, 2056, 4096, 4104, 8192,
                     8200, 12288, 12296, 14336, 16384, 16392, 24576, 24577]


def check_per_token_cuda_equals_cpu(op, x, poison=0xFF):
    """Per-token scales bit for bit and e4m3 bytes byte for byte against the CPU reference, outputs
    poisoned beforehand (0xFF is NaN in e4m3 and fp32: an unwritten element fails)."""
    fn = getattr(moe_kernels, op)
    want_q, want_s = fn(x, None, True)
    poison_cuda_allocator(poison)
    q, s = fn(x.cuda(), None, True)
    torch.cuda.synchronize()
    assert torch.equal(s.cpu(), want_s)
    assert_same_bytes(q, want_q)
    assert not q.cpu().float().isnan().any()


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", TOKEN_BRANCH_COLS)
def test_per_token_cuda_equals_cpu_across_row_lengths(op, dtype, cols):
    M = 9
    K = 2 * cols if op == "silu_and_mul_quant_fp8" else cols
    check_per_token_cuda_equals_cpu(op, random_input(M, K, dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("op,M,cols", [("scaled_fp8_quant", 8500, 2056), ("scaled_fp8_quant", 4300, 4104),
                                       ("silu_and_mul_quant_fp8", 2200, 8200), ("silu_and_mul_quant_fp8", 2200, 14336)])
def test_per_token_cuda_equals_cpu_when_blocks_take_several_rows(op, M, cols):
    # More rows than the grid has blocks: each block loops over rows.
    K = 2 * cols if op == "silu_and_mul_quant_fp8" else cols
    check_per_token_cuda_equals_cpu(op, random_input(M, K, torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["scaled_fp8_quant", "silu_and_mul_quant_fp8"])
@pytest.mark.parametrize("cols", [2048, 14336, 24576])
def test_per_token_cuda_special_values_at_row_ends(op, cols):
    # Zero rows (floor), infinities (left out of amax, saturated), NaN (stays NaN) placed at the
    # start and the end of long rows (past the shared-memory bound) and of short ones.
    K = 2 * cols if op == "silu_and_mul_quant_fp8" else cols
    x = random_input(6, K, torch.bfloat16)
    x[1] = 0
    x[2, 3], x[2, K - 1] = float("inf"), -float("inf")
    x[3, 5], x[3, K - 2] = float("nan"), 1e4
    x[4, -8:] = float("inf")
    fn = getattr(moe_kernels, op)
    want_q, want_s = fn(x, None, True)
    q, s = fn(x.cuda(), None, True)
    assert torch.equal(s.cpu(), want_s)
    assert_same_bytes(q, want_q)


# Group mode: more groups than one grid step covers (the grid loops), rows with fewer groups than a
# warp holds (a warp's groups span several rows), and counts that leave a step partly empty.
@pytest.mark.cuda
@pytest.mark.parametrize("op,T,K,g", [("per_token_group_quant_fp8", 4096, 7168, 128), ("per_token_group_quant_fp8", 77, 128, 128),
                                      ("per_token_group_quant_fp8", 13, 48, 16), ("per_token_group_quant_fp8", 5, 24, 3),
                                      ("silu_and_mul_quant_fp8", 4096, 2048, 128), ("silu_and_mul_quant_fp8", 77, 128, 128),
                                      ("silu_and_mul_quant_fp8", 13, 48, 16), ("silu_and_mul_quant_fp8", 3, 5120, 512)])
def test_group_quant_cuda_equals_cpu_across_grid_steps(op, T, K, g):
    width = 2 * K if op == "silu_and_mul_quant_fp8" else K
    check_group_cuda_matches_cpu(op, random_input(T, width, torch.bfloat16), g)


@pytest.mark.cuda
def test_per_token_long_rows_capture_in_a_cuda_graph():
    # Rows past the shared-memory bound: Mixtral's 14336 gated columns and a plain row of 24576
    # bf16 columns (y recomputed from x).
    h = torch.randn(40, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(40, 24576, device="cuda", dtype=torch.bfloat16)

    def run():
        return [*moe_kernels.silu_and_mul_quant_fp8(h, None, True), *moe_kernels.scaled_fp8_quant(x, None, True)]

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    h.copy_(torch.randn_like(h) * 5)
    x.copy_(torch.randn_like(x) * 0.1)
    graph.replay()
    for got, want in zip(captured, run()):
        if got.dtype == FP8:
            assert_same_bytes(got, want)
        else:
            assert torch.equal(got, want)
