"""What the installed moe_kernels offers, so that every benchmark runs on any build: a function or
keyword that a later branch adds (the activation keywords of cutlass_moe_fp8, the 4-bit layers) is
looked up here, and a row that needs a missing one is reported as skipped with the reason instead
of crashing the run."""

import inspect
from typing import Optional

import moe_kernels


def function(name: str):
    """moe_kernels.<name>, or None where this build has no such function."""
    return getattr(moe_kernels, name, None)


def accepts(name: str, *keywords: str) -> bool:
    """Whether moe_kernels.<name> exists and takes every keyword."""
    fn = function(name)
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(k in params for k in keywords)


def missing(name: str, *keywords: str, where: str = "") -> Optional[str]:
    """Why moe_kernels.<name>(..., keywords) cannot be called in this build, or None if it can."""
    if function(name) is None:
        return f"skipped: this build of moe_kernels has no {name}{f' ({where})' if where else ''}"
    absent = [k for k in keywords if not accepts(name, k)]
    if absent:
        return (f"skipped: {name} in this build takes no {', '.join(absent)}"
                f"{f' ({where})' if where else ''}")
    return None


def layer_needs(model) -> tuple:
    """The cutlass_moe_fp8 keywords a model's layer needs (activation, layout, biases)."""
    keys = tuple(model.layer_kwargs())
    if model.expert_bias:
        keys += ("w1_bias", "w2_bias")
    return keys
