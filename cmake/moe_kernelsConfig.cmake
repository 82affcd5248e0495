# find_package(moe_kernels) for C++ extensions that link the ops library.
# Usage: list(APPEND CMAKE_PREFIX_PATH "$(python -c 'import moe_kernels; print(moe_kernels.cmake_prefix_path)')")
include(CMakeFindDependencyMacro)
find_dependency(Torch)
include("${CMAKE_CURRENT_LIST_DIR}/moe_kernelsTargets.cmake")
