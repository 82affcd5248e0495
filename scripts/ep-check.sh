#!/usr/bin/env bash
# Expert parallelism on two GPUs of one host over NCCL: (a) the EP layer against the single-GPU
# layer, (b) AllToAll dispatch + combine against raw all_to_all_single of the same bytes, (c) the
# whole EP layer with FP8 experts against the single-GPU layer, (graph) the fixed-capacity dispatch +
# combine captured in a CUDA graph against the raw calls captured alike (last), (chunked) the layer
# with ChunkedAllToAll against AllToAll and one GPU, then the 2-GPU pytest of the chunked
# layer in a CUDA graph. JSON in
# bench/results/bench_ep_dist_*.json (and $OUT), a short table last. 1-2 minutes after the build.
#
#   bash scripts/ep-check.sh                       # build (pip install .) + run on 2 GPUs
#   STAGES=run bash scripts/ep-check.sh            # the package is already installed
#   NPROC=2 ARGS="--tokens 128 4096" bash scripts/ep-check.sh
#   STAGES=run BACKEND=gloo bash scripts/ep-check.sh   # CPU, gloo: tests this script's logic (tiny shapes)
#
# NVLink multicast stays off (NVLS in NCCL, symmetric memory, NVSHMEM): never cuMulticastCreate.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ep-check}
mkdir -p "$OUT"
STAGES=${STAGES:-"build run"}
NPROC=${NPROC:-2}
BACKEND=${BACKEND:-nccl}
ARGS=${ARGS:-}
# ep_dist's stages; chunked = ChunkedAllToAll against AllToAll and one GPU (docs/ep.md)
EP_STAGES=${EP_STAGES:-check,comm,align,layer,chunked,graph}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ " $STAGES " == *" build "* ]]; then
  STAGES=build OUT="$OUT" bash scripts/gpu-check.sh || exit $?
fi

if [[ " $STAGES " == *" run "* ]]; then
  if [ "$BACKEND" = gloo ]; then
    backend_args=(--backend gloo --device cpu --small)
  else
    backend_args=(--backend nccl --device cuda)
  fi
  # The installed package's module (the repository root has no moe_kernels/ of its own, so the
  # import finds the installed copy, with its _C.so).
  # A hung collective ends at the limit (the script takes 1-2 minutes; the JSON is saved per stage).
  timeout "${LIMIT_S:-600}" python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    -m moe_kernels.bench.ep_dist "${backend_args[@]}" --stages "$EP_STAGES" --results bench/results $ARGS 2>&1 \
    | tee "$OUT/ep_dist.log"
  rc=${PIPESTATUS[0]}
  if [ "$BACKEND" = nccl ]; then
    # The 2-GPU tests: the chunked layer captured in a CUDA graph (tests/test_ep_chunked.py).
    timeout 180 python3 -m pytest tests/test_ep_chunked.py -q -k cuda_graph 2>&1 | tee "$OUT/ep_pytest.log"
    [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  fi
  cp bench/results/bench_ep_dist_*.json "$OUT/" 2>/dev/null
  echo "ep_dist: rc=$rc (log: $OUT/ep_dist.log)"
  exit $rc
fi
