# torch's CMake config looks for nvrtc beside the CUDA toolkit. Toolkits without it (the CI image)
# still have the copy that the torch wheel depends on, in site-packages/nvidia/cu13/lib.
find_library(_toolkit_nvrtc nvrtc HINTS "${CUDAToolkit_LIBRARY_DIR}" /usr/local/cuda/lib64)
if(NOT _toolkit_nvrtc AND NOT EXISTS "${CUDA_nvrtc_LIBRARY}")
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import glob, os, nvidia; print(';'.join(sorted(glob.glob(os.path.join(nvidia.__path__[0], '*', 'lib', 'libnvrtc.so*')))))"
    OUTPUT_VARIABLE _wheel_nvrtc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_wheel_nvrtc)
    list(GET _wheel_nvrtc 0 _first_nvrtc)
    set(CUDA_nvrtc_LIBRARY "${_first_nvrtc}" CACHE FILEPATH "nvrtc from the nvidia pip wheels" FORCE)
    message(STATUS "moe_kernels: using ${CUDA_nvrtc_LIBRARY}")
  endif()
endif()
