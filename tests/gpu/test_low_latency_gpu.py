"""The NVSHMEM low-latency kernels on a real GPU against the numpy oracle.

One PE, then 2, 4 and 8 PEs as processes sharing the GPU under CUDA MPS (NVSHMEM
multi-process-per-GPU), each run with direct stores and with every row moved
by NVSHMEM puts (force_put), and again with the system-scope flags and plain
launches that PEs on several GPUs use and with the plain (not streamed) fused
combine; the public API at several shapes; then a PE that never calls and one
that skips the streamed combine (timeout messages, not hangs). Run with
``python -m pytest tests/gpu``; skipped without a GPU.
"""


import pytest

from jax_ep.cuda import extension
from jax_ep.testing import external_launch, run_multiprocess

from gpu_env import WORKERS_DIR, gpu_count, gpu_present
from low_latency_workers import SHAPES
from silent_peer import silent_peer_output


pytestmark = [
    pytest.mark.skipif(not gpu_present(), reason="needs an NVIDIA GPU and CUDA MPS"),
    pytest.mark.skipif(not extension.nvshmem_available(),
                       reason="jax_ep built without the NVSHMEM low-latency kernels"),
]


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_low_latency_ranks_as_processes(mps, ranks):
    results = run_multiprocess("low_latency_workers:low_latency", ranks, platform="gpu", timeout=500,
                               env={"PYTHONPATH": WORKERS_DIR})
    for res in results:
        assert res.ok, res.describe()
        assert res.result["ranks"] == ranks
        assert "put fp8" in res.result["checked"] and "split" in res.result["checked"]
        assert {"larger M refused", "fp8 nan and inf"} <= set(res.result["checked"])
        # Every PE on this GPU: GPU-scope flags on the direct path, system
        # scope once rows go by put; dependent launch on both; the streamed
        # combine at several PEs at GPU scope only.
        assert res.result["modes"] == {"direct": [True, True, ranks > 1],
                                       "put": [False, True, False]}


# The kernels as peers on other GPUs run them (system-scope flags and
# fences, the plain combine), without programmatic dependent launch; and the
# plain fused combine at GPU scope (JAX_EP_LL_NO_STREAM).
SETTINGS = {
    "system_scope_without_dependent_launch": (
        {"JAX_EP_LL_SYS_SCOPE": "1", "JAX_EP_LL_NO_PDL": "1"},
        {"direct": [False, False, False], "put": [False, False, False]}),
    "plain_combine": (
        {"JAX_EP_LL_NO_STREAM": "1"},
        {"direct": [True, True, False], "put": [False, True, False]}),
}


@pytest.mark.parametrize("ranks", [2, 8])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_low_latency_with_other_settings(mps, setting, ranks):
    env, modes = SETTINGS[setting]
    results = run_multiprocess("low_latency_workers:low_latency", ranks, platform="gpu", timeout=500,
                               env={"PYTHONPATH": WORKERS_DIR, **env})
    for res in results:
        assert res.ok, res.describe()
        assert "put fp8" in res.result["checked"] and "split" in res.result["checked"]
        assert res.result["modes"] == modes


@pytest.mark.skipif(gpu_count() < 2, reason="needs a host with several GPUs")
def test_low_latency_one_process_per_gpu():
    """The usual multi-GPU launch: PE i on GPU i, peers mapped over NVLink
    (system-scope flags, the plain combine)."""
    n = gpu_count()
    results = run_multiprocess("low_latency_workers:low_latency", n, platform="gpu-per-process",
                               timeout=500, env={"PYTHONPATH": WORKERS_DIR})
    for res in results:
        assert res.ok, res.describe()
        assert res.result["ranks"] == n
        assert "put fp8" in res.result["checked"] and "split" in res.result["checked"]
        assert res.result["modes"] == {"direct": [False, True, False], "put": [False, True, False]}


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_public_low_latency_api_on_cuda(mps, ranks):
    results = run_multiprocess("low_latency_workers:public_api", ranks, platform="gpu", timeout=500,
                               env={"PYTHONPATH": WORKERS_DIR})
    for res in results:
        assert res.ok, res.describe()
        assert res.result["ranks"] == ranks, res.result
        assert "remat" in res.result["checked"], res.result


@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_public_low_latency_api_ragged_layout_on_cuda(mps, ranks):
    """layout="ragged": the padded kernels' rows gathered into [N, H] (and y back
    before the combine), every check of the padded run, gradients included."""
    results = run_multiprocess("low_latency_workers:public_api", ranks, platform="gpu", timeout=500,
                               env={"PYTHONPATH": WORKERS_DIR}, args=("0", "small", "0", "ragged"))
    for res in results:
        assert res.ok, res.describe()
        assert res.result["ranks"] == ranks and res.result["layout"] == "ragged", res.result
        assert {"fp8", "split", "gradients", "remat"} <= set(res.result["checked"]), res.result


@pytest.mark.parametrize("ranks, ranks_per_node", [(4, 2), (8, 4)], ids=["2x2", "2x4"])
def test_public_low_latency_api_on_virtual_nodes(mps, ranks, ranks_per_node):
    """The node map of initialize(ranks_per_node=): PEs of the other node by puts
    (through the send buffer), PEs of this node by stores, in one op."""
    results = run_multiprocess("low_latency_workers:public_api", ranks, platform="gpu",
                               timeout=500, env={"PYTHONPATH": WORKERS_DIR},
                               args=("0", "small", str(ranks_per_node)))
    for res in results:
        assert res.ok, res.describe()
        assert "gradients" in res.result["checked"] and "remat" in res.result["checked"]
        assert res.result["unmapped"] == ranks - ranks_per_node, res.result


# Shapes beyond the small one, each reaching code the small shape does not
# (SHAPES in workers/low_latency_workers.py):
#  decode:       hidden 7168, top-8, 128 tokens: several warps share a row (send,
#                receive and combine).
#  many_experts: 4096 experts, 160 tokens: the dispatch's token-position
#                fallback (the mask table would not fit in shared memory), a
#                receive prefix table over 48 KiB, and bf16 rows of 16 vectors
#                (fewer than a warp).
#  odd_hidden:   hidden 2304 bf16 = 288 vectors per row, shared by two warps of
#                144: a warp's second pass (of 32 x 4 vectors) has work for 16
#                lanes only (a full-mask shuffle in such a pass hung the
#                dispatch send).
#  wide_top_k:   top-12: more rows per token than a combine thread keeps in
#                flight (8), so the streamed combine's receive takes the
#                per-chunk path (own experts' rows read from y there too).
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("shape", ["decode", "many_experts", "odd_hidden", "wide_top_k"])
def test_public_low_latency_api_on_cuda_at_other_shapes(mps, shape, ranks):
    results = run_multiprocess("low_latency_workers:public_api", ranks, platform="gpu", timeout=500,
                               env={"PYTHONPATH": WORKERS_DIR}, args=("0", shape))
    for res in results:
        assert res.ok, res.describe()
        assert res.result["ranks"] == ranks, res.result
        assert res.result["shape"] == list(SHAPES[shape]), res.result
        assert "fp8" in res.result["checked"], res.result


def test_pe_that_never_calls_times_out_with_a_message(mps):
    if external_launch():
        pytest.skip("needs to control which PE calls; run without a scheduler")
    text, seconds = silent_peer_output("low_latency_workers:one_rank_never_calls", WORKERS_DIR)
    assert "timed out" in text and "of PE 1" in text, text[-3000:]
    assert "message in the exception: True" in text, text[-3000:]
    assert seconds < 100, seconds


def test_pe_that_skips_the_streamed_combine_times_out_with_a_message(mps):
    if external_launch():
        pytest.skip("needs to control which PE calls; run without a scheduler")
    text, seconds = silent_peer_output("low_latency_workers:one_rank_skips_the_combine", WORKERS_DIR)
    assert "streamed combine: True" in text, text[-3000:]
    assert "timed out" in text and "ll_combine" in text and "of PE 1" in text, text[-3000:]
    assert "message in the exception: True" in text, text[-3000:]
    assert seconds < 100, seconds
