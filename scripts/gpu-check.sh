#!/usr/bin/env bash
# On a GPU machine: build with all cores, run every test, run compute-sanitizer on the kernels,
# run the benchmarks, and print a short table last. Logs go to $OUT (or /tmp/gpu-check).
#
#   bash scripts/gpu-check.sh                 # everything
#   STAGES="build test" bash scripts/gpu-check.sh
#   BENCH_ARGS="--ops permute --quick" PYTEST_ARGS="-k permute" bash scripts/gpu-check.sh
#   (PYTEST_ARGS is split on spaces: write -k expressions without spaces, e.g. -k gemm)
#   GEMM_TRIAL=1 ...                          # also build the trial GEMM configurations
#   GEMM_BLOCK_TRIAL=1 ...                    # also build the trial block-scaled GEMM configurations
#
# Where the machine lacks the CUTLASS headers, stage the nvidia-cutlass wheel in .whl/ first
# (../shared/gpu/stage-wheels.sh); this script installs .whl/*.whl into /tmp/site when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
STAGES=${STAGES:-"build test sanitize bench ep"}
BENCH_ARGS=${BENCH_ARGS:-}  # arguments of python3 -m moe_kernels.bench (default: every op, every model)
PYTEST_ARGS=${PYTEST_ARGS:-}
summary=()
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
# The GPU image's default compiler (/opt/gcc/bin/g++) links libstdc++ statically into shared
# libraries; a second libstdc++ inside _C.so crashes as soon as a TORCH_CHECK message formats a
# number (seen 2026-11-22). Build with the system compiler, which links the shared libstdc++.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi

stage() { [[ " $STAGES " == *" $1 "* ]]; }

if stage build; then
  start=$SECONDS
  trial=()
  [ -n "${GEMM_TRIAL:-}" ] && trial+=(--config-settings=cmake.define.MOE_KERNELS_GEMM_TRIAL=ON)
  [ -n "${GEMM_BLOCK_TRIAL:-}" ] && trial+=(--config-settings=cmake.define.MOE_KERNELS_GEMM_BLOCK_TRIAL=ON)
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip install --no-build-isolation --no-deps -v "${trial[@]}" . \
    > "$OUT/build.log" 2>&1
  rc=$?
  summary+=("build: rc=$rc in $((SECONDS - start)) s (log: build.log)")
  if [ $rc -ne 0 ]; then
    grep -E "error|Error" "$OUT/build.log" | head -40
    printf '%s\n' "${summary[@]}"
    exit $rc
  fi
fi

if stage test; then
  python3 -m pytest tests -q -rs $PYTEST_ARGS 2>&1 | tee "$OUT/test.log" | tail -30
  rc=${PIPESTATUS[0]}
  [ $rc -ne 0 ] && status=$rc
  summary+=("tests: $(tail -1 "$OUT/test.log")")
fi

if stage sanitize; then
  for tool in memcheck racecheck synccheck; do
    # No caching allocator: every tensor is its own cudaMalloc, so memcheck sees a read or write
    # one element past a tensor instead of landing in the same cached block.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool --error-exitcode 9 \
      python3 scripts/sanitize_ops.py > "$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=$rc
    summary+=("compute-sanitizer $tool: rc=$rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1)")
  done
fi

if stage ep; then
  # Expert parallelism on two GPUs over NCCL (torchrun): scripts/ep-check.sh, skipped on one GPU.
  ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$ngpu" -ge 2 ]; then
    STAGES=run OUT="$OUT" bash scripts/ep-check.sh > "$OUT/ep.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=$rc
    summary+=("ep (2 GPUs, NCCL): rc=$rc, $(grep -E '^CHECK' "$OUT/ep.log" | tail -1) (log: ep.log)")
  else
    summary+=("ep: skipped (needs 2 GPUs, found $ngpu; run scripts/ep-check.sh on a 2-GPU machine)")
  fi
fi

if stage bench; then
  # The installed package's benchmarks (run from the repository root, which has no moe_kernels/
  # directory of its own, so the import finds the installed copy); the JSON goes to bench/results
  # and is copied to $OUT.
  python3 -m moe_kernels.bench $BENCH_ARGS > "$OUT/bench.log" 2> "$OUT/bench.stderr.log"  # stderr: progress
  rc=$?
  [ $rc -ne 0 ] && status=$rc
  summary+=("python3 -m moe_kernels.bench $BENCH_ARGS: rc=$rc (log: bench.log)")
  saved=$(grep -o 'saved .*\.json' "$OUT/bench.log" | tail -1 | cut -d' ' -f2-)
  [ -n "$saved" ] && cp "$saved" "$OUT/"
fi

echo
echo "================ summary ================"
stage bench && { echo "--- python3 -m moe_kernels.bench $BENCH_ARGS"; cat "$OUT/bench.log"; tail -5 "$OUT/bench.stderr.log"; }
printf '%s\n' "${summary[@]}"
exit $status
