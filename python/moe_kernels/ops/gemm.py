"""FP8 grouped GEMM (CUTLASS 3.x, sm90a) and the CUTLASS FP8 MoE layer."""

from typing import Optional

import torch
from torch import Tensor

_ops = torch.ops.moe_kernels


def cutlass_grouped_gemm_fp8(a: Tensor, b: Tensor, a_scales: Tensor, b_scales: Tensor, expert_offsets: Tensor,
                             out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Grouped GEMM over experts: ``out[r, c] = a_scale[r] * b_scale[e, c] * (a[r] @ b[e, c])`` for
    the rows r of expert e (a scale broadcasts where it is per tensor / per expert); or, block-scaled,
    ``out[r, c] = sum_kb a_scale[r, kb] * b_scale[e, c // 128, kb] * (a[r, kb] @ b[e, c, kb])`` over
    the 128-wide K blocks kb (the DeepSeek-V3 / Qwen3-FP8 checkpoint format).

    Args:
        a: [M, K] float8_e4m3fn, rows grouped by expert (as moe_permute leaves them); K % 16 == 0.
        b: [E, N, K] float8_e4m3fn, each expert's weight [N, K] row-major; N % 8 == 0.
        a_scales: [1] float32 per tensor, or [M] / [M, 1] per token (row); block-scaled:
            [M, K // 128] row-major, one per row per 128 columns (per_token_group_quant_fp8).
        b_scales: [E] float32 per expert, or [E, N] per output channel; or [E, N // 128, K // 128]
            per 128x128 weight block (the checkpoints' ``weight_scale_inv``), which selects the
            block-scaled mode (then K and N must be multiples of 128).
        expert_offsets: [E + 1] int64, rows of expert e are expert_offsets[e]:expert_offsets[e+1].
        out_dtype: bfloat16 (the default; the only one supported).
    Returns:
        [M, N] bfloat16; rows at and past expert_offsets[-1] are not written.

    Problem sizes, pointers and strides are built on the device from expert_offsets: no host sync,
    CUDA-graph capturable; experts with no rows cost nothing. Per-tensor/token/channel scales are
    applied in the CUTLASS epilogue, ``bf16(a_scale * (b_scale * acc))`` with an fp32 accumulator;
    block scales in the mainloop, each K block's partial sum scaled before it joins the fp32
    accumulator. The tile
    configuration is chosen by rows per expert (``M // E``); the environment variable
    ``MOE_KERNELS_GEMM_CONFIG`` forces one of :func:`grouped_gemm_fp8_configs` (for tuning).
    """
    return _ops.cutlass_grouped_gemm_fp8(a, b, a_scales, b_scales, expert_offsets, out_dtype)


def cutlass_grouped_gemm_fp8_act_quant(a: Tensor, b: Tensor, a_scales: Tensor, b_scales: Tensor,
                                       expert_offsets: Tensor, out_scale: Tensor, activation: str = "silu",
                                       swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                                       bias: Optional[Tensor] = None) -> Tensor:
    """GEMM1 of the FP8 expert layer with the gated activation and the fp8 quantization of its
    output in the CUTLASS epilogue: the [M, N] bf16 intermediate is never written. Equal, byte for
    byte, to ``silu_and_mul_quant_fp8(cutlass_grouped_gemm_fp8(a, b, a_scales, b_scales,
    expert_offsets), out_scale, activation=activation, gate_up_interleaved=True, bias=bias,
    expert_offsets=expert_offsets if bias is not None else None)[0]`` when that GEMM runs a
    128-row configuration (those have the same accumulation order; ``cutlass_moe_fp8`` uses this op
    only there, see below).

    Args:
        a: [M, K] float8_e4m3fn rows grouped by expert; K % 16 == 0.
        b: [E, N, K] float8_e4m3fn with gate and up rows interleaved (row 2j gate j, row 2j+1 up j:
            gpt-oss's layout; interleave a concatenated w13 once at load time); N even.
        a_scales: [1] float32 per tensor, or [M] / [M, 1] per row.
        b_scales: [E] float32 per expert, or [E, N] per output channel (block scales: an error).
        expert_offsets: [E + 1] int64.
        out_scale: [1] float32, the static scale of the output (a2_scale).
        activation: ``"silu"``, ``"gelu"`` or ``"swigluoai"`` (as silu_and_mul_quant_fp8).
        swiglu_alpha, swiglu_limit: the constants of ``"swigluoai"``.
        bias: optional [E, N] float32 in b's row order, added in fp32 to the bf16-rounded GEMM
            output before the activation.
    Returns:
        [M, N // 2] float8_e4m3fn; rows at and past expert_offsets[-1] are not written.

    Configurations: ``gated_pingpong_128x128x128_c1x2`` for K <= 3072 and
    ``gated_coop_128x256x128_c1x2`` above; ``MOE_KERNELS_GEMM_CONFIG=gated_<name>`` forces one.
    ``cutlass_moe_fp8`` takes this path by default for interleaved w1 (:func:`interleave_gate_up`),
    a static a2_scale and M // E > 32 (``MOE_KERNELS_FUSED_GEMM1=0``: off); otherwise it runs the
    GEMM and silu_and_mul_quant_fp8 apart. No host sync, CUDA-graph capturable. Byte equality with
    the unfused ops and race/memory checks verified on an H100 for both configurations (docs/ops.md).
    """
    return _ops.cutlass_grouped_gemm_fp8_act_quant(a, b, a_scales, b_scales, expert_offsets, out_scale, activation,
                                                   float(swiglu_alpha), float(swiglu_limit), bias)


def interleave_gate_up(t: Tensor) -> Tensor:
    """A gated layer's GEMM1 tensor with gate rows then up rows (vLLM's w13) rearranged so that gate
    and up rows alternate (gpt-oss's layout), the layout that lets ``cutlass_moe_fp8`` run GEMM1 with
    the activation in its epilogue (``gate_up_interleaved=True``). Apply it once at load to w13
    [E, 2I, H], to its per-channel scales [E, 2I] (or [E, 2I, 1]) and to its bias [E, 2I]; per-expert
    scales [E] stay as they are. Returns a new contiguous tensor: row 2j is gate row j, row 2j + 1
    up row j (dimension 1)."""
    if t.dim() < 2 or t.shape[1] % 2 != 0:
        raise ValueError(f"interleave_gate_up: t must be [E, 2I, ...] with an even dimension 1, got shape {tuple(t.shape)}")
    half = t.shape[1] // 2
    return torch.stack([t[:, :half], t[:, half:]], 2).reshape(t.shape).contiguous()


def grouped_gemm_fp8_configs() -> list:
    """Names of the compiled configurations of :func:`cutlass_grouped_gemm_fp8`, e.g.
    ``coop_128x128x128_c1x2`` (CUTLASS: schedule, tile M x N x K, cluster M x N), and the decode
    GEMV ``gemv_rowwise`` / ``block_gemv``. Names starting with ``block_`` serve block-scaled calls."""
    return list(_ops.grouped_gemm_fp8_configs())


def grouped_gemm_fp8_choice(rows: int, num_experts: int, k: int, block_scaled: bool = False) -> str:
    """The configuration :func:`cutlass_grouped_gemm_fp8` runs for ``a`` of ``rows`` x ``k`` and
    ``num_experts`` experts (block-scaled or not), ``MOE_KERNELS_GEMM_CONFIG`` included. Decided on
    the host from sizes alone (M and M // E), never from the routing."""
    return _ops.grouped_gemm_fp8_choice(rows, num_experts, k, block_scaled)


def cutlass_moe_fp8(hidden_states: Tensor, w1: Tensor, w2: Tensor, topk_weights: Tensor, topk_ids: Tensor,
                    w1_scale: Tensor, w2_scale: Tensor, a1_scale: Optional[Tensor] = None,
                    a2_scale: Optional[Tensor] = None, per_act_token: bool = False, per_out_ch: bool = False,
                    expert_map: Optional[Tensor] = None, num_local_experts: int = -1,
                    apply_router_weight_on_input: bool = False, activation: str = "silu",
                    gate_up_interleaved: bool = False, swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0,
                    w1_bias: Optional[Tensor] = None, w2_bias: Optional[Tensor] = None) -> Tensor:
    """The FP8 expert computation of an MoE layer (gated experts: SwiGLU, GeGLU, gpt-oss).

    quantize(hidden) -> moe_permute (rows with their scales) -> grouped GEMM with w1 ->
    (+ w1_bias) act(gate, up) + quantize -> grouped GEMM with w2 -> moe_unpermute with
    topk_weights (+ w2_bias before the weight). Per token t:
    ``out[t] = sum_k topk_weights[t,k] * (W2[e] @ q(act(W1[e] @ q(x[t]) + b1[e])) + b2[e])``, e = topk_ids[t,k].

    Activations (as silu_and_mul_quant_fp8, fp32): ``"silu"`` silu(g) * u (default); ``"gelu"``
    exact-erf gelu(g) * u; ``"swigluoai"`` (gpt-oss) ``g' = min(g, limit)``,
    ``u' = clamp(u, -limit, limit)``, ``(u' + 1) * g' * sigmoid(alpha * g')`` with
    ``swiglu_alpha`` (1.702) and ``swiglu_limit`` (7.0); any other name is an error naming it.
    ``gate_up_interleaved``: w1's rows alternate gate, up (gpt-oss's layout), else rows 0..I-1 are
    gate and I..2I-1 up. w1_scale (per channel or block) and w1_bias rows follow w1's order.

    Biases are added in fp32, not in the GEMM epilogues: w1_bias inside the activation kernel on
    GEMM1's bf16 output, w2_bias inside moe_unpermute on GEMM2's bf16 output, before the routing
    weight multiplies. The only difference from a bias in the epilogue is that the GEMM output is
    rounded to bf16 once before the bias is added.

    Modes, chosen by the weight scales' shapes and the input dtype:

    - Per-expert / per-channel weight scales (w1_scale, w2_scale 1-D or 2-D): activations with a
      static per-tensor scale (a1_scale, a2_scale [1]) or dynamic scales computed on the device,
      per tensor or, with per_act_token, per token.
    - Block mode (DeepSeek-V3/R1, Qwen3-FP8, Kimi-K2 checkpoints), selected by 3-D weight scales
      w1_scale [E_local, 2I/128, H/128] and w2_scale [E_local, H/128, I/128] float32: one scale per
      128x128 block of the weight, multiplied to dequantize (the checkpoints' ``weight_scale_inv``
      as stored, gate blocks first as w1's rows). Activations are quantized per token per 128
      columns at both points (per_token_group_quant_fp8 before GEMM1, silu_and_mul_quant_fp8 with
      group_size=128 before GEMM2). H and I must be multiples of 128 (whole weight blocks); a1_scale
      (with bf16/fp16 input), a2_scale, per_act_token and per_out_ch are errors in this mode.
    - Pre-quantized input: hidden_states float8_e4m3fn (e.g. quantized before an all-to-all), with
      a1_scale their scale: [1] per tensor or [T] / [T, 1] per token (per-expert/per-channel
      weights), [T, H/128] per token group (block mode, as per_token_group_quant_fp8 returns it).
      The rows are used as they are; the output is then bfloat16. per_act_token still selects the
      granularity of GEMM2's dynamic activation scale (outside block mode). The result equals the
      layer's on bf16 input quantized the same way.

    Per-token and per-group activation scales travel with their rows through moe_permute's
    scales path (one kernel pass).

    GEMM1 with the activation and quantization in its epilogue (cutlass_grouped_gemm_fp8_act_quant,
    no [M, 2I] bf16 intermediate, no activation pass) is the default where it applies: a CUDA
    input, gate_up_interleaved (interleave a concatenated w13, its per-channel scales and its bias
    once at load with :func:`interleave_gate_up`), a static a2_scale, per-expert or per-channel
    weight scales and more than 32 rows per local expert (T * K / E_local). The layer's bytes are
    the same either way. ``MOE_KERNELS_FUSED_GEMM1=0`` turns it off (only the value 0).

    Sizes: outside block mode H and I must be multiples of 16 (the grouped GEMM's TMA loads need
    16-byte aligned e4m3 rows), nothing more: gpt-oss's H = I = 2880 works (partial tiles).

    Args:
        hidden_states: [T, H] bfloat16 or float16, or float8_e4m3fn (pre-quantized, see above).
        w1: [E_local, 2I, H] float8_e4m3fn, rows 0..I-1 gate and I..2I-1 up (vLLM's w13).
        w2: [E_local, H, I] float8_e4m3fn.
        topk_weights: [T, K] float32; topk_ids: [T, K] int32/int64 global expert ids.
        w1_scale, w2_scale: [E_local] float32 per-expert weight scales, or with per_out_ch
            per-output-channel scales [E_local, 2I] and [E_local, H] (a trailing 1 is allowed),
            or 3-D block scales (block mode, above).
        a1_scale: [1] float32 static activation scale (bf16/fp16 input, not in block mode), or the
            scale of float8_e4m3fn hidden_states (required then), or None for dynamic scales.
        a2_scale: [1] float32 static scale of GEMM2's input, or None for a dynamic one (per tensor,
            per token with per_act_token, per token per 128 columns in block mode). With
            expert_map, outside block mode, a2_scale or per_act_token is required (a dynamic
            per-tensor scale would span rows that no local expert computes).
        per_act_token: dynamic per-token activation scales (ignored for a static scale).
        per_out_ch: per-output-channel weight scales.
        expert_map: [E] int32 global -> local expert or -1 (expert parallelism); other experts'
            choices contribute nothing.
        num_local_experts: -1 or E_local.
        apply_router_weight_on_input: multiply the input by the weight (top-1 only, bf16/fp16
            input) instead of the output (w2_bias is then added unweighted).
        activation: ``"silu"``, ``"gelu"`` or ``"swigluoai"``.
        gate_up_interleaved: w1's 2I rows alternate gate, up.
        swiglu_alpha, swiglu_limit: the constants of ``"swigluoai"``.
        w1_bias: optional [E_local, 2I] float32 on w1's device, rows in w1's order.
        w2_bias: optional [E_local, H] float32 on w2's device.
    Returns:
        [T, H], hidden_states' dtype; bfloat16 for float8_e4m3fn hidden_states.
    """
    return _ops.cutlass_moe_fp8(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, a1_scale,
                                a2_scale, per_act_token, per_out_ch, expert_map, num_local_experts,
                                apply_router_weight_on_input, activation, gate_up_interleaved, float(swiglu_alpha),
                                float(swiglu_limit), w1_bias, w2_bias)


@torch.library.register_fake("moe_kernels::cutlass_grouped_gemm_fp8")
def _(a, b, a_scales, b_scales, expert_offsets, out_dtype=None):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.bfloat16)


@torch.library.register_fake("moe_kernels::cutlass_grouped_gemm_fp8_act_quant")
def _(a, b, a_scales, b_scales, expert_offsets, out_scale, activation="silu", swiglu_alpha=1.702,
      swiglu_limit=7.0, bias=None):
    return a.new_empty((a.shape[0], b.shape[1] // 2), dtype=torch.float8_e4m3fn)


@torch.library.register_fake("moe_kernels::cutlass_moe_fp8")
def _(hidden_states, w1, w2, topk_weights, topk_ids, w1_scale, w2_scale, a1_scale=None, a2_scale=None,
      per_act_token=False, per_out_ch=False, expert_map=None, num_local_experts=-1,
      apply_router_weight_on_input=False, activation="silu", gate_up_interleaved=False, swiglu_alpha=1.702,
      swiglu_limit=7.0, w1_bias=None, w2_bias=None):
    torch._check(activation in ("silu", "gelu", "swigluoai"),
                 lambda: f'cutlass_moe_fp8: activation must be "silu", "gelu" or "swigluoai", got "{activation}"')
    dtype = torch.bfloat16 if hidden_states.dtype == torch.float8_e4m3fn else hidden_states.dtype
    return torch.empty_like(hidden_states, dtype=dtype)
