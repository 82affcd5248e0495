# Locates the CUTLASS headers. We do not vendor CUTLASS: the headers come from the
# `nvidia-cutlass` pip package (its cutlass_library/source tree). Pass -DCUTLASS_DIR=<root of a
# CUTLASS checkout or of cutlass_library/source> to use another copy.
if(NOT CUTLASS_DIR)
  execute_process(
    COMMAND "${Python_EXECUTABLE}" -c
      "import os, cutlass_library; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source'))"
    OUTPUT_VARIABLE CUTLASS_DIR
    OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _cutlass_found)
  if(NOT _cutlass_found EQUAL 0)
    set(CUTLASS_DIR "")
  endif()
endif()

if(CUTLASS_DIR AND EXISTS "${CUTLASS_DIR}/include/cutlass/cutlass.h")
  set(CUTLASS_INCLUDE_DIRS "${CUTLASS_DIR}/include" "${CUTLASS_DIR}/tools/util/include")
  message(STATUS "moe_kernels: CUTLASS headers in ${CUTLASS_DIR}")
  set(CUTLASS_FOUND TRUE)
else()
  message(STATUS "moe_kernels: CUTLASS headers not found (pip install nvidia-cutlass)")
  set(CUTLASS_FOUND FALSE)
endif()
