"""Loads the compiled op library (_C.so) that registers torch.ops.moe_kernels."""

from pathlib import Path

import torch

_LIB_DIR = Path(__file__).resolve().parent


def load() -> None:
    candidates = sorted(_LIB_DIR.glob("_C*.so"))
    if not candidates:
        raise ImportError(
            f"moe_kernels: compiled library _C.so not found in {_LIB_DIR}; "
            "install the package with `pip install --no-build-isolation .`"
        )
    try:
        torch.ops.load_library(str(candidates[0]))
    except OSError as e:
        # _C.so is built on torch's stable ABI for torch >= 2.11 and links the CUDA runtime of one CUDA
        # major (the wheel's local version names it, e.g. +cu13): say so instead of a bare loader error.
        raise ImportError(
            f"moe_kernels: cannot load {candidates[0]}: {e}. It needs torch >= 2.11 built for the CUDA major "
            f"it was built for (this torch: {torch.__version__}, CUDA {torch.version.cuda}); a torch for "
            "another CUDA major needs a build from source (README: Which torch, which GPU)"
        ) from e
