"""The GPU-run scripts where a CPU can check them: gpu-check.sh parses, soak.py runs its loop on
the CPU (the references as the device, a bit-identical second call as the sample check) and
sanitize_ops.py compiles with a family for this wave's kernels."""

import json
import os
import py_compile
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moe_kernels

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def env_with_package():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    package_root = str(Path(moe_kernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@pytest.mark.parametrize("script", ["gpu-check.sh", "ep-check.sh"])
def test_shell_scripts_parse(script):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    out = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_gpu_check_names_every_stage_and_keeps_its_outputs_few():
    text = (SCRIPTS / "gpu-check.sh").read_text()
    for stage in ("install", "test", "downstream", "sanitize", "bench", "soak", "ep"):
        assert f"stage {stage}" in text, stage
    for op in ("host", "layer", "gemm_mxfp4", "layer_mxfp4", "layer_w4a8"):
        assert op in text.split("BENCH_ARGS=${BENCH_ARGS:-")[1].split("}")[0], op
    assert "tar -czf" in text and "--no-deps --no-index" in text


def test_sanitize_ops_compiles_and_covers_this_waves_kernels():
    py_compile.compile(str(SCRIPTS / "sanitize_ops.py"), doraise=True)
    text = (SCRIPTS / "sanitize_ops.py").read_text()
    for name in ("def run_activations", "def run_fourbit", "cutlass_moe_mxfp4", "cutlass_moe_w4a8", "swigluoai",
                 "w2_bias", "SKIPPED", "cutlass_grouped_gemm_fp8_act_quant"):
        assert name in text, name


def test_soak_runs_on_the_cpu_and_writes_its_summary(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPTS / "soak.py"), "--device", "cpu", "--calls", "12",
                          "--check-every", "4", "--max-tokens", "16", "--json", str(tmp_path / "soak.json")],
                         env=env_with_package(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1].startswith("SOAK PASS: 12 calls on cpu")
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["pass"] and summary["calls"] == 12 and summary["checks"] == 3 and not summary["errors"]
    assert {"fp8:tensor_static", "fp8:block", "fp8:expert_map", "fp8:prequant_token"} <= set(summary["formats"])


def test_sanitize_ops_dry_run_on_the_cpu_references():
    """Every family's calls on the CPU references (--device cpu): the script's arguments and shapes
    hold before a GPU run spends time on them; families this build lacks say SKIPPED."""
    out = subprocess.run([sys.executable, str(SCRIPTS / "sanitize_ops.py"), "--device", "cpu"],
                         env=env_with_package(), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "sanitize_ops: done; failed: none" in out.stdout
    for family in ("permute", "quant", "ep", "routing", "gemm", "gemm_epilogue", "activations", "fourbit"):
        assert f"sanitize_ops: {family}: ran" in out.stdout or f"SKIPPED {family}:" in out.stdout, family
