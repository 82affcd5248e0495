#!/usr/bin/env bash
# The whole GPU verification on a GPU machine (issue 19), a short summary printed last:
#
#   install     the prebuilt wheel dist/*.whl (carried to the machine; WHEEL=path picks another) into
#               a fresh venv beside the machine's torch (its site-packages seen through a .pth: the
#               wheel is tested against the torch the machine has, 2.11 on the H200 image); no build.
#               Without a wheel: the build stage instead (pip install . with all cores, as before).
#   test        the whole pytest suite against the installed package (MOE_KERNELS_TEST_INSTALLED=1:
#               the source tree's python/ cannot be imported by mistake); test_downstream.py apart:
#   downstream  the C++ extension test (tests/test_downstream.py: CPU and CUDA) against the install
#   sanitize    compute-sanitizer memcheck, racecheck, synccheck on scripts/sanitize_ops.py (every
#               kernel, this wave's activations, biases and 4-bit GEMMs where the build has them)
#   bench       python -m moe_kernels.bench $BENCH_ARGS (default: --quick, ops host, layer_mxfp4,
#               layer_w4a8, gemm_mxfp4, layer, gemm, layer_block, every model incl. gpt-oss), JSON + plot
#   soak        scripts/soak.py: SOAK_CALLS layer calls (default 10,000) with random shapes, routings,
#               modes and formats; memory flat, no error, a CPU-reference sample
#   ep          scripts/ep-check.sh on 2 GPUs (skipped on one)
#
#   bash scripts/gpu-check.sh                                    # everything (~25 min on one H200)
#   STAGES="install test downstream" bash scripts/gpu-check.sh   # any subset, in this order
#   BENCH_ARGS="--ops layer --models gpt-oss --quick" SOAK_CALLS=1000 STAGES="install bench soak" ...
#   PYTEST_ARGS="-k gemm" ...      (split on spaces: write -k expressions without spaces)
#
# The device tool stops a command after 10 minutes: run it there as three calls on the same warm
# machine, each inside that limit by the default stage limits (install is repeated: seconds):
#   STAGES="install test downstream"   STAGES="install sanitize soak"   STAGES="install bench ep"
# (carry dist/, which git ignores, with the wheel). The stage limits (seconds, env): TEST_LIMIT_S
# 420, DOWNSTREAM_LIMIT_S 120, SANITIZE_LIMIT_S 120 per tool, SOAK_LIMIT_S 150, BENCH_LIMIT_S 540:
# about 25 minutes in all. The bench JSON is saved after every op, so a bench cut short keeps the
# ops it finished (BENCH_ARGS lists the 4-bit ops and host first for that reason).
# Each stage runs under a time limit (TEST_LIMIT_S, SANITIZE_LIMIT_S per tool, BENCH_LIMIT_S,
# SOAK_LIMIT_S, ...), never past TOTAL_LIMIT_S (default 1500 s) from the start.
#
# Results: logs in $WORK (default /tmp/gpu-check-work); $OUT (default /tmp/gpu-check) receives at
# most 6 files, packed again after every stage (a call cut short keeps what ran): summary.txt,
# logs.tar.gz (every log, each capped at its last 4 MiB), bench_gpu-check_*.json and its plot,
# soak.json, bench_ep_dist_*.json. The device tool returns at most 8 files of 16 MiB.
#
# Where the machine lacks a Python package (or the CUTLASS headers for the build stage), stage
# its wheel in .whl/ first (../shared/gpu/stage-wheels.sh): .whl/*.whl go to /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-check-work}
VENV=${VENV:-/tmp/moe-kernels-venv}
mkdir -p "$OUT" "$WORK"
STAGES=${STAGES:-"install test downstream sanitize bench soak ep"}
BENCH_ARGS=${BENCH_ARGS:-"--quick --ops host,layer_mxfp4,layer_w4a8,gemm_mxfp4,layer,gemm,layer_block"}
PYTEST_ARGS=${PYTEST_ARGS:-}
SANITIZE_ARGS=${SANITIZE_ARGS:-}
TOTAL_LIMIT_S=${TOTAL_LIMIT_S:-1500}
WHEEL=${WHEEL:-$(ls -t dist/*.whl 2>/dev/null | head -1)}
summary=()
status=0
t0=$SECONDS

export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# The GPU image's default compiler (/opt/gcc/bin/g++) links libstdc++ statically into shared
# libraries; a second libstdc++ inside _C.so crashes as soon as a TORCH_CHECK message formats a
# number (seen 2026-11-22). Build (and build the downstream test) with the system compiler.
if [ -x /usr/bin/g++ ]; then
  export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi

stage() { [[ " $STAGES " == *" $1 "* ]]; }
note() { summary+=("$1"); echo ">>> $1"; }
# Seconds a stage may take: its own limit, never past the total.
limit() { local left=$((TOTAL_LIMIT_S - (SECONDS - t0))); [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"; }
# After each stage: track $rc in the exit status; timed_out says so in the summary (timeout: 124).
track() { [ "$1" -ne 0 ] && status=$1; }
timed_out() { [ "$1" -eq 124 ] && echo " (TIMED OUT)"; }

pack() {  # $OUT: the summary, every log (capped) in one tar.gz, the JSON results and the plot
  local dir=$WORK/pack
  rm -rf "$dir" && mkdir -p "$dir/logs"
  for f in "$WORK"/*.log; do [ -f "$f" ] && tail -c 4194304 "$f" > "$dir/logs/$(basename "$f")"; done
  tar -czf "$OUT/logs.tar.gz" -C "$dir" logs 2>/dev/null
  printf '%s\n' "${summary[@]}" > "$OUT/summary.txt"
  for f in "$WORK"/bench_gpu-check_*.json "$WORK"/bench_gpu-check_*.png "$WORK"/soak.json "$WORK"/bench_ep_dist_*.json; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
}

# A venv made earlier on this (warm) machine serves the later calls of a split run.
use_venv() { export PATH="$VENV/bin:$PATH" MOE_KERNELS_TEST_INSTALLED=1; }
[ -x "$VENV/bin/python3" ] && ! stage install && use_venv

if stage install && [ -n "$WHEEL" ]; then
  start=$SECONDS
  rm -rf "$VENV"
  {
    python3 -m venv --without-pip "$VENV" &&
    # The machine's torch (and pytest, numpy, transformers, ...) through a .pth: the venv holds
    # only the wheel, and its own site-packages come first on sys.path.
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') &&
    python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))' \
      > "$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-site.pth" &&
    echo "$site" >> "$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-site.pth" &&
    "$VENV/bin/python3" -m pip install --no-deps --no-index --no-compile "$WHEEL" &&
    (cd / && "$VENV/bin/python3" -c 'import moe_kernels, torch; print("installed", moe_kernels.__file__, "torch", torch.__version__, "cuda", torch.version.cuda)')
  } > "$WORK/install.log" 2>&1
  rc=$?
  use_venv
  note "install: $(basename "$WHEEL") into $VENV beside torch $(cd / && python3 -c 'import torch; print(torch.__version__)' 2>/dev/null): rc=$rc in $((SECONDS - start)) s; $(grep '^installed' "$WORK/install.log" | cut -c1-160)"
  if [ $rc -ne 0 ]; then
    tail -30 "$WORK/install.log"; pack; printf '%s\n' "${summary[@]}"; exit $rc
  fi
elif stage install || stage build; then
  # No wheel: build and install from source into the machine's python (the earlier procedure).
  note "install: no wheel in dist/ (WHEEL unset): building from source instead"
  start=$SECONDS
  trial=()
  [ -n "${GEMM_TRIAL:-}" ] && trial+=(--config-settings=cmake.define.MOE_KERNELS_GEMM_TRIAL=ON)
  [ -n "${GEMM_BLOCK_TRIAL:-}" ] && trial+=(--config-settings=cmake.define.MOE_KERNELS_GEMM_BLOCK_TRIAL=ON)
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout "$(limit ${BUILD_LIMIT_S:-900})" \
    python3 -m pip install --no-build-isolation --no-deps -v "${trial[@]}" . > "$WORK/build.log" 2>&1
  rc=$?
  track $rc
  note "build: rc=$rc$(timed_out $rc) in $((SECONDS - start)) s (log: build.log)"
  if [ $rc -ne 0 ]; then
    grep -E "error|Error" "$WORK/build.log" | head -40; pack; printf '%s\n' "${summary[@]}"; exit $rc
  fi
  export MOE_KERNELS_TEST_INSTALLED=1
fi

if stage test; then
  start=$SECONDS
  # shellcheck disable=SC2086
  timeout "$(limit ${TEST_LIMIT_S:-420})" python3 -m pytest tests -q -rs -p no:cacheprovider \
    --ignore=tests/test_downstream.py $PYTEST_ARGS > "$WORK/test.log" 2>&1
  rc=$?
  track $rc
  tail -30 "$WORK/test.log"
  note "tests: $(tail -1 "$WORK/test.log") rc=$rc$(timed_out $rc) in $((SECONDS - start)) s (log: test.log)"
  pack
fi

if stage downstream; then
  start=$SECONDS
  timeout "$(limit ${DOWNSTREAM_LIMIT_S:-120})" python3 -m pytest tests/test_downstream.py -q -rs -p no:cacheprovider \
    > "$WORK/downstream.log" 2>&1
  rc=$?
  track $rc
  note "downstream C++ test (CPU + CUDA): $(tail -1 "$WORK/downstream.log") rc=$rc$(timed_out $rc) in $((SECONDS - start)) s"
  pack
fi

if stage sanitize; then
  for tool in memcheck racecheck synccheck; do
    start=$SECONDS
    # No caching allocator: every tensor is its own cudaMalloc, so memcheck sees a read or write
    # one element past a tensor instead of landing in the same cached block.
    # shellcheck disable=SC2086
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(limit ${SANITIZE_LIMIT_S:-120})" \
      compute-sanitizer --tool $tool --error-exitcode 9 python3 scripts/sanitize_ops.py $SANITIZE_ARGS \
      > "$WORK/sanitize_$tool.log" 2>&1
    rc=$?
    track $rc
    fam=$(grep -E '^sanitize_ops: (SKIPPED|FAILED)' "$WORK/sanitize_$tool.log" | cut -c14-60 | tr '\n' ';')
    note "compute-sanitizer $tool: rc=$rc$(timed_out $rc) in $((SECONDS - start)) s, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$WORK/sanitize_$tool.log" | tail -1)${fam:+; $fam}"
    pack
  done
fi

if stage bench; then
  start=$SECONDS
  # The installed package's benchmarks, from the repository root (which has no moe_kernels/ of its
  # own: the import finds the installed copy). Progress goes to stderr.
  device=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0).replace(" ", "_"))' 2>/dev/null || echo gpu)
  json="$WORK/bench_gpu-check_${device}_$(date -u +%F).json"
  plot_args=()
  python3 -c 'import matplotlib' 2>/dev/null && plot_args=(--plot "${json%.json}.png")
  # shellcheck disable=SC2086
  timeout "$(limit ${BENCH_LIMIT_S:-540})" python3 -m moe_kernels.bench $BENCH_ARGS --json "$json" "${plot_args[@]}" \
    > "$WORK/bench.log" 2> "$WORK/bench.stderr.log"
  rc=$?
  track $rc
  suspects=$(grep -c '^!!!   ' "$WORK/bench.log")
  note "bench ($BENCH_ARGS): rc=$rc$(timed_out $rc) in $((SECONDS - start)) s, $(grep -o '[0-9]* rows in.*' "$WORK/bench.log" | tail -1 | cut -d, -f1), $suspects CEILING SUSPECT row(s), skipped rows: $(grep -c ' skipped ' "$WORK/bench.log")"
  pack
fi

if stage soak; then
  start=$SECONDS
  timeout "$(limit ${SOAK_LIMIT_S:-150})" python3 scripts/soak.py --json "$WORK/soak.json" > "$WORK/soak.log" 2>&1
  rc=$?
  track $rc
  note "soak: $(grep -E '^SOAK' "$WORK/soak.log" | tail -1 | cut -c1-400) rc=$rc$(timed_out $rc) in $((SECONDS - start)) s"
  pack
fi

if stage ep; then
  # Expert parallelism on two GPUs over NCCL (torchrun): scripts/ep-check.sh, skipped on one GPU.
  ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
  if [ "$ngpu" -ge 2 ]; then
    STAGES=run OUT="$WORK" LIMIT_S="$(limit 600)" bash scripts/ep-check.sh > "$WORK/ep.log" 2>&1
    rc=$?
    track $rc
    note "ep (2 GPUs, NCCL): rc=$rc$(timed_out $rc), $(grep -E '^CHECK' "$WORK/ep.log" | tail -1) (log: ep.log)"
  else
    note "ep: skipped (needs 2 GPUs, found $ngpu; run scripts/ep-check.sh on a 2-GPU machine)"
  fi
fi

note "total: $((SECONDS - t0)) s, status $status; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
pack
if stage bench && [ -f "$WORK/bench.log" ]; then
  echo; echo "--- python3 -m moe_kernels.bench $BENCH_ARGS (table: bench.log in logs.tar.gz)"
  grep -E '^(ceiling|!!!)' "$WORK/bench.log"
fi
echo
echo "================ summary ================"
printf '%s\n' "${summary[@]}"
exit $status
