"""python -m moe_kernels.bench: the command without a GPU, the table, the JSON, the plot; on a GPU,
one small op through the harness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_kernels
from moe_kernels.bench import __main__ as cli
from moe_kernels.bench import models, plot, report
from moe_kernels.bench.harness import Context, Times
from moe_kernels.bench.progress import Progress

MIXTRAL, DEEPSEEK = models.select("mixtral")[0], models.select("deepseek-v3")[0]


def run_cli(args, cwd, env_extra):
    env = dict(os.environ, **env_extra)
    # The package this test imported, whether installed or from the source tree.
    package_root = str(Path(moe_kernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "moe_kernels.bench", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_without_gpu_says_so_and_passes_the_cpu_check(tmp_path):
    out = run_cli(["--quick"], tmp_path, {"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no CUDA GPU" in out.stdout
    assert "CPU check" in out.stdout and "PASS" in out.stdout
    assert "Traceback" not in out.stderr


def test_cpu_check_formula_matches_the_modular_layer():
    from moe_kernels.bench import cpu_check
    assert cpu_check.run()


def timed(ours, **peers):
    t = Times()
    t.update({"ours": ours, **peers})
    return t


def context_with_ceilings():
    ctx = Context(models=[MIXTRAL])
    ctx.ceilings.update({"copy": 3.0e12, "fp8": 1.5e15})  # as if measured in this run
    return ctx


def test_row_gives_rate_fraction_and_ratio_to_each_peer():
    ctx = context_with_ceilings()
    r = ctx.row("permute", MIXTRAL, 16, timed(10e-6, torch=25e-6, other=5e-6), work=15e6, ceiling="copy")
    assert r["us"] == pytest.approx(10.0)
    assert r["rate"] == pytest.approx(15e6 / 10e-6 / 1e9) and r["unit"] == "GB/s"
    assert r["frac"] == pytest.approx(15e6 / 10e-6 / 3.0e12)
    assert r["speedup"] == pytest.approx({"torch": 2.5, "other": 0.5})
    assert r["peers_us"] == pytest.approx({"torch": 25.0, "other": 5.0})
    assert r["ceiling_suspect"] is False


def test_row_flags_a_fraction_above_one_and_keeps_peer_errors():
    ctx = context_with_ceilings()
    r = ctx.row("unpermute", DEEPSEEK, 4096, timed(1e-3, hf_grouped_mm="n/a (ImportError: transformers)"),
                work=3.3e9, ceiling="copy")
    assert r["frac"] == pytest.approx(1.1) and r["ceiling_suspect"] is True
    assert r["speedup"] == {"hf_grouped_mm": None}
    assert "ImportError" in r["peer_errors"]["hf_grouped_mm"]
    assert report.suspects([r]) == [r]


def test_row_with_chosen_peers_leaves_other_contenders_out():
    ctx = context_with_ceilings()
    t = timed(None, tensor=2e-6, rowwise=4e-6, torch_scaled_grouped_mm=6e-6)
    r = ctx.row("gemm1_rowwise", MIXTRAL, 16, t, work=1e9, ceiling="fp8", ours="rowwise",
                peers=["torch_scaled_grouped_mm"])
    assert r["speedup"] == pytest.approx({"torch_scaled_grouped_mm": 1.5})
    assert r["unit"] == "TFLOP/s" and r["rate"] == pytest.approx(1e9 / 4e-6 / 1e12)


def test_table_has_one_line_per_row_with_every_peer_and_the_suspect_flag():
    ctx = context_with_ceilings()
    rows = [ctx.row("permute", MIXTRAL, 16, timed(10e-6, torch=31e-6), work=10e-6 * 2.4e12, ceiling="copy"),
            ctx.row("unpermute", MIXTRAL, 16, timed(10e-6, torch=31e-6), work=10e-6 * 3.3e12, ceiling="copy"),
            ctx.row("fused_gate", DEEPSEEK, 4096, timed(8e-6, torch=80e-6, hf="n/a (x)"))]
    lines = report.format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split()[:4] == ["op", "model", "T", "us"]
    assert "permute" in lines[1] and "0.80 copy" in lines[1] and "torch 3.1x" in lines[1]
    assert "CEILING SUSPECT" in lines[2] and "CEILING SUSPECT" not in lines[1]
    assert "deepseek-v3" in lines[3] and "torch 10x" in lines[3] and "hf n/a" in lines[3]


def test_json_holds_environment_ceilings_and_every_row(tmp_path):
    ctx = context_with_ceilings()
    rows = [ctx.row("permute", MIXTRAL, T, timed(T * 1e-6, torch=T * 3e-6), work=T * 1e6, ceiling="copy")
            for T in (16, 1024)]
    env = report.environment()
    path = report.result_path(tmp_path, env, ["permute"], quick=True)
    assert path.name.startswith("bench_permute_quick_") and path.name.endswith(env["date"][:10] + ".json")
    report.save(path, env, {"copy": {"value": 3.0e12}}, rows, {"quick": True})
    data = json.loads(path.read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
    assert data["ceilings"]["copy"]["value"] == 3.0e12
    assert {"torch", "date", "git_commit", "python"} <= set(data["env"])
    assert data["env"]["torch"] == torch.__version__


def test_default_out_dir_is_bench_results_in_the_repository_else_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report.default_out_dir() == Path(".")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    assert report.default_out_dir() == Path("bench") / "results"


def test_models_are_chosen_by_prefix():
    assert [m.name for m in models.select("qwen3")] == ["qwen3-235b", "qwen3-30b-a3b"]
    assert [m.name for m in models.select("deepseek-v3,mixtral")] == ["deepseek-v3", "mixtral-8x7b"]
    assert models.select(None) == models.MODELS
    with pytest.raises(ValueError, match="unknown model"):
        models.select("llama")


def test_arguments_are_checked_before_the_run():
    args = cli.parse_args(["--ops", "permute,layer", "--models", "mixtral", "--T", "16,4096", "--quick"])
    assert args.ops == ["permute", "layer"] and args.tokens == [16, 4096] and args.quick
    assert [m.name for m in args.model_list] == ["mixtral-8x7b"]
    for bad in (["--ops", "permute,nope"], ["--models", "llama"], ["--T", "16,x"]):
        with pytest.raises(SystemExit):
            cli.parse_args(bad)


def test_output_and_gemm_config_flags_parse():
    """The README's remaining flags: --out DIR (where the JSON goes), --json, --gemm-configs, --plot."""
    args = cli.parse_args(["--out", "runs", "--json", "r.json", "--gemm-configs", "pingpong_64x128x128_c1x1,all"])
    assert args.out == "runs" and args.json == "r.json"
    assert args.gemm_configs == "pingpong_64x128x128_c1x1,all"
    env = {"date": "2026-12-04T16:00:00+00:00", "device": "NVIDIA H200"}
    assert report.result_path(args.out, env, ["gemm"], True) == Path("runs/bench_gemm_quick_NVIDIA_H200_2026-12-04.json")
    if plot.available():
        assert cli.parse_args(["--plot", "speedup.png"]).plot == "speedup.png"
    else:
        with pytest.raises(SystemExit):
            cli.parse_args(["--plot", "speedup.png"])


def test_every_registered_op_declares_its_tokens_and_run():
    from moe_kernels.bench import OPS, load
    for name in OPS:
        mod = load(name)
        assert callable(mod.run) and mod.TOKENS and mod.QUICK_TOKENS, name


def test_plain_progress_bar_counts_every_step(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the bar without tqdm
    p = Progress(3, stream=sys.stdout)
    for label in ("permute mixtral-8x7b T=16", "permute mixtral-8x7b T=1024", "gemm deepseek-v3 T=16"):
        p(label)
    p.close()
    out = capsys.readouterr().out
    assert "0/3" in out and "2/3" in out and "3/3" in out and "gemm deepseek-v3 T=16" in out


def test_plot_draws_one_panel_per_op(tmp_path):
    pytest.importorskip("matplotlib")
    ctx = context_with_ceilings()
    rows = [ctx.row(op, m, T, timed(T * 1e-6, torch=T * 2e-6, hf="n/a"), work=T * 1e6, ceiling="copy")
            for op in ("permute", "unpermute", "layer") for m in (MIXTRAL, DEEPSEEK) for T in (16, 1024, 4096)]
    path = plot.plot(rows, tmp_path / "speedup.png")
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.cuda
def test_harness_times_permute_against_torch_and_the_sm_copy_ceiling():
    from moe_kernels.bench import permute
    ctx = Context(models=[MIXTRAL], tokens=[256], quick=True)
    rows = permute.run(ctx)
    assert [r["op"] for r in rows] == ["permute", "unpermute"]
    for r in rows:
        assert r["us"] > 0 and r["peers_us"]["torch"] > 0 and r["speedup"]["torch"] > 0
        assert 0 < r["frac"] < 2 and r["unit"] == "GB/s"
    copy = ctx.ceiling_details["copy"]
    assert ctx.ceilings["copy"] == max(copy["forms_Bps"].values()) > 1e11
    for names in copy["kernels"].values():  # None where the profiler could not say
        assert names is None or not any("memcpy" in n.lower() for n in names)


def test_kernel_names_are_shortened_for_the_layer_breakdown():
    from moe_kernels.bench.harness import _short_kernel_name
    assert _short_kernel_name("void moe_kernels::permute_rows_kernel<16>(moe_kernels::PermuteRowsParams)") \
        == "permute_rows_kernel"
    assert _short_kernel_name("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalI") == "cutlass_gemm"
    assert _short_kernel_name("Memset (Device)") == "Memset (Device)"


@pytest.mark.cuda
def test_short_steps_are_timed_over_a_replay_long_enough_to_hide_the_graph_launch():
    from moe_kernels.bench.harness import MAX_REPEATS, MIN_REPLAY_S, _captured_runner, _timed_ms, kernel_times_us
    x = torch.randn(64, 128, device="cuda")
    run, calls = _captured_runner(lambda: x.add(1), [()])
    assert calls > 1  # one 32 KB add is far below a millisecond
    run()
    # At least the minimum, unless the repeats ran out first (a few-microsecond kernel).
    assert calls == MAX_REPEATS or min(_timed_ms(run, 3)) / 1e3 >= 0.5 * MIN_REPLAY_S
    kernels = kernel_times_us(lambda: x.add(1))
    assert kernels is None or (len(kernels) == 1 and kernels[0][1] > 0)


def test_bench_env_switches_restore_the_users_values(monkeypatch):
    from moe_kernels.bench.harness import forced_gemm_config, fused_gemm1

    monkeypatch.setenv("MOE_KERNELS_GEMM_CONFIG", "coop_128x256x128_c1x2")  # a user's choice for the run
    monkeypatch.delenv("MOE_KERNELS_FUSED_GEMM1", raising=False)
    with forced_gemm_config(None):
        assert os.environ["MOE_KERNELS_GEMM_CONFIG"] == "coop_128x256x128_c1x2"
    with forced_gemm_config("gated_coop_128x256x128_c1x2"), fused_gemm1(False):
        assert os.environ["MOE_KERNELS_GEMM_CONFIG"] == "gated_coop_128x256x128_c1x2"
        assert os.environ["MOE_KERNELS_FUSED_GEMM1"] == "0"
        with fused_gemm1(True):
            assert "MOE_KERNELS_FUSED_GEMM1" not in os.environ
        assert os.environ["MOE_KERNELS_FUSED_GEMM1"] == "0"
    assert os.environ["MOE_KERNELS_GEMM_CONFIG"] == "coop_128x256x128_c1x2"
    assert "MOE_KERNELS_FUSED_GEMM1" not in os.environ
