"""The decode GEMV configurations of the 4-bit grouped GEMMs (mxfp4_gemv, int4_gemv;
csrc/gemm/grouped_gemv_w4.cuh), forced through MOE_KERNELS_W4_GEMM_CONFIG, against the CPU reference
and a plain float64 torch formula on weights decoded in Python (test_mxfp4_w4a8.py's), outputs
NaN-poisoned; and (on the host) the configuration table that picks them at decode.

Tolerances: those of test_mxfp4_w4a8.assert_matches (rtol 1e-2, atol 1e-2 of the largest magnitude),
justified there: the kernel's products are exactly the reference's (bf16 activation times bf16
decoded weight, exact in fp32) and only the order of the fp32 sum differs, so the GEMV and the
CPU reference differ by at most a bf16 rounding flip of the output (2^-8 relative), and the formula
by that plus the float64 sum.
"""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import moe_kernels

from helpers import poison_cuda_allocator
from test_mxfp4_w4a8 import ACTIVATIONS, assert_matches, decode, gemm_formula, gemm_op, gemm_problem, to_cuda

GEMV_CASES = [("mxfp4_gemv", "mxfp4", False), ("mxfp4_gemv", "mxfp4", True), ("int4_gemv", "int4", True)]
# Rows per expert: decode (1-2 and empty experts), all rows on one expert (9 > 4 rows a pass: passes
# of 4, 4 and 1), M = 1, a mix of every pass width (3 = 2 + 1, 7 = 4 + 2 + 1).
ROWS = {"decode": [1, 0, 2, 1], "one_expert": [0, 0, 9, 0, 0], "m1": [0, 1, 0], "mixed": [3, 0, 0, 5, 2, 0, 7]}


# ---- on the host: the configuration table ----

@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_selection_takes_the_gemv_at_decode(tmp_path):
    """select_w4_gemm takes the GEMV while M / E <= kGemvMaxAvgRowsPerExpert, bm16 / bm64 above;
    find_w4_gemm knows the GEMV names; MOE_KERNELS_W4_GEMM_CONFIG still reaches bm16 at decode."""
    root = Path(__file__).resolve().parent.parent
    cuda_include = cuda_include_dir()
    if cuda_include is None:
        pytest.skip("needs the CUDA headers (cuda_runtime.h) for w4_launchers.h")
    exe = tmp_path / "select_check"
    subprocess.run(["g++", "-std=c++20", "-O1", f"-I{root / 'csrc'}", f"-I{cuda_include}",
                    str(root / "csrc" / "gemm" / "grouped_gemm_w4.cpp"),
                    str(root / "tests" / "test_mxfp4_w4a8_select.cpp"), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "0 failures" in result.stdout


def cuda_include_dir():
    homes = [cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    found = [Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    return found[0] if found else None


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_gemv_kernel_emulated_on_the_host_equals_cpu_reference(tmp_path):
    """The GEMV kernel's body compiled with g++, each warp's lanes run as threads meeting at every
    ballot and shuffle (tests/test_mxfp4_w4a8_gemv_emu.cpp), against the CPU reference: indexing,
    gated layouts, scale groups, K and N tails, row passes, both formats, bf16 and e4m3, NaN-filled
    outputs (rows past the experts must stay NaN). Not a substitute for the GPU tests below."""
    root = Path(__file__).resolve().parent.parent
    include = cuda_include_dir()
    if include is None:
        pytest.skip("needs the CUDA headers (cuda_runtime.h, cuda_bf16.h, cuda_fp8.h)")
    exe = tmp_path / "gemv_emu"
    subprocess.run(["g++", "-std=c++20", "-O2", "-w", f"-I{root / 'csrc'}", f"-I{include}",
                    str(root / "csrc" / "gemm" / "grouped_gemm_w4_cpu.cpp"),
                    str(root / "tests" / "test_mxfp4_w4a8_gemv_emu.cpp"), "-o", str(exe), "-lpthread"], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "\n0 failures" in result.stdout


# ---- on the GPU ----

def run_gemv(fmt, rows, N, K, a_fp8, activation, interleaved, bias=True, per_row=True):
    """One random problem through the forced GEMV (allocator poisoned), its CPU reference and the
    formula; returns (got, reference, formula) on the rows the op writes."""
    a, a_s, w, s, off = gemm_problem(fmt, rows, N, K, a_fp8, per_row=per_row)
    b = torch.randn(len(rows), N) if bias else None
    op = gemm_op(fmt)
    want = op(a, w, s, off, a_s, b, activation, interleaved)
    formula = gemm_formula(a, a_s, decode(fmt, w, s), off, b, activation, interleaved)
    poison_cuda_allocator(0xFF)
    got = op(*to_cuda(a, w, s, off, a_s, b), activation, interleaved)
    m = int(off[-1])
    return got[:m], want[:m], formula


@pytest.mark.cuda
@pytest.mark.parametrize("config, fmt, a_fp8", GEMV_CASES)
@pytest.mark.parametrize("activation", ["none"] + ACTIVATIONS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS.keys()))
def test_cuda_gemv_equals_cpu_reference_and_formula(config, fmt, a_fp8, activation, interleaved, rows, monkeypatch):
    """Every activation (gated: N/2 columns, both gate/up layouts) with a bias; N not a multiple of a
    CTA's 16 weight rows (8 gated columns) and K not a multiple of a warp's 32 x 2 chunks."""
    if activation == "none" and interleaved:
        pytest.skip("interleaving only applies to gated activations")
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", config)
    K = 2080 if fmt == "mxfp4" else 2176  # 65 and 68 chunks of 32: tails in the unrolled K loop
    N = 2 * 164 if activation != "none" else 164
    got, want, formula = run_gemv(fmt, rows, N, K, a_fp8, activation, interleaved)
    assert_matches(got, want.double())
    assert_matches(got, formula)


@pytest.mark.cuda
@pytest.mark.parametrize("config, fmt, a_fp8", GEMV_CASES)
@pytest.mark.parametrize("per_row", [False, True])
def test_cuda_gemv_without_bias_and_scale_kinds(config, fmt, a_fp8, per_row, monkeypatch):
    """No bias; e4m3 activations with a per-tensor and a per-row scale (bf16: no scale)."""
    if not a_fp8 and not per_row:
        pytest.skip("bf16 activations take no scale")
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", config)
    K = 256 if fmt == "int4" else 96
    got, want, formula = run_gemv(fmt, [2, 0, 5, 1], 72, K, a_fp8, "silu", False, bias=False, per_row=per_row)
    assert_matches(got, want.double())
    assert_matches(got, formula)


@pytest.mark.cuda
@pytest.mark.parametrize("config, fmt, a_fp8", GEMV_CASES)
@pytest.mark.parametrize("activation", ["none", "swigluoai"])
def test_cuda_gemv_gpt_oss_sizes(config, fmt, a_fp8, activation, monkeypatch):
    """gpt-oss's H = I = 2880 (GEMM1: N = 2 * 2880 interleaved swigluoai; GEMM2: N = 2880), K = 2880
    (INT4: 2944, the next multiple of 128), 4 routed rows on 6 experts (few: the formula decodes every
    expert's weight in float64)."""
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", config)
    rows = [0, 1, 0, 2, 1, 0]
    N = 2 * 2880 if activation != "none" else 2880
    K = 2880 if fmt == "mxfp4" else 2944
    got, want, formula = run_gemv(fmt, rows, N, K, a_fp8, activation, activation == "swigluoai")
    assert_matches(got, want.double())
    assert_matches(got, formula)


@pytest.mark.cuda
@pytest.mark.parametrize("config, fmt, a_fp8", GEMV_CASES)
def test_cuda_gemv_empty_inputs(config, fmt, a_fp8, monkeypatch):
    """T = 0 (M = 0: an empty output, no launch) and M > 0 with every expert empty (nothing written,
    nothing read past the offsets)."""
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", config)
    op = gemm_op(fmt)
    K = 128
    a, a_s, w, s, off = to_cuda(*gemm_problem(fmt, [0, 0, 0], 64, K, a_fp8, extra_rows=0))
    out = op(a, w, s, off, a_s, None, "silu", False)
    assert out.shape == (0, 32) and out.dtype == torch.bfloat16
    a, a_s, w, s, off = to_cuda(*gemm_problem(fmt, [0, 0, 0], 64, K, a_fp8, extra_rows=5))
    out = op(a, w, s, off, a_s)
    torch.cuda.synchronize()
    assert out.shape == (5, 64)


@pytest.mark.cuda
@pytest.mark.parametrize("config, fmt, a_fp8", GEMV_CASES)
def test_cuda_gemv_bit_identical_across_calls(config, fmt, a_fp8, monkeypatch):
    """A fixed order of summation (lanes along K, then a fixed shuffle butterfly; no atomics)."""
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", config)
    a, a_s, w, s, off = to_cuda(*gemm_problem(fmt, [3, 0, 1, 6], 2 * 2880, 2944 if fmt == "int4" else 2880, a_fp8))
    b = torch.randn(4, 2 * 2880, device="cuda")
    first = gemm_op(fmt)(a, w, s, off, a_s, b, "swigluoai", True)
    second = gemm_op(fmt)(a, w, s, off, a_s, b, "swigluoai", True)
    assert torch.equal(first[:10].view(torch.int16), second[:10].view(torch.int16))


@pytest.mark.cuda
@pytest.mark.parametrize("config, fmt, a_fp8", GEMV_CASES)
def test_cuda_gemv_graph_replay_follows_new_offsets(config, fmt, a_fp8, monkeypatch):
    """Captured once, replayed after the routing (expert_offsets) and the activations change in place:
    the expert slots are found on the device, so the replay equals an eager call on the new data."""
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", config)
    op = gemm_op(fmt)
    a, a_s, w, s, off = to_cuda(*gemm_problem(fmt, [1, 0, 2, 1, 0, 0], 128, 256, a_fp8, extra_rows=0))
    b = torch.randn(6, 128, device="cuda")
    op(a, w, s, off, a_s, b, "gelu", False)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(a, w, s, off, a_s, b, "gelu", False)
    off.copy_(torch.tensor([0, 0, 0, 1, 1, 1, 4], device="cuda"))  # same M = 4, other experts
    a2, _, _, _, _ = gemm_problem(fmt, [4], 128, 256, a_fp8, extra_rows=0)
    a.copy_(a2.cuda())
    graph.replay()
    torch.testing.assert_close(out, op(a, w, s, off, a_s, b, "gelu", False), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_gemv_is_chosen_at_decode_and_matches_bm16(monkeypatch):
    """Unforced at decode (M / E <= 1) the table's choice (the GEMV) and the forced bm16 agree to the
    tolerance (each against the same reference)."""
    monkeypatch.delenv("MOE_KERNELS_W4_GEMM_CONFIG", raising=False)
    a, a_s, w, s, off = gemm_problem("mxfp4", [1, 0, 2, 1], 2 * 256, 512, True)
    want = gemm_op("mxfp4")(a, w, s, off, a_s, None, "swigluoai", True)[:4]
    args = to_cuda(a, w, s, off, a_s)
    got = moe_kernels.grouped_gemm_mxfp4(*args, None, "swigluoai", True)[:4]
    monkeypatch.setenv("MOE_KERNELS_W4_GEMM_CONFIG", "mxfp4_bm16")
    got16 = moe_kernels.grouped_gemm_mxfp4(*args, None, "swigluoai", True)[:4]
    assert_matches(got, want.double())
    assert_matches(got16, want.double())


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["mxfp4", "int4"])
def test_cuda_layer_through_gemv_equals_cpu_reference(fmt, monkeypatch):
    """The whole layer at decode (T = 3, top-4 of 32: the table picks the GEMV for both GEMMs) on the
    GPU against the layer's CPU reference (bounds of test_mxfp4_w4a8's layer tests)."""
    from test_mxfp4_w4a8 import layer_weights, routing

    monkeypatch.delenv("MOE_KERNELS_W4_GEMM_CONFIG", raising=False)
    E, K, H, I, T = 32, 4, 256, 256, 3
    w1, w2, s1, s2, b1, b2 = layer_weights(fmt, E, H, I, bias=True)
    x = torch.randn(T, H).to(torch.bfloat16)
    tw, ids = routing(T, K, E)
    kw = dict(activation="swigluoai", gate_up_interleaved=True, w1_bias=b1, w2_bias=b2)
    if fmt == "mxfp4":
        layer = moe_kernels.cutlass_moe_mxfp4
        kw["a_dtype"] = torch.float8_e4m3fn
    else:
        layer = moe_kernels.cutlass_moe_w4a8
    want = layer(x, w1, w2, tw, ids, s1, s2, **kw)
    poison_cuda_allocator(0xFF)
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    got = layer(*to_cuda(x, w1, w2, tw, ids, s1, s2), **kw_cuda)
    assert_matches(got, want.double())
