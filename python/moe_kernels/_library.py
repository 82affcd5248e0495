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
    torch.ops.load_library(str(candidates[0]))
