"""Run a Python function in N ``jax.distributed`` processes, from pytest.

::

    from jax_ep.testing import launch, run_multiprocess

    results = launch("mp_workers:check_psum", 2, local_devices=2)   # CPU + gloo
    results = run_multiprocess("mp_workers:check_psum", 2, local_devices=2)

Each worker is ``python -m jax_ep.testing._worker TARGET ARGS...`` in its own
session (process group), with ``JAX_EP_COORDINATOR`` / ``JAX_EP_NUM_PROCESSES``
/ ``JAX_EP_PROCESS_ID`` / ``JAX_EP_LOCAL_DEVICES`` / ``JAX_EP_PLATFORM`` and
the platform's settings in its environment; its stdout and stderr go to
temporary files that come back in :class:`WorkerResult`.

Platforms:

``cpu``  ``JAX_PLATFORMS=cpu``, ``local_devices`` CPU devices per process
         (``jax_num_cpu_devices``), gloo collectives.
``gpu``  the one-GPU test host (GPU_HOST.md): every process uses GPU 0
         (``CUDA_VISIBLE_DEVICES=0``, one local device), no preallocation and
         a small memory fraction each, NVLink multicast off, NVSHMEM on one
         host.  XLA collectives (NCCL) do not work between processes sharing
         a GPU: check results against the numpy oracle.  Run under
         :func:`mps_daemon` for useful timings.

Every wait is bounded: the coordinator's init timeout, barrier / KV
timeouts, the shutdown barrier, and ``timeout`` for the whole launch, after
which every still-running worker gets SIGUSR1 (a Python stack dump to its
stderr) and then SIGKILL to its whole process group.  When one worker fails,
the others get ``fail_fast_grace`` seconds to finish before they are killed
the same way (they are usually stuck in a collective waiting for it).

Under a scheduler (``srun -n 8 pytest tests/...``) :func:`run_multiprocess`
runs the target in place instead of spawning, so the same tests run unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import distributed as _dist
from ._protocol import RESULT_MARKER, SKIP_MARKER, resolve_target

__all__ = [
    "LaunchError",
    "WorkerResult",
    "launch",
    "external_launch",
    "run_multiprocess",
    "mps_daemon",
    "free_port",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]

# Set in every process started here, whatever the caller's env says:
# NVLink multicast can put a shared host's GPUs out of service (GPU_HOST.md).
_ALWAYS_ENV = {
    "NVSHMEM_DISABLE_NVLS": "1",
    "NCCL_NVLS_ENABLE": "0",
}


@dataclass
class WorkerResult:
    """What one worker did."""
    process_id: int
    returncode: int | None          # negative: killed by that signal
    stdout: str
    stderr: str
    elapsed: float                  # seconds from start to exit (or kill)
    result: Any = None              # the JSON value the function returned
    skipped: str | None = None      # the reason, if the function called pytest.skip
    timed_out: bool = False         # still running at the launch timeout
    killed_after_failure: bool = False  # killed fail_fast_grace after a peer failed
    log_dir: str | None = None      # where the logs were (kept only if keep_logs)

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def describe(self) -> str:
        if self.timed_out:
            how = f"still running at the launch timeout; killed (after {self.elapsed:.1f} s)"
        elif self.killed_after_failure:
            how = "still running after another worker failed; killed"
        elif self.returncode is not None and self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = str(-self.returncode)
            how = f"killed by signal {name}"
        else:
            how = f"exit code {self.returncode}"
        return f"worker {self.process_id}: {how}"


class LaunchError(RuntimeError):
    """Some worker failed, hung or was killed.  ``results`` holds every
    worker's :class:`WorkerResult`; ``failures`` the failing ones."""

    def __init__(self, message: str, results: list[WorkerResult]):
        super().__init__(message)
        self.results = results
        self.failures = [r for r in results if not r.ok]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return "...\n" + text[-max_chars:]


def _python_path(extra: str | None) -> str:
    """The child's PYTHONPATH: the repo root, its tests/ directory, the
    non-installation entries of this process's sys.path (pytest's rootdir
    insertions, say), and whatever was there before."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    entries = []
    if extra:
        entries += extra.split(os.pathsep)
    entries += [str(_REPO_ROOT)]
    if (_REPO_ROOT / "tests").is_dir():
        entries.append(str(_REPO_ROOT / "tests"))
    for p in sys.path:
        p = os.path.realpath(p or os.getcwd())
        if not os.path.isdir(p) or "site-packages" in p or "dist-packages" in p:
            continue
        if any(p == q or p.startswith(q + os.sep) for q in prefixes):
            continue
        entries.append(p)
    entries += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    seen, out = set(), []
    for e in entries:
        if e and e not in seen:
            seen.add(e)
            out.append(e)
    return os.pathsep.join(out)


def _platform_env(platform: str, num_processes: int, local_devices: int) -> dict[str, str]:
    if platform == "cpu":
        return {
            "JAX_PLATFORMS": "cpu",
            "JAX_NUM_CPU_DEVICES": str(local_devices),
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        }
    one_host_gpu = {
        "JAX_PLATFORMS": "cuda",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "NVSHMEM_REMOTE_TRANSPORT": "none",
        "NVSHMEM_DISABLE_NCCL": "1",
        "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
    }
    if platform == "gpu":
        if local_devices != 1:
            raise ValueError(
                "platform='gpu' runs every process on GPU 0 (one local device "
                f"each); local_devices={local_devices} is not supported")
        return dict(one_host_gpu, CUDA_VISIBLE_DEVICES="0",
                    XLA_PYTHON_CLIENT_MEM_FRACTION=f"{max(0.05, 0.8 / num_processes):.3f}")
    if platform in ("gpu-per-process", "gpu-all"):
        # Every GPU stays visible to every process: CUDA IPC between GPUs needs it.
        return dict(one_host_gpu)
    raise ValueError(f"platform must be 'cpu', 'gpu', 'gpu-per-process' or 'gpu-all', "
                     f"got {platform!r}")


def _process_env(platform: str, process_id: int) -> dict[str, str]:
    env = {_dist.ENV_PROCESS_ID: str(process_id)}
    if platform == "gpu-per-process":  # process i drives GPU i
        env[_dist.ENV_LOCAL_DEVICE_IDS] = str(process_id)
    return env


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill_all(procs, which, dump_stacks: bool) -> None:
    """SIGUSR1 (stack dump) to each worker in ``which``, a moment for the
    dumps, then SIGKILL to each one's process group, and reap them."""
    if not which:
        return
    if dump_stacks and hasattr(signal, "SIGUSR1"):
        for i in which:
            with contextlib.suppress(ProcessLookupError):
                procs[i].send_signal(signal.SIGUSR1)
        time.sleep(1.0)
    for i in which:
        _signal_group(procs[i].pid, signal.SIGKILL)
    for i in which:
        with contextlib.suppress(subprocess.TimeoutExpired):
            procs[i].wait(timeout=10)


def _parse_markers(stdout: str):
    result, skipped = None, None
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            try:
                result = json.loads(line[len(RESULT_MARKER):])
            except json.JSONDecodeError:
                pass
        elif line.startswith(SKIP_MARKER):
            skipped = line[len(SKIP_MARKER):] or "skipped in a worker"
    return result, skipped


def launch(target: str, num_processes: int, *, local_devices: int = 1,
           platform: str = "cpu", timeout: float = 240, env: dict | None = None,
           args: tuple[str, ...] = (), fail_fast_grace: float = 10.0,
           init_timeout: int = 60, tail_chars: int = 3000,
           keep_logs: bool = False, cwd: str | None = None) -> list[WorkerResult]:
    """Runs ``target`` (``"package.module:function"``) in ``num_processes``
    processes joined by ``jax.distributed`` and returns their results in
    process order.

    Raises :class:`LaunchError` (naming every failing worker with its exit
    code or how it was killed, plus the tail of its output) when any worker
    exits nonzero, is killed, or is still running after ``timeout`` seconds.
    ``env`` adds to / overrides the child environment (except the JAX_EP_*
    coordination variables and the NVLink-multicast switches).  ``args`` are
    passed to the function as strings.  ``init_timeout`` bounds
    ``jax.distributed.initialize``; ``fail_fast_grace`` is how long the others
    may run on once one worker failed.

    ``platform``: ``"cpu"`` (gloo, ``local_devices`` virtual devices each);
    ``"gpu"`` (every process on GPU 0, sharing it under CUDA MPS: the one-GPU
    test host); ``"gpu-per-process"`` (process i drives GPU i, all GPUs stay
    visible for CUDA IPC: the usual multi-GPU launch); ``"gpu-all"`` (each
    process owns every local GPU; use one process).
    """
    if ":" not in target:
        raise ValueError(f"target must look like 'package.module:function', got {target!r}")
    if num_processes < 1:
        raise ValueError("num_processes must be >= 1")
    if local_devices < 1:
        raise ValueError("local_devices must be >= 1")

    child_env = dict(os.environ)
    child_env.update(_platform_env(platform, num_processes, local_devices))
    user_env = {k: str(v) for k, v in (env or {}).items()}
    child_env.update(user_env)
    child_env["PYTHONPATH"] = _python_path(user_env.get("PYTHONPATH"))
    child_env.update(_ALWAYS_ENV)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    coordinator = f"127.0.0.1:{free_port()}"
    child_env.update({
        _dist.ENV_COORDINATOR: coordinator,
        _dist.ENV_NUM_PROCESSES: str(num_processes),
        _dist.ENV_LOCAL_DEVICES: str(local_devices),
        _dist.ENV_PLATFORM: platform,
        _dist.ENV_INIT_TIMEOUT: str(int(init_timeout)),
    })
    # the shutdown barrier waits for the slowest worker; the launch timeout
    # bounds it anyway
    child_env.setdefault(_dist.ENV_SHUTDOWN_TIMEOUT, str(int(max(10, timeout))))

    log_dir = tempfile.mkdtemp(prefix="jax_ep_launch_")
    procs: list[subprocess.Popen] = []
    files = []
    cmd = [sys.executable, "-m", "jax_ep.testing._worker", target, *map(str, args)]
    start = time.monotonic()
    ended = [None] * num_processes
    timed_out: set[int] = set()
    killed_after_failure: set[int] = set()
    try:
        for i in range(num_processes):
            out = open(os.path.join(log_dir, f"worker{i}.stdout"), "wb")
            err = open(os.path.join(log_dir, f"worker{i}.stderr"), "wb")
            files += [out, err]
            procs.append(subprocess.Popen(
                cmd, env=dict(child_env, **_process_env(platform, i)),
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True, cwd=cwd))
        first_failure = None
        while True:
            now = time.monotonic()
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = now - start
                    if p.returncode != 0 and first_failure is None:
                        first_failure = now
            running = [i for i in range(num_processes) if ended[i] is None]
            if not running:
                break
            if now - start >= timeout:
                timed_out.update(running)
                _kill_all(procs, running, dump_stacks=True)
                break
            if first_failure is not None and now - first_failure >= fail_fast_grace:
                killed_after_failure.update(running)
                _kill_all(procs, running, dump_stacks=True)
                break
            time.sleep(0.05)
    finally:
        # on any way out (KeyboardInterrupt included) leave nothing running
        leftover = [i for i, p in enumerate(procs) if p.poll() is None]
        _kill_all(procs, leftover, dump_stacks=False)
        for f in files:
            f.close()

    results = []
    for i, p in enumerate(procs):
        def read(kind):
            with open(os.path.join(log_dir, f"worker{i}.{kind}"), "rb") as f:
                return f.read().decode("utf-8", errors="replace")
        stdout, stderr = read("stdout"), read("stderr")
        result, skipped = _parse_markers(stdout)
        elapsed = ended[i] if ended[i] is not None else time.monotonic() - start
        results.append(WorkerResult(
            process_id=i, returncode=p.returncode, stdout=stdout, stderr=stderr,
            elapsed=elapsed, result=result, skipped=skipped,
            timed_out=i in timed_out, killed_after_failure=i in killed_after_failure,
            log_dir=log_dir if keep_logs else None))
    if not keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)

    failures = [r for r in results if not r.ok]
    if failures:
        head = (f"{len(failures)} of {num_processes} workers of {target} failed"
                + (f" (launch timeout {timeout:g} s)" if timed_out else ""))
        parts = [head + ":"]
        parts += ["  " + r.describe() for r in failures]
        # real failures first, then the ones killed because of them
        order = sorted(failures, key=lambda r: (r.killed_after_failure, r.process_id))
        for r in order:
            parts.append(f"\n----- {r.describe()} -----")
            if r.stdout.strip():
                parts.append("[stdout]\n" + _tail(r.stdout.rstrip(), tail_chars))
            if r.stderr.strip():
                parts.append("[stderr]\n" + _tail(r.stderr.rstrip(), tail_chars))
        raise LaunchError("\n".join(parts), results)
    return results


# --------------------------------------------------------------------------
# in-place mode under a scheduler
# --------------------------------------------------------------------------

def external_launch() -> bool:
    """True when this process was started by a scheduler as one of several
    (``srun -n 8 pytest ...``, ``mpirun``...), so tests should run their
    multi-process targets in place rather than spawn workers.  False inside
    workers started by :func:`launch`."""
    return (not os.environ.get(_dist.ENV_COORDINATOR)) and _dist.cluster_env_present()


_call_counter = itertools.count()


def _skip(reason: str):
    try:
        import pytest
    except ImportError:  # pragma: no cover - only without pytest
        import unittest
        raise unittest.SkipTest(reason)
    pytest.skip(reason)


def run_multiprocess(target: str, num_processes: int, **kw) -> list[WorkerResult]:
    """:func:`launch` the target, or, under a scheduler
    (:func:`external_launch`), call it in this process.

    In place: joins the job (:func:`init_distributed_from_env`), skips the
    test unless ``jax.process_count() == num_processes`` (and, when
    ``local_devices`` is passed, ``jax.local_device_count()`` equals it),
    calls the target with ``args`` (exceptions propagate), then gathers every
    process's JSON result through the KV store so the return value has the
    same shape as :func:`launch`'s (stdout / stderr empty).  The platform is
    whatever the scheduler gave.  In launch mode, a worker that called
    ``pytest.skip`` skips the test.
    """
    if not external_launch():
        results = launch(target, num_processes, **kw)
        reasons = [r.skipped for r in results if r.skipped]
        if reasons:
            _skip(reasons[0])
        return results

    call_id = next(_call_counter)
    process_id, count = _dist.init_distributed_from_env()
    if count != num_processes:
        _skip(f"{target} needs {num_processes} processes; this job "
              f"(started by a scheduler) has {count}")
    if "local_devices" in kw:
        import jax

        if jax.local_device_count() != kw["local_devices"]:
            _skip(f"{target} needs {kw['local_devices']} local devices per "
                  f"process; this process has {jax.local_device_count()}")
    fn = resolve_target(target)
    t0 = time.monotonic()
    value = fn(*map(str, kw.get("args", ())))
    elapsed = time.monotonic() - t0
    try:
        payload = json.dumps(value)
    except (TypeError, ValueError):
        payload = "null"
    timeout = float(kw.get("timeout", 240))
    key = f"jax_ep/run_multiprocess/{call_id}/{target}"
    _dist.kv_set_bytes(f"{key}/{process_id}", payload.encode())
    results = []
    for i in range(count):
        raw = _dist.kv_get_bytes(f"{key}/{i}", timeout=timeout)
        results.append(WorkerResult(
            process_id=i, returncode=0, stdout="", stderr="",
            elapsed=elapsed if i == process_id else 0.0,
            result=json.loads(raw.decode())))
    return results


# --------------------------------------------------------------------------
# CUDA MPS
# --------------------------------------------------------------------------

def _mps_query(exe: str, env: dict, timeout: float) -> bool:
    """True when an MPS control daemon answers on env's pipe directory."""
    try:
        p = subprocess.run([exe], input=b"get_server_list\n", env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(
            f"{exe} did not answer within {timeout:g} s; is an MPS daemon "
            "stuck?") from None
    return p.returncode == 0


@contextlib.contextmanager
def mps_daemon(pipe_dir: str | None = None, log_dir: str | None = None,
               timeout: float = 30.0):
    """Makes sure a CUDA MPS control daemon runs for the duration (GPU_HOST.md
    fact 4); stops it afterwards only if this call started it.

    Sets ``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY`` (defaults
    ``/tmp/mps`` and ``/tmp/mpslog``, or what the environment already says)
    in ``os.environ`` while active, so workers started by :func:`launch`
    connect to it.  The process using this must not have created a CUDA
    context itself before the daemon started.  Yields a dict with the two
    directories and ``started`` (bool).
    """
    pipe = pipe_dir or os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or "/tmp/mps"
    logs = log_dir or os.environ.get("CUDA_MPS_LOG_DIRECTORY") or "/tmp/mpslog"
    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise RuntimeError("nvidia-cuda-mps-control is not on the PATH")
    os.makedirs(pipe, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    mps_env = {"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": logs}
    env = dict(os.environ, **mps_env)

    started = False
    if not _mps_query(exe, env, timeout):
        p = subprocess.run([exe, "-d"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"'{exe} -d' failed ({p.returncode}): "
                               f"{p.stdout.decode(errors='replace')}")
        started = True
        deadline = time.monotonic() + timeout
        while not _mps_query(exe, env, timeout):
            if time.monotonic() > deadline:
                raise RuntimeError(f"MPS daemon did not come up within {timeout:g} s")
            time.sleep(0.1)

    saved = {k: os.environ.get(k) for k in mps_env}
    os.environ.update(mps_env)
    try:
        yield dict(mps_env, started=started)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([exe], input=b"quit\n", env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=timeout)
