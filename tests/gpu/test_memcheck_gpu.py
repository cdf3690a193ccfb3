"""compute-sanitizer memcheck over hostile routing at one rank (memcheck_hostile.py):
nothing read or written out of bounds by any kernel, the results right."""

import os
import shutil
import subprocess
import sys

import pytest

from jax_ep.cuda import extension

from gpu_env import gpu_present

pytestmark = [
    pytest.mark.skipif(not gpu_present(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not extension.nvshmem_available(), reason="needs the CUDA kernels"),
    pytest.mark.skipif(shutil.which("compute-sanitizer") is None,
                       reason="compute-sanitizer is not on PATH"),
]


def test_hostile_routing_under_memcheck():
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memcheck_hostile.py")
    env = dict(os.environ, NVSHMEM_DISABLE_NVLS="1", NVSHMEM_REMOTE_TRANSPORT="none",
               NVSHMEM_DISABLE_NCCL="1", NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME="lo")
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run(["compute-sanitizer", "--tool", "memcheck", sys.executable, script],
                          capture_output=True, text=True, timeout=900, env=env)
    out = proc.stdout + proc.stderr
    assert "memcheck_hostile:" in out and "checks passed" in out, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
