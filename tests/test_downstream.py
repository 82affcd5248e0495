"""The C++ API as an extension uses it: tests/downstream/ is a separate CMake project that
find_package()s the *installed* moe_kernels, links moe_kernels::moe_kernels and registers ops of
its own (torch.ops.moe_kernels_downstream.*) calling include/moe_kernels/*.h. Built once per session
into a temporary directory; its results must equal the Python ops' bit for bit (same kernels)."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_kernels

SOURCE_DIR = Path(__file__).resolve().parent / "downstream"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _tool(name: str) -> str | None:
    """The executable of the cmake or ninja pip package (a new enough version), else the one on PATH."""
    try:
        module = importlib.import_module(name)
        path = Path(module.BIN_DIR if name == "ninja" else module.CMAKE_BIN_DIR) / name
        if path.exists():
            return str(path)
    except (ImportError, AttributeError):
        pass
    return shutil.which(name)


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{(result.stdout + result.stderr)[-4000:]}")


@pytest.fixture(scope="module")
def downstream(tmp_path_factory):
    config = Path(moe_kernels.cmake_prefix_path) / "moe_kernels" / "moe_kernelsConfig.cmake"
    if not config.exists():
        reason = (f"moe_kernels imported from {Path(moe_kernels.__file__).parent} has no installed CMake "
                  f"package ({config} missing): install the package to test its C++ API")
        if os.environ.get("MOE_KERNELS_TEST_INSTALLED"):  # CI tests the installed wheel: a bug there
            pytest.fail(reason)
        pytest.skip(reason)
    cmake, ninja = _tool("cmake"), _tool("ninja")
    if cmake is None or ninja is None:
        pytest.skip("cmake and ninja are needed to build the downstream extension")
    build_dir = tmp_path_factory.mktemp("downstream")
    _run([cmake, "-S", str(SOURCE_DIR), "-B", str(build_dir), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
          "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={moe_kernels.cmake_prefix_path}",
          f"-DPython_EXECUTABLE={sys.executable}"])
    _run([cmake, "--build", str(build_dir), "-j2"])
    torch.ops.load_library(str(build_dir / "libmoe_kernels_downstream.so"))
    return torch.ops.moe_kernels_downstream


def _routing_inputs(device, tokens=37, experts=16):
    scores = torch.randn(tokens, experts, device=device)
    bias = torch.randn(experts, device=device) * 0.1
    return scores, bias


@pytest.mark.parametrize("device", DEVICES)
def test_downstream_route_equals_moe_fused_gate(downstream, device):
    scores, bias = _routing_inputs(device)
    weights, ids = downstream.route(scores, bias, 4, 2, 6)
    want_weights, want_ids = moe_kernels.moe_fused_gate(scores, bias, num_expert_group=4, topk_group=2, topk=6)
    assert torch.equal(ids, want_ids)
    assert torch.equal(weights, want_weights)  # the same kernel: bit-identical


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_downstream_permute_and_combine_equal_python_ops(downstream, device, dtype):
    experts, topk = 16, 6
    scores, bias = _routing_inputs(device, experts=experts)
    hidden = torch.randn(scores.shape[0], 72, device=device).to(dtype)
    weights, ids = downstream.route(scores, bias, 4, 2, topk)

    got = downstream.permute(hidden, ids, experts)
    want = moe_kernels.moe_permute(hidden, ids, experts)
    for name, g, w in zip(("permuted", "expert_offsets", "inv_permuted_idx", "permuted_idx"), got, want):
        assert torch.equal(g, w), name
    # Every row of the token landed somewhere: the permutation is really one (not all on one expert).
    assert torch.equal(got[0][got[2].flatten().long()], hidden.repeat_interleave(topk, dim=0))

    combined = downstream.combine(got[0], weights, got[2])
    torch.testing.assert_close(combined, moe_kernels.moe_unpermute(want[0], weights, want[2]), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_downstream_mxfp4_gemm_equals_python_op(downstream, device):
    """include/moe_kernels/fourbit.h: its defaults and argument types match the op's schema."""
    E, N, K = 3, 64, 128
    a = torch.randn(9, K, device=device).to(torch.bfloat16)
    w = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, device=device)
    w_scale = torch.randint(120, 130, (E, N, K // 32), dtype=torch.uint8, device=device)
    offsets = torch.tensor([0, 4, 4, 9], device=device)
    bias = torch.randn(E, N, device=device)
    got = downstream.gemm_mxfp4_swigluoai(a, w, w_scale, offsets, bias)
    want = moe_kernels.grouped_gemm_mxfp4(a, w, w_scale, offsets, bias=bias, activation="swigluoai",
                                          gate_up_interleaved=True)
    assert got.shape == (9, N // 2) and torch.equal(got, want)
