"""pytest setup: 8 virtual CPU devices for every in-process test.

Must run before any JAX backend starts, so it lives in conftest.py. Tests that
need processes use jax_ep.testing.launcher, which sets up its own workers.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
