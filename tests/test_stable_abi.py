"""What makes one _C.so serve every torch >= 2.11 and every recent NVIDIA GPU (issue 16), checked on
the built binary (no GPU needed):

- it exports no C++ symbol of torch's unstable ABI (at::, c10::, torch::): its glue is written
  against PyTorch's stable ABI, and the public C++ API is header-only;
- it does not link libtorch_python;
- it holds device code for every architecture the build was asked for (the list is recorded in the
  binary, `MOE_KERNELS_CUDA_ARCHS=...`): each portable kernel for each of them (PTX too for a
  "+PTX" entry), the CUTLASS FP8 GEMMs for sm_90a.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

import moe_kernels

SO = Path(moe_kernels.__file__).resolve().parent / "_C.so"


def _tool(name: str) -> str | None:
    return shutil.which(name)


def _cuobjdump() -> str | None:
    """cuobjdump of the CUDA toolkit (the build's), else from PATH, else the triton package's (it ships
    one; an older one may print sm_90 for sm_90a cubins, see below)."""
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True)
    # cuobjdump --list-ptx exits 255 when a binary holds no PTX: its output is still the answer.
    return result.stdout + result.stderr


@pytest.mark.skipif(_tool("nm") is None, reason="nm (binutils) is not installed")
def test_c_so_exports_no_torch_cpp_symbol():
    out = _run(["nm", "-D", "--defined-only", "-C", str(SO)])
    leaked = [line for line in out.splitlines() if re.search(r"\b(at|c10|torch)::", line)]
    assert not leaked, f"{SO} exports torch C++ symbols (unstable ABI): {leaked[:5]}"


@pytest.mark.skipif(_tool("readelf") is None, reason="readelf (binutils) is not installed")
def test_c_so_does_not_link_libtorch_python():
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run(["readelf", "-d", str(SO)]))
    assert needed, "readelf found no NEEDED entry"
    assert not [n for n in needed if "torch_python" in n], needed


def _built_archs() -> list[str]:
    match = re.search(rb"MOE_KERNELS_CUDA_ARCHS=([0-9a-zA-Z.,+]+)", SO.read_bytes())
    assert match, f"{SO} does not record its architectures (MOE_KERNELS_CUDA_ARCHS=...)"
    return match.group(1).decode().split(",")


def _sm(arch: str) -> str:
    """"12.0+PTX" -> "120", "9.0a" -> "90a"."""
    major, minor = arch.split("+")[0].split(".")
    return major + minor


def test_default_architectures_are_recorded():
    archs = _built_archs()
    assert "9.0a" in archs  # the GEMMs need it: always built
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and os.environ.get("MOE_KERNELS_TEST_INSTALLED"):
        # A wheel built with the defaults (CI): the whole list of the issue.
        assert archs == ["9.0a", "8.0", "8.6", "8.9", "10.0a", "12.0+PTX"], archs


def test_every_listed_architecture_is_in_c_so():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (pip install triton ships one; or put the CUDA toolkit's on PATH)")
    archs = _built_archs()
    cubins = defaultdict(set)  # source file -> {"90a", "80", ...}
    for stem, sm in re.findall(r"ELF file\s+\d+:\s+(\S+?)\.sm_(\w+)\.cubin", _run([tool, "--list-elf", str(SO)])):
        cubins[stem].add(sm)
    ptx = defaultdict(set)
    for stem, sm in re.findall(r"PTX file\s+\d+:\s+(\S+?)\.sm_(\w+)\.ptx", _run([tool, "--list-ptx", str(SO)])):
        ptx[stem].add(sm)
    if not any(sm[-1].isalpha() for sms in cubins.values() for sm in sms):
        # This cuobjdump does not print arch-specific suffixes (triton 3.6's prints sm_90 for sm_90a).
        archs = [re.sub(r"(\d)[af]", r"\1", a) for a in archs]
    # The CUTLASS FP8 GEMMs are sm_90a only; everything else (the 4-bit WMMA GEMMs included) is portable.
    gemms = {s for s in cubins if s.startswith("grouped_gemm_fp8")}
    portable = set(cubins) - gemms
    assert gemms, f"no GEMM cubin in {SO}: {sorted(cubins)}"
    assert {"fused_gate", "permute_rows", "sort_tokens", "unpermute", "scaled_fp8_quant", "pre_reorder"} <= portable
    for stem in sorted(gemms):
        assert {"90a", "90"} & cubins[stem], f"{stem}: no sm_90a code ({sorted(cubins[stem])})"
    want_sass = {_sm(a) for a in archs}
    want_ptx = {_sm(a) for a in archs if a.endswith("+PTX")}
    for stem in sorted(portable):
        missing = want_sass - cubins[stem]
        assert not missing, f"{stem}: no code for sm_{sorted(missing)} (has {sorted(cubins[stem])}, built for {archs})"
        missing_ptx = want_ptx - ptx[stem]
        assert not missing_ptx, f"{stem}: no PTX for compute_{sorted(missing_ptx)} (has {sorted(ptx[stem])})"
