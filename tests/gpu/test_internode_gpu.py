"""The CUDA internode dispatch/combine on virtual nodes, against the numpy oracle.

Ranks run as processes sharing the GPU under CUDA MPS, grouped into nodes by
`ranks_per_node`: every inter-node leg goes through NVSHMEM put-with-signal
(over P2P on one host), every intra-node leg through nvshmem_ptr stores. The
worker is the intranode one (intranode_workers.dispatch_combine) with the
node grouping: every dtype, the FP8 pair, overflow, invalid and duplicate
ids, a hot expert, changing routing, determinism and gradients, with combine
summed in the node tree. Under a scheduler (pytest once per process on a real
cluster) the same worker runs in place with the nodes NVSHMEM finds.
"""

import pytest

from jax_ep.cuda import extension, internode
from jax_ep.testing import external_launch, run_multiprocess

from gpu_env import WORKERS_DIR, gpu_count, gpu_present
from silent_peer import silent_peer_output

pytestmark = [
    pytest.mark.skipif(not gpu_present(), reason="needs an NVIDIA GPU and CUDA MPS"),
    pytest.mark.skipif(not extension.nvshmem_available() or not internode.compiled(),
                       reason="jax_ep built without the NVSHMEM (internode) kernels"),
]


@pytest.mark.parametrize("ranks, ranks_per_node", [(8, 4), (8, 2), (8, 1), (4, 2)],
                         ids=["2x4", "4x2", "8x1", "2x2"])
def test_virtual_nodes(mps, ranks, ranks_per_node):
    results = run_multiprocess("intranode_workers:dispatch_combine", ranks, platform="gpu",
                               timeout=500, env={"PYTHONPATH": WORKERS_DIR},
                               args=("0", str(ranks_per_node)))
    for res in results:
        assert res.ok, res.describe()
        assert res.result["internode"] and "gradients" in res.result["checked"], res.result
        assert "remat" in res.result["checked"], res.result


@pytest.mark.skipif(gpu_count() < 2 or gpu_count() % 2,
                    reason="needs a host with an even number (>= 2) of GPUs")
def test_two_virtual_nodes_across_gpus():
    """A process per GPU, the GPUs split into two nodes: NVLink stores inside a
    node, NVSHMEM puts across (the layout of a real two-node job)."""
    n = gpu_count()
    results = run_multiprocess("intranode_workers:dispatch_combine", n,
                               platform="gpu-per-process", timeout=500,
                               env={"PYTHONPATH": WORKERS_DIR}, args=("0", str(n // 2)))
    for res in results:
        assert res.ok, res.describe()
        assert res.result["internode"] and "remat" in res.result["checked"], res.result


def test_node_peer_that_never_calls_times_out_with_a_message(mps):
    if external_launch():
        pytest.skip("needs to control which rank calls; run without a scheduler")
    text, seconds = silent_peer_output("intranode_workers:one_rank_never_calls", WORKERS_DIR,
                                       args=("1", "20", "1"))
    assert "timed out" in text and "rank 1 (node 1, local 0)" in text, text[-3000:]
    assert "message in the exception: True" in text, text[-3000:]
    assert seconds < 100, seconds
