"""Labels an unpacked moe-kernels-cuda wheel with the CUDA major it was built for (run by build-wheel.sh).

_C.so is built on PyTorch's stable ABI (TORCH_TARGET_VERSION 2.11), so it serves every torch >= 2.11:
the requirement stays `torch>=2.11` (checked here, never pinned). What the stable ABI does not cover is
the CUDA major version: the kernels link CUDA 13's runtime and load beside torch's CUDA 13 libraries,
so the local version names it: 0.1.0 -> 0.1.0+cu13 (dist-info folder renamed to match). A torch built
for CUDA 12 needs a wheel built against it (docs/packaging.md).

    python scripts/label_wheel_cuda.py <folder made by `python -m wheel unpack`>
"""

import re
import sys
from pathlib import Path

import torch

REQUIREMENT = "torch>=2.11"


def cuda_label() -> str:
    """The local version label of the torch importable here: "cu13" for any CUDA 13.x build."""
    if not torch.version.cuda:
        sys.exit("label_wheel_cuda: this torch has no CUDA (torch.version.cuda is None); build against a CUDA torch")
    return "cu" + torch.version.cuda.split(".")[0]


def label(unpacked: Path) -> str:
    [dist_info] = unpacked.glob("*.dist-info")
    metadata = dist_info / "METADATA"
    text = metadata.read_text()
    version = re.search(r"^Version: (\S+)$", text, re.M).group(1)
    if "+" in version:
        sys.exit(f"label_wheel_cuda: {dist_info.name} is labelled already ({version})")
    requirements = re.findall(r"^Requires-Dist: (torch\b.*)$", text, re.M)
    if requirements != [REQUIREMENT]:
        sys.exit(f"label_wheel_cuda: expected exactly 'Requires-Dist: {REQUIREMENT}' in {metadata}, found {requirements}")
    labelled = f"{version}+{cuda_label()}"
    text = re.sub(r"^Version: .*$", f"Version: {labelled}", text, count=1, flags=re.M)
    metadata.write_text(text)
    dist_info.rename(dist_info.with_name(dist_info.name.replace(f"-{version}.dist-info", f"-{labelled}.dist-info")))
    return labelled


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(label(Path(sys.argv[1])))
