"""initialize / shutdown on the GPU: repeated in one process without growth of
device memory or open files, and transactional (a failed initialize leaves
nothing behind; the next one works)."""

import pytest

from jax_ep.cuda import extension, intranode
from jax_ep.testing import run_multiprocess

from gpu_env import WORKERS_DIR, gpu_present

pytestmark = [
    pytest.mark.skipif(not gpu_present(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not intranode.compiled(), reason="no intranode kernels"),
]


@pytest.mark.parametrize("low_latency", ["0", "1"], ids=["intranode", "low_latency"])
def test_initialize_shutdown_100_times(mps, low_latency):
    if low_latency == "1" and not extension.nvshmem_available():
        pytest.skip("no low-latency kernels")
    (res,) = run_multiprocess("lifecycle_workers:repeated_setup", 1, platform="gpu",
                              timeout=500, env={"PYTHONPATH": WORKERS_DIR},
                              args=("100", low_latency))
    assert res.ok, res.describe()
    r = res.result
    assert r["times"] == 100
    assert r["leaked_bytes"] < 64 << 20, r   # the driver's own pools may move a little
    assert r["new_fds"] <= 2, r


def test_a_failed_initialize_leaves_nothing(mps):
    if not extension.nvshmem_available():
        pytest.skip("no low-latency kernels")
    (res,) = run_multiprocess("lifecycle_workers:failed_setups_leave_nothing", 1,
                              platform="gpu", timeout=300, env={"PYTHONPATH": WORKERS_DIR})
    assert res.ok, res.describe()
    for seen in res.result:
        assert seen["raised"] and "pass num_blocks <=" in seen["raised"], res.result
        assert seen["initialized_after"] is False
