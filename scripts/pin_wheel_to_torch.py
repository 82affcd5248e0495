"""Pins an unpacked moe_kernels wheel to the torch it was built against (run by build-wheel.sh).

_C.so is compiled against torch's C++ ABI, which holds only within one torch minor version, so the
wheel requires that minor (Requires-Dist: torch==2.14.*) and names it, with torch's CUDA version,
in a local version: 0.1.0 -> 0.1.0+torch2.14.cu130 (dist-info folder renamed to match).

    python scripts/pin_wheel_to_torch.py <folder made by `python -m wheel unpack`>
"""

import re
import sys
from pathlib import Path

import torch


def torch_pin() -> tuple[str, str]:
    """(requirement, local version label) for the torch importable here, e.g. ("torch==2.14.*", "torch2.14.cu130")."""
    minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = "cu" + torch.version.cuda.replace(".", "") if torch.version.cuda else "cpu"
    return f"torch=={minor}.*", f"torch{minor}.{cuda}"


def pin(unpacked: Path) -> str:
    [dist_info] = unpacked.glob("*.dist-info")
    metadata = dist_info / "METADATA"
    text = metadata.read_text()
    version = re.search(r"^Version: (\S+)$", text, re.M).group(1)
    if "+" in version:
        sys.exit(f"pin_wheel_to_torch: {dist_info.name} is pinned already ({version})")
    requirement, local = torch_pin()
    pinned = f"{version}+{local}"
    text = re.sub(r"^Version: .*$", f"Version: {pinned}", text, count=1, flags=re.M)
    text, found = re.subn(r"^Requires-Dist: torch\b.*$", f"Requires-Dist: {requirement}", text, flags=re.M)
    if found != 1:
        sys.exit(f"pin_wheel_to_torch: expected one 'Requires-Dist: torch' line in {metadata}, found {found}")
    metadata.write_text(text)
    dist_info.rename(dist_info.with_name(dist_info.name.replace(f"-{version}.dist-info", f"-{pinned}.dist-info")))
    return pinned


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(pin(Path(sys.argv[1])))
