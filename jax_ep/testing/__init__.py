"""Test helpers for jax_ep: a numpy oracle and a multi-process launcher.

Importing this package does not import jax or the rest of jax_ep's API:

* :mod:`jax_ep.testing.oracle` — the expected global results of every op,
  computed in numpy from all ranks' inputs (docs/design.md §2, §6).
* :mod:`jax_ep.testing.launcher` — run a function in N ``jax.distributed``
  processes (CPU + gloo, or N processes sharing one GPU under CUDA MPS), or
  in place when pytest itself was started once per process by a scheduler.
* :mod:`jax_ep.testing.distributed` — what a worker (or a test started under
  ``srun``) calls to join the job, plus bounded KV-store / barrier helpers.
"""

from . import oracle
from .distributed import (
    barrier,
    cluster_env_present,
    init_distributed_from_env,
    kv_get_bytes,
    kv_set_bytes,
    shutdown_distributed,
)
from .launcher import (
    LaunchError,
    WorkerResult,
    external_launch,
    launch,
    mps_daemon,
    run_multiprocess,
)

__all__ = [
    "oracle",
    "barrier",
    "cluster_env_present",
    "init_distributed_from_env",
    "kv_get_bytes",
    "kv_set_bytes",
    "shutdown_distributed",
    "LaunchError",
    "WorkerResult",
    "external_launch",
    "launch",
    "mps_daemon",
    "run_multiprocess",
]
