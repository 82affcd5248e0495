import zlib

import pytest
import torch

import moe_kernels  # noqa: F401  (loads the op library)

HAS_CUDA = torch.cuda.is_available()


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
