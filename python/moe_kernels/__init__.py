"""moe_kernels: Mixture-of-Experts CUDA kernels for PyTorch on Hopper.

The ops are registered under torch.ops.moe_kernels; the functions here wrap them with
docstrings, defaults and fake (meta) kernels for torch.compile.
"""

from pathlib import Path

from . import _library

_library.load()

from .ops.ep import (  # noqa: E402
    ep_dispatch_plan,
    ep_pack_records,
    ep_post_reorder,
    ep_pre_reorder,
    ep_record_bytes,
    ep_unpack_records,
)
from .ops.permute import (  # noqa: E402
    compute_problem_sizes,
    moe_permute,
    moe_sort_tokens,
    moe_unpermute,
)
from . import modular  # noqa: E402
from .ops.gemm import (  # noqa: E402
    cutlass_grouped_gemm_fp8,
    cutlass_grouped_gemm_fp8_act_quant,
    cutlass_moe_fp8,
    grouped_gemm_fp8_choice,
    grouped_gemm_fp8_configs,
    interleave_gate_up,
)
from .ops.routing import moe_fused_gate  # noqa: E402
from .ops.fourbit import (  # noqa: E402
    cutlass_moe_mxfp4,
    cutlass_moe_w4a8,
    grouped_gemm_mxfp4,
    grouped_gemm_w4a8,
    w4a8_scales_from_sglang,
)
from .ops.quant import (  # noqa: E402
    per_token_group_quant_fp8,
    scaled_fp8_quant,
    silu_and_mul_quant_fp8,
)

#: Prefix for CMake's find_package(moe_kernels) in C++ extensions that link the library.
cmake_prefix_path = str(Path(__file__).resolve().parent / "lib" / "cmake")
#: Public C++ headers (include/moe_kernels/*.h).
include_path = str(Path(__file__).resolve().parent / "include")

__all__ = [
    "cutlass_grouped_gemm_fp8",
    "cutlass_grouped_gemm_fp8_act_quant",
    "interleave_gate_up",
    "grouped_gemm_fp8_configs",
    "grouped_gemm_fp8_choice",
    "cutlass_moe_fp8",
    "cutlass_moe_mxfp4",
    "cutlass_moe_w4a8",
    "grouped_gemm_mxfp4",
    "grouped_gemm_w4a8",
    "w4a8_scales_from_sglang",
    "moe_fused_gate",
    "compute_problem_sizes",
    "ep_dispatch_plan",
    "ep_pack_records",
    "ep_post_reorder",
    "ep_pre_reorder",
    "ep_record_bytes",
    "ep_unpack_records",
    "moe_permute",
    "moe_sort_tokens",
    "moe_unpermute",
    "per_token_group_quant_fp8",
    "scaled_fp8_quant",
    "silu_and_mul_quant_fp8",
    "cmake_prefix_path",
    "include_path",
]
