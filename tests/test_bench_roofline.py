"""The roofline of the gemm*/layer* rows: bytes and FLOPs counted on small cases worked out by hand,
the touched experts counted from a routing, the row's roof_us / roof and the suspect flag, the
table and the plot; the host benchmark and the bench's feature detection on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_kernels
from moe_kernels.bench import features, models, plot, report, roofline
from moe_kernels.bench.harness import Context, Times

MIXTRAL = models.MODELS[0]
GPT_OSS_120B = next(m for m in models.MODELS if m.name == "gpt-oss-120b")


def test_touched_experts_counts_distinct_experts_of_the_routing():
    ids = torch.tensor([[0, 1], [1, 3], [3, 0]], dtype=torch.int32)
    assert roofline.touched_experts(ids, 4) == 3
    assert roofline.touched_experts(ids.long(), 8) == 3
    # Dropped choices (-1, or past E) move no weights.
    assert roofline.touched_experts(torch.tensor([[-1, 2], [9, 2]]), 4) == 1
    # With expert parallelism, experts mapped to -1 are computed elsewhere.
    emap = torch.tensor([0, -1, -1, 1], dtype=torch.int32)
    assert roofline.touched_experts(ids, 4, emap) == 2
    assert roofline.touched_experts(torch.zeros(0, 2, dtype=torch.int32), 4) == 0


def test_experts_with_rows_skips_empty_experts():
    assert roofline.experts_with_rows(torch.tensor([0, 2, 2, 5, 5])) == 2
    assert roofline.experts_with_rows(torch.tensor([0, 0, 0])) == 0


def test_weight_formats_count_elements_and_scales():
    N, K = 64, 256
    assert roofline.FP8_TENSOR.bytes(N, K) == N * K + 4
    assert roofline.FP8_CHANNEL.bytes(N, K) == N * K + 4 * N
    assert roofline.FP8_BLOCK.bytes(256, 128) == 256 * 128 + 4 * 2 * 1
    assert roofline.MXFP4.bytes(N, K) == N * K / 2 + N * (K // 32)  # one E8M0 byte per 32
    assert roofline.W4A8.bytes(N, K) == N * K / 2 + 4 * N * (K // 128)  # one fp32 per 128
    assert roofline.BF16.bytes(N, K) == 2 * N * K
    # gpt-oss's 2880 is no multiple of 128: a partial group still has its scale.
    assert roofline.FP8_BLOCK.scale_bytes(2880, 2880) == 4 * 23 * 23


def test_grouped_gemm_traffic_by_hand():
    t = roofline.grouped_gemm(M=4, N=8, K=16, touched=2, weight=roofline.FP8_CHANNEL, a_scale_bytes=16)
    # a: 4*16 e4m3 + 16 bytes of row scales; 2 experts' [8, 16] e4m3 weights + 8 fp32 scales each.
    assert t.read == 4 * 16 + 16 + 2 * (8 * 16 + 4 * 8) == 400
    assert t.written == 4 * 8 * 2  # bf16 out
    assert t.flops == 2 * 4 * 8 * 16
    w4a16 = roofline.grouped_gemm(M=4, N=8, K=64, touched=1, weight=roofline.MXFP4, a_bytes=2)
    assert w4a16.read == 4 * 64 * 2 + 8 * 64 / 2 + 8 * 2


def test_moe_layer_traffic_by_hand():
    t = roofline.moe_layer(T=2, K=2, H=64, I=32, touched=3, weight=roofline.FP8_TENSOR)
    per_expert = (2 * 32 * 64 + 4) + (64 * 32 + 4)  # w1 [2I, H] and w2 [H, I], one scale each
    assert t.read == 2 * 64 * 2 + 2 * 2 * (4 + 4) + 3 * per_expert == 18744
    assert t.written == 2 * 64 * 2
    assert t.flops == 6 * (2 * 2) * 64 * 32
    biased = roofline.moe_layer(T=2, K=2, H=64, I=32, touched=3, weight=roofline.FP8_TENSOR, biases=True)
    assert biased.read - t.read == 3 * 4 * (2 * 32 + 64)  # fp32 b1 [2I] and b2 [H] per touched expert


def test_roofline_time_is_bytes_at_their_ceilings_or_flops_at_the_peak():
    t = roofline.Traffic(read=3e9, written=1e9, flops=1e12)
    # bytes: 3e9 / 3e12 + 1e9 / 2e12 = 1.5 ms; FLOPs: 1e12 / 1e15 = 1 ms
    assert t.roof_s(read_Bps=3e12, copy_Bps=2e12, flops_per_s=1e15) == pytest.approx(1.5e-3)
    assert t.roof_s(read_Bps=3e12, copy_Bps=2e12, flops_per_s=1e14) == pytest.approx(1e-2)


def test_decode_layer_floor_is_the_touched_weights():
    """Mixtral at T=16: every expert touched (16 tokens, top-2 of 8) and the weights dominate."""
    ids = torch.stack([torch.randperm(8)[:2] for _ in range(16)]).int()
    touched = roofline.touched_experts(ids, 8)
    t = roofline.moe_layer(16, 2, MIXTRAL.H, MIXTRAL.I, touched, roofline.FP8_TENSOR)
    weights = touched * 3 * MIXTRAL.H * MIXTRAL.I
    assert weights <= t.read < weights * 1.001


def context():
    ctx = Context(models=[MIXTRAL])
    ctx.ceilings.update({"copy": 3.0e12, "read": 4.0e12, "fp8": 1.5e15, "bf16": 0.75e15})  # as if measured
    return ctx


def timed(ours, **peers):
    t = Times()
    t.update({"ours": ours, **peers})
    return t


def test_row_carries_roof_us_and_roof_in_the_json_and_table(tmp_path):
    ctx = context()
    traffic = roofline.Traffic(read=4e6, written=3e6, flops=1.5e9)  # 1 us + 1 us of bytes, 1 us of FLOPs
    r = ctx.row("layer", MIXTRAL, 16, timed(4e-6, torch_bf16=8e-6), 1.5e9, "fp8", traffic=traffic)
    assert r["roof_us"] == pytest.approx(2.0) and r["roof"] == pytest.approx(0.5)
    assert r["bytes_read"] == 4e6 and r["bytes_written"] == 3e6 and r["flops"] == 1.5e9
    assert r["ceiling_suspect"] is False
    bf16 = ctx.row("layer_mxfp4", MIXTRAL, 16, timed(4e-6), traffic=roofline.Traffic(0, 0, 1.5e9), compute="bf16")
    assert bf16["roof_us"] == pytest.approx(2.0) and bf16["roof_compute"] == "bf16"
    line = report.format_table([r]).splitlines()[1]
    assert "0.50 of 2us" in line and report.SUSPECT not in line
    path = report.save(tmp_path / "r.json", report.environment(), {}, [r], {})
    assert json.loads(path.read_text())["rows"][0]["roof"] == pytest.approx(0.5)


def test_row_above_its_roofline_is_a_ceiling_suspect():
    ctx = context()
    r = ctx.row("gemm1", MIXTRAL, 16, timed(1e-6), 1e6, "fp8", traffic=roofline.Traffic(8e6, 0, 0))
    assert r["roof"] == pytest.approx(2.0) and r["ceiling_suspect"] is True
    assert report.suspects([r]) == [r]
    assert "2.00 of its roofline" in report.suspect_text(r)
    assert report.SUSPECT in report.format_table([r])


def test_skipped_row_keeps_its_roofline_and_reason():
    ctx = context()
    t = Times()
    t["ours"] = "skipped: this build of moe_kernels has no cutlass_moe_mxfp4 (branch fp4)"
    r = ctx.row("layer_mxfp4", GPT_OSS_120B, 16, t, peers=[], traffic=roofline.Traffic(4e6, 0, 0))
    assert r["us"] is None and r["roof_us"] == pytest.approx(1.0) and "roof" not in r
    line = report.format_table([r]).splitlines()[1]
    assert "skipped" in line and "no cutlass_moe_mxfp4" in line


def test_plot_adds_a_roofline_panel_per_op(tmp_path):
    pytest.importorskip("matplotlib")
    ctx = context()
    rows = [ctx.row(op, m, T, timed(T * 1e-6, torch=T * 2e-6), T * 1e9, "fp8",
                    traffic=roofline.Traffic(T * 2e6, T * 1e6, T * 1e9))
            for op in ("layer", "gemm1") for m in (MIXTRAL, GPT_OSS_120B) for T in (16, 1024)]
    path = plot.plot(rows, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpt_oss_models_use_swigluoai_interleaved_biased_experts():
    names = [m.name for m in models.MODELS]
    assert "gpt-oss-20b" in names and "gpt-oss-120b" in names
    small = models.select("gpt-oss-20b")[0]
    assert (small.E, small.K, small.H, small.I) == (32, 4, 2880, 2880)
    assert (GPT_OSS_120B.E, GPT_OSS_120B.K) == (128, 4)
    assert GPT_OSS_120B.layer_kwargs() == {"activation": "swigluoai", "gate_up_interleaved": True}
    assert features.layer_needs(GPT_OSS_120B) == ("activation", "gate_up_interleaved", "w1_bias", "w2_bias")
    assert MIXTRAL.layer_kwargs() == {} and features.layer_needs(MIXTRAL) == ()


def test_torch_peer_activations_follow_the_formulas():
    from moe_kernels.bench.layer import gated
    h = torch.randn(5, 8) * 6
    gate, up = h[:, :4], h[:, 4:]
    torch.testing.assert_close(gated(h), torch.nn.functional.silu(gate) * up)
    ig, iu = h[:, 0::2], h[:, 1::2]
    g = ig.clamp(max=7.0)
    want = (iu.clamp(-7.0, 7.0) + 1) * g * torch.sigmoid(1.702 * g)
    torch.testing.assert_close(gated(h, "swigluoai", True), want)
    torch.testing.assert_close(gated(h, "gelu"), torch.nn.functional.gelu(gate, approximate="none") * up)
    with pytest.raises(ValueError, match="relu"):
        gated(h, "relu")


def test_features_name_what_is_missing():
    assert features.missing("moe_permute") is None
    assert "no cutlass_moe_nothing" in features.missing("cutlass_moe_nothing", where="branch x")
    why = features.missing("moe_permute", "no_such_keyword")
    assert why.startswith("skipped:") and "no_such_keyword" in why


def test_host_benchmark_times_every_op_on_the_cpu():
    from moe_kernels.bench import host
    rows = host.run_device("cpu", calls=5, rounds=1)
    by_op = {r["model"]: r for r in rows}
    for name in ("moe_permute", "moe_unpermute", "moe_fused_gate", "scaled_fp8_quant", "ep_pack_records",
                 "cutlass_grouped_gemm_fp8", "cutlass_moe_fp8", "cutlass_moe_fp8 block", "grouped_gemm_fp8_configs"):
        r = by_op[name]
        assert r["us"] > 0 and r["wrapper_us"] > 0 and r["calls"] == 5, r
        assert r["op"] == "host_cpu" and r["T"] == 1 and r["timed_through"] == "torch.ops"
    for name in ("cutlass_moe_mxfp4", "cutlass_moe_w4a8", "cutlass_moe_fp8 swigluoai+bias"):
        r = by_op[name]
        if r["us"] is None:  # a build before branches fp4 / act: the row says why
            assert r["error"].startswith("skipped") and "branch" in r["error"]
        else:
            assert r["us"] > 0 and r["timed_through"] == "wrapper"


def test_cli_runs_the_host_benchmark_without_a_gpu(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    package_root = str(Path(moe_kernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    out = subprocess.run([sys.executable, "-m", "moe_kernels.bench", "--ops", "host", "--quick",
                          "--json", str(tmp_path / "host.json")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on the CPU only" in out.stdout and "host_cpu" in out.stdout
    data = json.loads((tmp_path / "host.json").read_text())
    assert {r["model"] for r in data["rows"]} >= {"moe_permute", "cutlass_moe_fp8"}
    assert data["env"]["cpu_count"] >= 1


def test_bf16_torch_peer_of_gpt_oss_matches_the_loop_formula():
    """The layer bench's bf16 torch peer with swigluoai, interleaved gate/up and both biases (the
    work it is timed on) against a loop over tokens and choices in fp32."""
    from moe_kernels.bench.layer import gated, torch_bf16_layer
    g = torch.Generator().manual_seed(0)
    E, K, H, I, T = 4, 2, 32, 16, 5
    x = torch.randn(T, H, generator=g).bfloat16()
    w1 = (torch.randn(E, 2 * I, H, generator=g) * 0.1).bfloat16()
    w2 = (torch.randn(E, H, I, generator=g) * 0.1).bfloat16()
    ids = torch.rand(T, E, generator=g).argsort(1)[:, :K].int()
    w = torch.rand(T, K, generator=g)
    b1, b2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
    act = {"activation": "swigluoai", "gate_up_interleaved": True}
    try:
        got = torch_bf16_layer(x, w1, w2, w, ids, E, act, b1, b2).float()
    except (RuntimeError, NotImplementedError) as e:  # torch._grouped_mm without a CPU kernel
        pytest.skip(f"torch._grouped_mm on the CPU: {e}")
    want = torch.zeros(T, H)
    for t in range(T):
        for k in range(K):
            e = ids[t, k]
            h = x[t].float() @ w1[e].float().T + b1[e]
            want[t] += w[t, k] * (gated(h[None], **act)[0] @ w2[e].float().T + b2[e])
    # The peer rounds GEMM1's output, the activation and GEMM2's output to bf16 (2^-9 relative each):
    # a few bf16 ulps of the output's scale.
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item())
