"""Joining a multi-process JAX job from the environment, with bounded waits.

Used by the launcher's worker (``python -m jax_ep.testing._worker``) and by
tests that run under a scheduler (``srun -n 8 pytest ...``).  jax is imported
lazily, so importing this module does not initialise any backend.

Environment read by :func:`init_distributed_from_env`:

``JAX_EP_COORDINATOR``       ``host:port`` of the coordination service (set by
                             :func:`jax_ep.testing.launch`); when set, these
                             are read too:
``JAX_EP_NUM_PROCESSES``     number of processes
``JAX_EP_PROCESS_ID``        this process's id
``JAX_EP_LOCAL_DEVICES``     devices per process (CPU: ``jax_num_cpu_devices``)
``JAX_EP_PLATFORM``          ``cpu`` (default) or ``gpu``
``JAX_EP_INIT_TIMEOUT``      seconds to wait for all processes to join (60)
``JAX_EP_HEARTBEAT_TIMEOUT`` seconds before a silent peer counts as dead (30)
``JAX_EP_SHUTDOWN_TIMEOUT``  seconds the shutdown barrier waits (120; the
                             launcher sets its own timeout)

Without ``JAX_EP_COORDINATOR``, a scheduler is recognised by
:func:`cluster_env_present` and ``jax.distributed.initialize()`` auto-detects
the rest; otherwise the process runs alone (a no-op).
"""

from __future__ import annotations

import os
import threading

ENV_COORDINATOR = "JAX_EP_COORDINATOR"
ENV_NUM_PROCESSES = "JAX_EP_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_EP_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAX_EP_LOCAL_DEVICES"
ENV_PLATFORM = "JAX_EP_PLATFORM"
ENV_LOCAL_DEVICE_IDS = "JAX_EP_LOCAL_DEVICE_IDS"
ENV_INIT_TIMEOUT = "JAX_EP_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JAX_EP_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "JAX_EP_SHUTDOWN_TIMEOUT"

DEFAULT_INIT_TIMEOUT = 60
DEFAULT_HEARTBEAT_TIMEOUT = 30
DEFAULT_SHUTDOWN_TIMEOUT = 120

__all__ = [
    "cluster_env_present",
    "init_distributed_from_env",
    "shutdown_distributed",
    "barrier",
    "kv_set_bytes",
    "kv_get_bytes",
]

# (process_id, num_processes) once init_distributed_from_env has run
_joined: tuple[int, int] | None = None
_lock = threading.Lock()


def _int_env(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name, "").strip()
    if not v:
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def _gt1(name: str) -> bool:
    try:
        return int(os.environ.get(name, "0")) > 1
    except ValueError:
        return False


def cluster_env_present() -> bool:
    """True when a scheduler started this process as one of several.

    Recognised: a SLURM job step with more than one task (``SLURM_NTASKS``
    > 1 *and* ``SLURM_STEP_ID`` set, i.e. inside ``srun``, not in the batch
    script itself), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1), a PMI launcher
    (``PMI_SIZE`` > 1), or an explicit ``JAX_COORDINATOR_ADDRESS``.
    Processes started by :func:`jax_ep.testing.launch` (``JAX_EP_COORDINATOR``
    set) are not "external" even if they inherit a scheduler's variables;
    :func:`jax_ep.testing.external_launch` checks that.
    """
    slurm = _gt1("SLURM_NTASKS") and (
        "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ)
    return (slurm or _gt1("OMPI_COMM_WORLD_SIZE") or _gt1("PMI_SIZE")
            or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))


def _set_config(name: str, value) -> None:
    import jax
    from jax._src import xla_bridge

    if getattr(jax.config, name) == value:
        return
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            f"init_distributed_from_env: cannot set {name}={value!r}, a JAX "
            "backend is already initialised; call it before any JAX "
            "computation (and do not touch JAX at import time of worker "
            "modules)")
    jax.config.update(name, value)


def _configure_cpu(local_devices: int | None) -> None:
    _set_config("jax_cpu_collectives_implementation", "gloo")
    if local_devices is not None:
        _set_config("jax_num_cpu_devices", int(local_devices))


def init_distributed_from_env() -> tuple[int, int]:
    """Joins the multi-process job described by the environment.

    Returns ``(process_id, num_processes)``; ``(0, 1)`` when there is no job
    to join.  Idempotent: later calls return the first answer.  Must run
    before any JAX computation in the process (platform options such as
    ``jax_num_cpu_devices`` can only be set before a backend exists).
    """
    global _joined
    with _lock:
        if _joined is not None:
            return _joined
        import jax
        from jax._src import distributed as jax_distributed

        gs = jax_distributed.global_state
        if gs.client is not None:          # someone already called initialize
            _joined = (int(gs.process_id), int(gs.num_processes))
            return _joined

        init_timeout = _int_env(ENV_INIT_TIMEOUT, DEFAULT_INIT_TIMEOUT)
        heartbeat = _int_env(ENV_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT)
        shutdown_timeout = _int_env(ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT)

        coordinator = os.environ.get(ENV_COORDINATOR)
        if coordinator:
            num_processes = _int_env(ENV_NUM_PROCESSES)
            process_id = _int_env(ENV_PROCESS_ID)
            if num_processes is None or process_id is None:
                raise RuntimeError(
                    f"{ENV_COORDINATOR} is set but {ENV_NUM_PROCESSES} / "
                    f"{ENV_PROCESS_ID} are not")
            platform = os.environ.get(ENV_PLATFORM, "cpu")
            local_devices = _int_env(ENV_LOCAL_DEVICES, 1)
            if platform == "cpu":
                _configure_cpu(local_devices)
            device_ids = os.environ.get(ENV_LOCAL_DEVICE_IDS)
            jax.distributed.initialize(
                coordinator,
                num_processes=num_processes,
                process_id=process_id,
                # everything is given; never let a scheduler's variables
                # (inherited from a SLURM allocation, say) override it
                cluster_detection_method="deactivate",
                initialization_timeout=init_timeout,
                heartbeat_timeout_seconds=heartbeat,
                shutdown_timeout_seconds=shutdown_timeout,
                coordinator_bind_address=coordinator,
                local_device_ids=([int(d) for d in device_ids.split(",")]
                                  if device_ids else None),
            )
            _joined = (process_id, num_processes)
        elif cluster_env_present():
            if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
                _configure_cpu(None)     # JAX_NUM_CPU_DEVICES, if set, applies
            kw = dict(initialization_timeout=init_timeout,
                      heartbeat_timeout_seconds=heartbeat,
                      shutdown_timeout_seconds=shutdown_timeout)
            if os.environ.get("JAX_COORDINATOR_ADDRESS"):
                n = _int_env("JAX_NUM_PROCESSES")
                i = _int_env("JAX_PROCESS_ID")
                if n is not None and i is not None:
                    kw.update(num_processes=n, process_id=i)
            elif (_gt1("PMI_SIZE") and not _gt1("OMPI_COMM_WORLD_SIZE")
                  and "SLURM_STEP_ID" not in os.environ
                  and "SLURM_STEPID" not in os.environ):
                kw.update(cluster_detection_method="mpi4py")   # opt-in in jax
            jax.distributed.initialize(**kw)
            _joined = (int(gs.process_id), int(gs.num_processes))
        else:
            _joined = (0, 1)
        return _joined


def shutdown_distributed(timeout: float | None = None) -> bool:
    """``jax.distributed.shutdown()`` with a time limit.

    Shutdown is a barrier over all processes; if a peer never arrives it can
    block for the service's shutdown timeout or longer.  Runs it in a daemon
    thread and gives up after ``timeout`` seconds (default: the shutdown
    timeout + 10).  Returns True when it finished (or nothing was running).
    """
    global _joined
    import jax

    if timeout is None:
        timeout = _int_env(ENV_SHUTDOWN_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT) + 10
    errors = []

    def _run():
        try:
            jax.distributed.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=_run, name="jax_ep-shutdown", daemon=True)
    th.start()
    th.join(timeout)
    with _lock:
        _joined = None
    if th.is_alive():
        return False
    if errors:
        raise errors[0]
    return True


# The KV store adapter lives in the package proper (initialize uses it too).
from jax_ep._kvstore import barrier, kv_get_bytes, kv_set_bytes  # noqa: E402,F401
