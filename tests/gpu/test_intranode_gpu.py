"""The CUDA intranode dispatch/combine on a real GPU against the numpy oracle.

One rank, then 2, 4 and 8 ranks as processes sharing the GPU
under CUDA MPS, then a rank that never calls (the timeout message, not a hang).
Run with ``JAX_EP_GPU_TESTS=1 python -m pytest tests/gpu``; skipped without a GPU.
Under a scheduler (pytest once per process) the multi-rank tests run in place.
"""

import os
import sys

import pytest

from jax_ep.cuda import extension, intranode
from jax_ep.testing import external_launch, run_multiprocess

from gpu_env import WORKERS_DIR, gpu_count, gpu_present
from silent_peer import silent_peer_output


pytestmark = [
    pytest.mark.skipif(not gpu_present(), reason="needs an NVIDIA GPU and CUDA MPS"),
    pytest.mark.skipif(not extension.cuda_available() or not intranode.compiled(),
                       reason="jax_ep built without the CUDA intranode kernels"),
]


def test_one_rank(mps):
    results = run_multiprocess("intranode_workers:dispatch_combine", 1, platform="gpu",
                               timeout=300, env={"PYTHONPATH": WORKERS_DIR})
    assert results[0].ok and "gradients" in results[0].result["checked"], results[0].result


def test_moe_example_trains_on_the_cuda_backend(mps):
    if external_launch():
        pytest.skip("runs the example as its own process")
    import re
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(WORKERS_DIR)))
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "train_moe.py"),
                           "--backend", "cuda", "--steps", "30"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    first, last = map(float, re.search(r"first loss ([\d.]+)\s+last loss ([\d.]+)",
                                       proc.stdout).groups())
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_ranks_as_processes(mps, ranks):
    results = run_multiprocess("intranode_workers:dispatch_combine", ranks, platform="gpu",
                               timeout=400, env={"PYTHONPATH": WORKERS_DIR})
    for res in results:
        assert res.ok, res.describe()
        assert res.result["ranks"] == ranks and "gradients" in res.result["checked"]
        assert "remat" in res.result["checked"], res.result


multi_gpu = pytest.mark.skipif(gpu_count() < 2, reason="needs a host with several GPUs")


@multi_gpu
def test_one_process_per_gpu():
    """The usual multi-GPU launch: peers on other GPUs mapped by CUDA IPC."""
    n = gpu_count()
    results = run_multiprocess("intranode_workers:dispatch_combine", n, platform="gpu-per-process",
                               timeout=400, env={"PYTHONPATH": WORKERS_DIR})
    for res in results:
        assert res.ok, res.describe()
        assert res.result["ranks"] == n and "gradients" in res.result["checked"]


@multi_gpu
def test_one_process_owning_all_gpus():
    """One process per host: peers by pointer with peer access, one thread per GPU."""
    results = run_multiprocess("intranode_workers:dispatch_combine", 1, platform="gpu-all",
                               timeout=400, env={"PYTHONPATH": WORKERS_DIR})
    assert results[0].ok, results[0].describe()
    assert results[0].result["ranks"] == gpu_count(), results[0].result


def test_rank_that_never_calls_times_out_with_a_message(mps):
    if external_launch():
        pytest.skip("needs to control which rank calls; run without a scheduler")
    text, seconds = silent_peer_output("intranode_workers:one_rank_never_calls", WORKERS_DIR)
    assert "timed out" in text and "waiting for" in text and "from rank 1" in text, text[-3000:]
    assert "message in the exception: True" in text, text[-3000:]
    assert seconds < 100, seconds

