# What torch's CMake config needs found before find_package(Torch), on machines where it cannot
# find it alone. Used by this project and, installed beside moe_kernelsConfig.cmake, by every
# extension that calls find_package(moe_kernels). Reads MOE_KERNELS_PYTHON: the interpreter whose
# torch is used.

# torch's config finds CUDA through CUDA_TOOLKIT_ROOT_DIR; take it from CMake's own toolkit search
# (nvcc may be a wrapper script outside the toolkit, as /usr/local/bin/nvcc is here).
find_package(CUDAToolkit REQUIRED)
if(NOT CUDA_TOOLKIT_ROOT_DIR OR NOT EXISTS "${CUDA_TOOLKIT_ROOT_DIR}/include/cuda.h")
  get_filename_component(_moe_kernels_toolkit_root "${CUDAToolkit_BIN_DIR}" DIRECTORY)
  set(CUDA_TOOLKIT_ROOT_DIR "${_moe_kernels_toolkit_root}" CACHE PATH "CUDA toolkit root (for torch's FindCUDA)" FORCE)
endif()

# torch's config looks for nvrtc beside the CUDA toolkit. Toolkits without it (the CI image) still
# have the copy that the torch wheel depends on, in site-packages/nvidia/cu13/lib.
find_library(_moe_kernels_toolkit_nvrtc nvrtc HINTS "${CUDAToolkit_LIBRARY_DIR}" /usr/local/cuda/lib64)
if(NOT _moe_kernels_toolkit_nvrtc AND NOT EXISTS "${CUDA_nvrtc_LIBRARY}" AND MOE_KERNELS_PYTHON)
  execute_process(
    COMMAND "${MOE_KERNELS_PYTHON}" -c
      "import glob, os, nvidia; print(';'.join(sorted(glob.glob(os.path.join(nvidia.__path__[0], '*', 'lib', 'libnvrtc.so*')))))"
    OUTPUT_VARIABLE _moe_kernels_wheel_nvrtc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_moe_kernels_wheel_nvrtc)
    list(GET _moe_kernels_wheel_nvrtc 0 _moe_kernels_first_nvrtc)
    set(CUDA_nvrtc_LIBRARY "${_moe_kernels_first_nvrtc}" CACHE FILEPATH "nvrtc from the nvidia pip wheels" FORCE)
    message(STATUS "moe_kernels: using ${CUDA_nvrtc_LIBRARY}")
  endif()
endif()
