"""cutlass_moe_fp8 in block mode (DeepSeek-V3 / Qwen3-FP8 checkpoints: weight scales per 128x128
block, activations quantized per token per 128 columns), and with pre-quantized input: against a
plain PyTorch fp32 emulation; expert_map; T = 0 and 1; empty experts and one expert with all rows;
CUDA graphs; bad scale shapes and sizes."""

import pytest
import torch
import torch.nn.functional as F

import moe_kernels

from fp8_helpers import rel_error
from helpers import DEVICES, random_expert_map, random_topk_ids

FP8 = torch.float8_e4m3fn
BLOCK = 128
E4M3_MAX = 448.0


# ---------------------------------------------------------------- plain torch emulation (the spec)

def quantize_blockwise(w):
    """w [E, N, K] float -> (e4m3, scale [E, N/128, K/128] f32), one scale per 128x128 block,
    multiplied to dequantize (a checkpoint's weight_scale_inv)."""
    E, N, K = w.shape
    blocks = w.reshape(E, N // BLOCK, BLOCK, K // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(2, 4)).clamp(min=1e-12) / E4M3_MAX
    q = (blocks / scale[:, :, None, :, None]).reshape(E, N, K).to(FP8)
    return q, scale.float()


def dequantize_blockwise(q, scale):
    return q.float() * scale.repeat_interleave(BLOCK, dim=1).repeat_interleave(BLOCK, dim=2)


def group_scales(v):
    """max(amax, 1e-10) / 448 per token per 128 columns, in fp32 (per_token_group_quant_fp8's)."""
    R, C = v.shape
    return v.abs().reshape(R, C // BLOCK, BLOCK).amax(dim=2).clamp(min=1e-10) / E4M3_MAX


def group_quantize(v):
    """v [R, C] fp32 -> (e4m3, scales [R, C/128]) as the layer quantizes activations."""
    s = group_scales(v)
    q = (v / s.repeat_interleave(BLOCK, dim=1)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    return q, s


def group_fake_quant(v):
    q, s = group_quantize(v)
    return q.float() * s.repeat_interleave(BLOCK, dim=1)


def emulate_block_layer(x, w1_q, w2_q, w, ids, w1_s, w2_s, local=None, x_scales=None):
    """The block-mode layer in plain fp32 torch: weights dequantized block by block, activations
    group-quantized before GEMM1 (or x already e4m3 with x_scales) and before GEMM2, GEMM1's output
    rounded to bf16; sum_k w[t,k] * W2[e] q(silu(gate) * up). With `local` (a set of global
    experts) only those contribute."""
    w1 = dequantize_blockwise(w1_q.cpu(), w1_s.cpu())
    w2 = dequantize_blockwise(w2_q.cpu(), w2_s.cpu())
    x, w, ids = x.cpu(), w.cpu().float(), ids.cpu().long()
    if x_scales is None:
        xq = group_fake_quant(x.float())
    else:
        xq = x.float() * x_scales.cpu().repeat_interleave(BLOCK, dim=1)
    I = w2.shape[2]
    out = torch.zeros(x.shape[0], w2.shape[1])
    for e in ids.unique().tolist():
        if local is not None and e not in local:
            continue
        t, k = (ids == e).nonzero(as_tuple=True)
        h = (xq[t] @ w1[e].t()).to(torch.bfloat16).float()
        y = F.silu(h[:, :I]) * h[:, I:]
        out.index_add_(0, t, (group_fake_quant(y) @ w2[e].t()) * w[t, k].unsqueeze(1))
    return out


def make_block_layer(T, E, K, H, I, device="cpu", ids=None):
    x = torch.randn(T, H).to(torch.bfloat16)
    w1_q, w1_s = quantize_blockwise(torch.randn(E, 2 * I, H) / H**0.5)
    w2_q, w2_s = quantize_blockwise(torch.randn(E, H, I) / I**0.5)
    w = torch.softmax(torch.randn(T, K), dim=-1)
    ids = random_topk_ids(T, K, E) if ids is None else ids
    return [t.to(device) for t in (x, w1_q, w2_q, w, ids, w1_s, w2_s)]


def layer(x, w1, w2, w, ids, w1_s, w2_s, **kwargs):
    return moe_kernels.cutlass_moe_fp8(x, w1, w2, w, ids, w1_s, w2_s, **kwargs)


# fp32 sums in another order, bf16 GEMM outputs and the odd e4m3 rounding that flips against the
# emulation (which quantizes at the same two points): well under 2e-2.
TOL = 2e-2


# ---------------------------------------------------------------- CPU (and GPU) against the emulation

# (T, E, K, H, I): the intermediate sizes of DeepSeek-V3 (2048), Qwen3-235B (1536), Qwen3-30B-A3B
# (768), kept small elsewhere (the CPU reference GEMM is slow).
LAYER_SHAPES = [(5, 4, 2, 256, 768), (3, 4, 2, 256, 1536), (2, 2, 2, 256, 2048), (16, 8, 4, 384, 128)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T,E,K,H,I", LAYER_SHAPES)
def test_block_layer_matches_emulation(device, T, E, K, H, I):
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(T, E, K, H, I, device)
    out = layer(x, w1, w2, w, ids, w1_s, w2_s)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    assert rel_error(out.cpu(), emulate_block_layer(x, w1, w2, w, ids, w1_s, w2_s)) < TOL


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [0, 1])
def test_block_layer_tiny_batches(device, T):
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(T, 4, 2, 256, 128, device)
    out = layer(x, w1, w2, w, ids, w1_s, w2_s)
    assert out.shape == (T, 256) and out.dtype == torch.bfloat16
    if T:
        assert rel_error(out.cpu(), emulate_block_layer(x, w1, w2, w, ids, w1_s, w2_s)) < TOL


@pytest.mark.parametrize("device", DEVICES)
def test_block_layer_empty_experts_and_one_expert_with_all_rows(device):
    T, E, K, H, I = 12, 6, 1, 256, 256
    ids = torch.full((T, K), 4, dtype=torch.int32)  # every row on expert 4, the others get none
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(T, E, K, H, I, device, ids=ids)
    out = layer(x, w1, w2, w, ids, w1_s, w2_s)
    assert rel_error(out.cpu(), emulate_block_layer(x, w1, w2, w, ids, w1_s, w2_s)) < TOL


@pytest.mark.parametrize("device", DEVICES)
def test_block_layer_expert_map(device):
    T, E, K, H, I = 20, 8, 3, 256, 256
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(T, E, K, H, I, device)
    emap = random_expert_map(E, 3)
    local = sorted((emap >= 0).nonzero().flatten().tolist(), key=lambda e: int(emap[e]))
    # No a2_scale nor per_act_token needed: per-group scales belong to their row.
    out = layer(x, w1[local], w2[local], w, ids, w1_s[local], w2_s[local], expert_map=emap.to(device),
                num_local_experts=3)
    ref = emulate_block_layer(x, w1, w2, w, ids, w1_s, w2_s, local=set(local))
    assert rel_error(out.cpu(), ref) < TOL


@pytest.mark.parametrize("device", DEVICES)
def test_block_layer_prequantized_input_equals_bf16_input(device):
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(9, 4, 2, 256, 128, device)
    q, s = moe_kernels.per_token_group_quant_fp8(x, 128)
    got = layer(q, w1, w2, w, ids, w1_s, w2_s, a1_scale=s)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, layer(x, w1, w2, w, ids, w1_s, w2_s), rtol=0, atol=0)
    assert rel_error(got.cpu(), emulate_block_layer(q, w1, w2, w, ids, w1_s, w2_s, x_scales=s)) < TOL


@pytest.mark.parametrize("device", DEVICES)
def test_block_layer_fp16_input(device):
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(7, 4, 2, 256, 128, device)
    out = layer(x.half(), w1, w2, w, ids, w1_s, w2_s)
    assert out.dtype == torch.float16
    assert rel_error(out.cpu(), emulate_block_layer(x.half(), w1, w2, w, ids, w1_s, w2_s)) < TOL


def test_block_layer_fake_kernel_traces():
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(4, 2, 1, 256, 128)
    q, s = moe_kernels.per_token_group_quant_fp8(x, 128)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    for inp, scale in ((x, None), (q, s)):
        got = compiled(inp, w1, w2, w, ids, w1_s, w2_s, a1_scale=scale)
        torch.testing.assert_close(got, layer(inp, w1, w2, w, ids, w1_s, w2_s, a1_scale=scale), rtol=0, atol=0)
        assert got.dtype == torch.bfloat16


# ---------------------------------------------------------------- bad arguments

def _bad_cases():
    E, H, I = 2, 256, 128
    s1, s2 = torch.ones(E, 2 * I // BLOCK, H // BLOCK), torch.ones(E, H // BLOCK, I // BLOCK)
    return [
        (dict(w1_scale=torch.ones(E, 3, 2)), r"in block mode w1_scale must be \[E, 2I/128, H/128\] = \[2, 2, 2\], "
                                             r"got shape \[2, 3, 2\]"),
        (dict(w2_scale=torch.ones(E, 2, 2)), r"in block mode w2_scale must be \[E, H/128, I/128\] = \[2, 2, 1\], "
                                             r"got shape \[2, 2, 2\]"),
        (dict(w2_scale=torch.ones(E)), r"in block mode w2_scale must be \[E, H/128, I/128\]"),
        (dict(w1_scale=s1.double()), "w1_scale and w2_scale must be float32, got Double"),
        (dict(a1_scale=torch.ones(1)), "a1_scale must be None in block mode with BFloat16 hidden_states"),
        (dict(a2_scale=torch.ones(1)), "a2_scale must be None in block mode"),
        (dict(per_act_token=True), "per_act_token must be False in block mode"),
        (dict(per_out_ch=True), "per_out_ch must be False in block mode"),
        (dict(hidden_states="fp8"), r"a1_scale is required with float8_e4m3fn hidden_states"),
        (dict(hidden_states="fp8", a1_scale=torch.ones(4, 1)),
         r"in block mode a1_scale must be \[T, H/128\] = \[4, 2\] .* got shape \[4, 1\]"),
        (dict(hidden_states="fp8", a1_scale=torch.ones(4, 2).double()), "a1_scale must be float32, got Double"),
        (dict(hidden_states="fp8", a1_scale=torch.ones(2, 4).t()), "a1_scale must be contiguous"),
        (dict(hidden_states="fp8", a1_scale=torch.ones(4, 2), apply_router_weight_on_input=True,
              topk=1), "apply_router_weight_on_input needs bfloat16 or float16 hidden_states"),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(13))
def test_block_layer_rejects_bad_scales(device, case):
    override, message = _bad_cases()[case]
    topk = override.pop("topk", 2)
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(4, 2, topk, 256, 128)
    args = dict(hidden_states=x, w1_scale=w1_s, w2_scale=w2_s, a1_scale=None, a2_scale=None, per_act_token=False,
                per_out_ch=False, apply_router_weight_on_input=False)
    args.update(override)
    if isinstance(args["hidden_states"], str):
        args["hidden_states"] = x.to(FP8)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) and k != "a1_scale" else v for k, v in args.items()}
    if args["a1_scale"] is not None:  # keep a non-contiguous scale non-contiguous on the device
        s = args["a1_scale"]
        args["a1_scale"] = s.to(device) if s.is_contiguous() else s.t().contiguous().to(device).t()
    x = args.pop("hidden_states")
    with pytest.raises(RuntimeError, match=f"cutlass_moe_fp8: {message}"):
        moe_kernels.cutlass_moe_fp8(x, w1.to(device), w2.to(device), w.to(device), ids.to(device), **args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,I,message", [(192, 128, r"needs H \(hidden_states.size\(1\)\) to be a multiple of 128, "
                                                    r"got H=192"),
                                         (256, 96, r"needs I \(w2.size\(2\)\) to be a multiple of 128, got I=96")])
def test_block_layer_rejects_sizes_not_multiple_of_128(device, H, I, message):
    E, T, K = 2, 3, 1
    x = torch.randn(T, H, device=device).bfloat16()
    w1 = torch.randn(E, 2 * I, H, device=device).to(FP8)
    w2 = torch.randn(E, H, I, device=device).to(FP8)
    w1_s = torch.ones(E, -(-2 * I // BLOCK), -(-H // BLOCK), device=device)
    w2_s = torch.ones(E, -(-H // BLOCK), -(-I // BLOCK), device=device)
    ids = torch.zeros(T, K, dtype=torch.int32, device=device)
    with pytest.raises(RuntimeError, match=f"cutlass_moe_fp8: block mode \\(3-D weight scales\\) {message}"):
        moe_kernels.cutlass_moe_fp8(x, w1, w2, torch.ones(T, K, device=device), ids, w1_s, w2_s)


# ---------------------------------------------------------------- GPU: the real block-scaled GEMM

@pytest.mark.cuda
@pytest.mark.parametrize("T,E,K,H,I", [(1, 8, 8, 7168, 2048), (64, 16, 8, 2048, 768), (300, 16, 8, 1024, 1536),
                                       (1000, 32, 8, 2048, 768), (0, 8, 2, 256, 128)])
def test_cuda_block_layer_matches_emulation(T, E, K, H, I):
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(T, E, K, H, I, "cuda")
    out = layer(x, w1, w2, w, ids, w1_s, w2_s)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    if T:
        assert rel_error(out.cpu(), emulate_block_layer(x, w1, w2, w, ids, w1_s, w2_s)) < TOL


@pytest.mark.cuda
def test_cuda_block_layer_matches_cpu():
    # The same composition on the CPU references: the GPU differs only by fp32 summation order in
    # the GEMMs (and the e4m3 roundings that flips downstream).
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(33, 8, 4, 512, 256)
    want = layer(x, w1, w2, w, ids, w1_s, w2_s)
    got = layer(*[t.cuda() for t in (x, w1, w2, w, ids, w1_s, w2_s)])
    assert rel_error(got.cpu(), want) < 1e-2


@pytest.mark.cuda
def test_cuda_block_layer_expert_map_and_empty_experts():
    T, E, K, H, I = 300, 16, 4, 512, 256
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(T, E, K, H, I, "cuda")
    ids[:, 0] = 5  # expert 5 gets a row of every token; most others few or none
    emap = random_expert_map(E, 6)
    local = sorted((emap >= 0).nonzero().flatten().tolist(), key=lambda e: int(emap[e]))
    out = layer(x, w1[local], w2[local], w, ids, w1_s[local], w2_s[local], expert_map=emap.cuda(),
                num_local_experts=6)
    assert rel_error(out.cpu(), emulate_block_layer(x, w1, w2, w, ids, w1_s, w2_s, local=set(local))) < TOL


@pytest.mark.cuda
def test_cuda_block_layer_prequantized_input_equals_bf16_input():
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(100, 8, 4, 1024, 256, "cuda")
    q, s = moe_kernels.per_token_group_quant_fp8(x, 128)
    torch.testing.assert_close(layer(q, w1, w2, w, ids, w1_s, w2_s, a1_scale=s),
                               layer(x, w1, w2, w, ids, w1_s, w2_s), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_block_layer_graph_replay():
    T, E, K = 64, 8, 4
    x, w1, w2, w, ids, w1_s, w2_s = make_block_layer(T, E, K, 512, 256, "cuda")
    layer(x, w1, w2, w, ids, w1_s, w2_s)  # warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer(x, w1, w2, w, ids, w1_s, w2_s)
    for _ in range(2):  # new inputs, copied into the captured buffers
        x.copy_(torch.randn_like(x))
        ids.copy_(random_topk_ids(T, K, E, device="cuda"))
        graph.replay()
        torch.testing.assert_close(out, layer(x, w1, w2, w, ids, w1_s, w2_s), rtol=0, atol=0)
