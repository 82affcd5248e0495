import os
import zlib
from pathlib import Path

import pytest
import torch

import moe_kernels  # loads the op library

HAS_CUDA = torch.cuda.is_available()
SOURCE_PACKAGE = Path(__file__).resolve().parent.parent / "python" / "moe_kernels"


def pytest_report_header(config):
    return f"moe_kernels: {Path(moe_kernels.__file__).resolve().parent}"


def pytest_configure(config):
    # CI sets MOE_KERNELS_TEST_INSTALLED=1 to test the installed wheel: the source tree's copy
    # (through PYTHONPATH) would hide packaging bugs.
    if os.environ.get("MOE_KERNELS_TEST_INSTALLED") and Path(moe_kernels.__file__).resolve().parent == SOURCE_PACKAGE:
        raise pytest.UsageError(f"MOE_KERNELS_TEST_INSTALLED is set but moe_kernels was imported from the "
                                f"source tree ({SOURCE_PACKAGE}), not from an installed package")

# Property-based tests (tests/test_generated.py): two budgets. "ci" (no GPU: CPU references
# against plain torch formulas) is derandomized, so that CI runs the same examples every time and
# its time stays bounded (the generated suite takes about a minute on 2 cores). "gpu" (CUDA ops
# against the CPU references) draws fresh examples each run, more of them. Chosen by
# MOE_KERNELS_HYPOTHESIS_PROFILE, else by whether a GPU is present. No example database: nothing
# is written next to the tests; a failure prints its reproduction blob instead.
# Where hypothesis is not installed (.ci/run and the test extras install it) only
# test_generated.py is skipped, saying so.
try:
    from hypothesis import HealthCheck, settings
except ImportError:
    settings = None
if settings is not None:
    _COMMON = dict(deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("ci", max_examples=50, derandomize=True, **_COMMON)
    settings.register_profile("gpu", max_examples=150, **_COMMON)
    settings.load_profile(os.environ.get("MOE_KERNELS_HYPOTHESIS_PROFILE", "gpu" if HAS_CUDA else "ci"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # A seed per test derived from its name (crc32: stable across processes, unlike hash()):
    # random data differs between tests, and a failure reproduces.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
