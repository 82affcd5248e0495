"""FP8 test data: per-expert quantized weights and their dequantized values."""

import torch

FP8 = torch.float8_e4m3fn


def quantize_per_expert(w):
    """w [E, N, K] float -> (w_q e4m3, scale [E] f32) with w ~ w_q * scale."""
    scale = w.abs().amax(dim=(1, 2)).clamp(min=1e-12) / 448.0
    return (w / scale[:, None, None]).to(FP8), scale.float()


def dequantize_per_expert(w_q, scale):
    return w_q.float() * scale[:, None, None]


def rel_error(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()
