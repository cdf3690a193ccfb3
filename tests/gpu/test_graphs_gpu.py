"""jax_ep inside XLA's CUDA graphs and on its own stream, on a real GPU.

For every mode, at one rank and 8 ranks as processes sharing the GPU under
MPS: eight calls of one compiled step (dispatch -> stand-in experts ->
combine) with command buffers forced on for custom calls, each on the previous
call's donated buffers with new contents, so each routes differently while
the addresses XLA recorded stay put (XLA re-records when one moves). Every
call must equal the numpy oracle, and the graphed results the ungraphed ones
to the bit (gradients too). The handlers'
host-run count is the proof that XLA really replayed them: without graphs it
is one per op per step; with graphs only the recordings count, so a call XLA
silently left out of the graph fails here. The workers: graph_workers.py.
"""

import pytest

from jax_ep.cuda import extension
from jax_ep.testing import run_multiprocess

from gpu_env import WORKERS_DIR, gpu_present

pytestmark = [
    pytest.mark.skipif(not gpu_present(), reason="needs an NVIDIA GPU and CUDA MPS"),
    pytest.mark.skipif(not extension.cuda_available(), reason="jax_ep built without CUDA"),
]

MODES = ["intranode", "internode", "low_latency", "low_latency_ragged", "low_latency_split"]
STEPS = 8


@pytest.mark.parametrize("ranks", [1, 8])
@pytest.mark.parametrize("mode", MODES)
def test_graph_replays_match_the_oracle_and_skip_the_host(mps, mode, ranks):
    if mode != "intranode" and not extension.nvshmem_available():
        pytest.skip("jax_ep built without the NVSHMEM kernels")
    if mode == "internode" and ranks < 2:
        pytest.skip("internode needs at least two (virtual) nodes")
    results = run_multiprocess("graph_workers:graphed", ranks, platform="gpu", timeout=500,
                               env={"PYTHONPATH": WORKERS_DIR}, args=(mode, "0", str(STEPS)))
    for res in results:
        assert res.ok, res.describe()
        runs, ops = res.result["host_runs"], res.result["ops_per_step"]
        assert runs["ungraphed"] == STEPS * ops, res.result  # every op of every step
        # Graphed: only the first calls run the handlers' host code (XLA runs
        # once before recording, then records, and records again if a buffer
        # moved); the later calls replay.
        assert runs["graphed"] <= 3 * ops < STEPS * ops, res.result
        assert runs["graphed_per_call"][-1] == 0, res.result


def test_comm_stream_overlaps_the_other_micro_batch_and_changes_nothing(mps):
    results = run_multiprocess("graph_workers:overlap", 1, platform="gpu", timeout=300,
                               env={"PYTHONPATH": WORKERS_DIR})
    res = results[0]
    assert res.ok, res.describe()
    r = res.result
    assert r["comm_kernels"] and r["gemm_kernels"], r
    assert set(r["comm_streams"]).isdisjoint(r["gemm_streams"]), r  # comm on its own stream
    assert r["overlap_us"] > 0, r  # and concurrent with the other micro-batch's matmuls


@pytest.mark.parametrize("mode", ["intranode", "low_latency"])
def test_a_graph_from_before_shutdown_never_touches_freed_buffers(mps, mode):
    if mode != "intranode" and not extension.nvshmem_available():
        pytest.skip("jax_ep built without the NVSHMEM kernels")
    res = run_multiprocess("graph_workers:stale_graph", 1, platform="gpu", timeout=300,
                           env={"PYTHONPATH": WORKERS_DIR}, args=(mode,))[0]
    assert res.ok, res.describe()
    r = res.result
    if r["outcome"] == "stopped":  # an old recording replayed: its first kernel refused
        assert "compiled before jax_ep.shutdown()" in r["message"], r
    else:  # XLA recorded the graph again with the new buffers (and matched the oracle)
        assert r["outcome"] == "recorded again" and r["host_runs"] > 0, r
