"""The activations' branch-free elementary functions and the per-group quantization's division,
checked on the host (tests/test_act_math.cpp): the CUDA kernels run them, and the per-group CPU
reference divides, so their equality there is what lets the CUDA bytes equal the reference's."""

import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler")
def test_act_math_and_group_division_on_host(tmp_path):
    root = Path(__file__).resolve().parent.parent
    exe = tmp_path / "act_math_check"
    subprocess.run(["g++", "-std=c++20", "-O2", "-ffp-contract=off", f"-I{root / 'csrc'}",
                    str(root / "tests" / "test_act_math.cpp"), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1] == "0 mismatches"
