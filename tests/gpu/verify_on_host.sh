#!/usr/bin/env bash
# One stage of the GPU verification of this checkout, for a GPU host reached
# one command at a time (each stage stays under ~9 minutes; logs go to $OUT,
# or /tmp/jax_ep_verify when OUT is unset). Run from the repository root:
#
#   bash tests/gpu/verify_on_host.sh graphs     # never run yet: CUDA graphs, comm stream (start here)
#   bash tests/gpu/verify_on_host.sh internode  # never run yet: internode, LL virtual nodes, ragged
#   bash tests/gpu/verify_on_host.sh suite      # the rest of tests/gpu and tests/cuda
#   bash tests/gpu/verify_on_host.sh slow     # lifecycle x100 and compute-sanitizer
#   bash tests/gpu/verify_on_host.sh bench    # the benchmarks whose figures are missing
#
# Every stage builds first (tests/gpu/build_on_host.sh; ~30 s) unless
# JAX_EP_BUILT=1 says this shell already did. A stage's exit status is its
# pytest's (or the first failing benchmark's).
set -uo pipefail
stage="${1:-graphs}"
out="${OUT:-/tmp/jax_ep_verify}"
mkdir -p "$out"
if [ "${JAX_EP_BUILT:-0}" != 1 ]; then
  # shellcheck disable=SC1091
  . tests/gpu/build_on_host.sh || exit 1
fi
export JAX_EP_GPU_TESTS=1 JAX_EP_EXPECT_CUDA=1 JAX_EP_EXPECT_NVSHMEM=1

run() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$out/summary.log"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -3 "$out/$name.log" | tee -a "$out/summary.log"
  echo "== $name: exit $rc" | tee -a "$out/summary.log"
  return $rc
}

PYTEST=(python3 -m pytest -q -rsxXf)

status=0
case "$stage" in
  graphs)
    run graphs 480 "${PYTEST[@]}" tests/gpu/test_graphs_gpu.py || status=$?
    ;;
  internode)
    run internode 480 "${PYTEST[@]}" tests/gpu/test_internode_gpu.py \
      tests/gpu/test_low_latency_gpu.py -k "virtual or internode or node_peer or ragged" \
      || status=$?
    ;;
  suite)
    run suite 540 "${PYTEST[@]}" tests/gpu tests/cuda --ignore tests/gpu/test_internode_gpu.py \
      --ignore tests/gpu/test_graphs_gpu.py -k "not virtual and not ragged" \
      --deselect tests/gpu/test_memcheck_gpu.py::test_hostile_routing_under_memcheck \
      --deselect tests/gpu/test_lifecycle_gpu.py::test_initialize_shutdown_100_times \
      || status=$?
    ;;
  slow)
    run lifecycle 300 "${PYTEST[@]}" \
      tests/gpu/test_lifecycle_gpu.py::test_initialize_shutdown_100_times || status=$?
    run memcheck 240 "${PYTEST[@]}" \
      tests/gpu/test_memcheck_gpu.py::test_hostile_routing_under_memcheck || status=$?
    ;;
  bench)
    run bench_internode 100 python3 benchmarks/bench_internode.py --ranks 8 --ranks-per-node 4 \
      --iters 10 || status=$?
    run bench_ll_graphs 80 python3 benchmarks/bench_low_latency.py --ranks 1 --graphs \
      --iters 50 || status=$?
    run bench_decode_1 150 python3 benchmarks/bench_decode_step.py --ranks 1 || status=$?
    run bench_ragged_8 130 python3 benchmarks/bench_ragged_layer.py --ranks 8 || status=$?
    run bench_train_1 100 python3 benchmarks/bench_train.py --ranks 1 || status=$?
    ;;
  *)
    echo "verify_on_host.sh: unknown stage '$stage' (graphs | internode | suite | slow | bench)" >&2
    exit 2
    ;;
esac
exit "$status"
