"""pytest setup: 8 virtual CPU devices for every in-process CPU test.

Must run before any JAX backend starts, so it lives in conftest.py. Tests that
need processes use jax_ep.testing.launcher, which sets up its own workers.
"""

import os
import sys

# CPU suite by default; `JAX_EP_GPU_TESTS=1 python -m pytest tests/gpu` lets JAX
# pick the GPU (tests/gpu skip cleanly where there is none).
if os.environ.get("JAX_EP_GPU_TESTS") == "1":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for peers
else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Worker modules (imported by name in launched processes) and shared helpers.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "workers"))

import jax  # noqa: E402

from jax_ep.testing import external_launch  # noqa: E402

# Under a scheduler (pytest once per process) the job decides the device count.
if not external_launch():
    jax.config.update("jax_num_cpu_devices", 8)
