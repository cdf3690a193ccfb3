"""Tests of jax_ep.testing's multi-process launcher (CPU, gloo; a few seconds)."""

import os
import stat
import sys
import textwrap
import time

import pytest

from jax_ep.testing import (
    LaunchError,
    external_launch,
    launch,
    mps_daemon,
    run_multiprocess,
)
from jax_ep.testing import distributed as dist
from jax_ep.testing import launcher

needs_spawn = pytest.mark.skipif(
    external_launch(), reason="tests the spawning launcher itself; skipped under a scheduler")


@pytest.mark.parametrize("procs,local", [(2, 2)])
def test_collectives_two_processes(procs, local):
    # run_multiprocess: spawns here, runs in place under `srun -n 2 pytest`
    results = run_multiprocess("mp_workers:check_collectives", procs,
                               local_devices=local, args=(str(procs), str(local)),
                               timeout=120)
    assert [r.process_id for r in results] == list(range(procs))
    for i, r in enumerate(results):
        assert r.result["process_index"] == i
        assert r.result["local_mesh_positions"] == list(range(i * local, (i + 1) * local))
    # every process sees the same global device list
    assert len({tuple(r.result["device_ids"]) for r in results}) == 1


@needs_spawn
def test_kv_store_round_trip():
    results = launch("mp_workers:kv_round_trip", 2, timeout=60)
    pids = [r.result for r in results]
    assert pids[0] == pids[1] and len(set(pids[0])) == 2


@needs_spawn
def test_env_args_and_result():
    (r,) = launch("mp_workers:env_report", 1, local_devices=3,
                  env={"MY_TEST_VAR": "hello", "NCCL_NVLS_ENABLE": "1"}, timeout=60)
    assert r.ok and r.result["MY_TEST_VAR"] == "hello"
    assert r.result["platform"] == "cpu" and r.result["local"] == 3
    assert r.result["JAX_EP_LOCAL_DEVICES"] == "3"
    # multicast stays off whatever the caller asks
    assert r.result["NCCL_NVLS_ENABLE"] == "0" and r.result["NVSHMEM_DISABLE_NVLS"] == "1"


@needs_spawn
def test_worker_exception_raises_launch_error():
    with pytest.raises(LaunchError) as info:
        launch("mp_workers:raise_on", 2, args=("1",), timeout=60)
    msg = str(info.value)
    assert "worker 1: exit code 1" in msg
    assert "deliberate failure in process 1" in msg and "ValueError" in msg
    assert "worker 0:" not in msg
    r0, r1 = info.value.results
    assert r0.ok and r0.result == "fine"
    assert not r1.ok and [f.process_id for f in info.value.failures] == [1]


@needs_spawn
def test_failure_kills_stuck_peers():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch("mp_workers:fail_or_wait", 2, timeout=60, fail_fast_grace=2)
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert "process 1 gives up" in msg
    assert "worker 0: still running after another worker failed; killed" in msg
    assert info.value.results[0].killed_after_failure


@needs_spawn
def test_timeout_kills_hung_workers():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch("mp_workers:announce_then_sleep", 2, timeout=6)
    assert time.monotonic() - t0 < 25
    msg = str(info.value)
    assert "launch timeout 6 s" in msg
    for i in (0, 1):
        assert f"worker {i}: still running at the launch timeout; killed" in msg
    for r in info.value.results:
        assert r.timed_out and r.returncode == -9
        if "worker function started" in r.stdout:
            # SIGUSR1 made faulthandler dump the stuck stack before the kill
            assert "sleep_forever" in r.stderr


@needs_spawn
def test_bad_target():
    with pytest.raises(LaunchError) as info:
        launch("no_such_module_xyz:f", 1, timeout=60)
    assert "ModuleNotFoundError" in str(info.value)
    with pytest.raises(ValueError):
        launch("no_colon_here", 1)


@needs_spawn
def test_skip_in_worker_skips_test():
    with pytest.raises(pytest.skip.Exception, match="nothing to do here"):
        run_multiprocess("mp_workers:skip_me", 1, timeout=60)


# ------------------------------------------------------------ no spawning

_CLUSTER_VARS = ["SLURM_NTASKS", "SLURM_STEP_ID", "SLURM_STEPID", "OMPI_COMM_WORLD_SIZE",
                 "PMI_SIZE", "JAX_COORDINATOR_ADDRESS", dist.ENV_COORDINATOR]


@pytest.fixture
def clean_cluster_env(monkeypatch):
    for k in _CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_external_launch_detection(clean_cluster_env):
    mp = clean_cluster_env
    assert not external_launch()
    mp.setenv("SLURM_NTASKS", "8")
    assert not external_launch()          # batch script / salloc shell, not a step
    mp.setenv("SLURM_STEP_ID", "0")
    assert external_launch()
    mp.setenv(dist.ENV_COORDINATOR, "127.0.0.1:1")
    assert not external_launch()          # our own worker
    mp.delenv(dist.ENV_COORDINATOR)
    mp.setenv("SLURM_NTASKS", "1")
    assert not external_launch()
    mp.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert external_launch()
    mp.delenv("OMPI_COMM_WORLD_SIZE")
    mp.setenv("PMI_SIZE", "2")
    assert external_launch()
    mp.delenv("PMI_SIZE")
    mp.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert dist.cluster_env_present()


def test_gpu_platform_env():
    env = launcher._platform_env("gpu", 4, 1)
    assert env["CUDA_VISIBLE_DEVICES"] == "0"
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) <= 0.25
    assert env["NVSHMEM_REMOTE_TRANSPORT"] == "none"
    assert env["NVSHMEM_DISABLE_NCCL"] == "1"
    assert env["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"] == "lo"
    assert launcher._ALWAYS_ENV == {"NVSHMEM_DISABLE_NVLS": "1", "NCCL_NVLS_ENABLE": "0"}
    with pytest.raises(ValueError):
        launcher._platform_env("gpu", 2, 2)
    with pytest.raises(ValueError):
        launcher._platform_env("tpu", 2, 1)


_FAKE_MPS = textwrap.dedent("""\
    #!{python}
    import os, sys
    state = os.path.join(os.environ["CUDA_MPS_PIPE_DIRECTORY"], "fake_running")
    log = os.path.join(os.environ["CUDA_MPS_PIPE_DIRECTORY"], "calls")
    with open(log, "a") as f:
        f.write(" ".join(sys.argv[1:]) or sys.stdin.read().strip())
        f.write("\\n")
    if sys.argv[1:] == ["-d"]:
        open(state, "w").close()
        sys.exit(0)
    running = os.path.exists(state)
    if not running:
        print("Cannot find MPS control daemon process", file=sys.stderr)
        sys.exit(1)
    with open(log) as f:
        last = f.read().splitlines()[-1]
    if last == "quit":
        os.remove(state)
    sys.exit(0)
""")


def test_mps_daemon_starts_and_stops_only_its_own(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "nvidia-cuda-mps-control"
    exe.write_text(_FAKE_MPS.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    pipe, logs = tmp_path / "mps", tmp_path / "mpslog"
    calls = pipe / "calls"

    with mps_daemon(str(pipe), str(logs)) as info:
        assert info["started"]
        assert os.environ["CUDA_MPS_PIPE_DIRECTORY"] == str(pipe)
        assert (pipe / "fake_running").exists()
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ
    assert not (pipe / "fake_running").exists()
    assert calls.read_text().split("\n")[:-1] == ["get_server_list", "-d", "get_server_list", "quit"]

    # already running: leave it alone
    (pipe / "fake_running").touch()
    calls.unlink()
    with mps_daemon(str(pipe), str(logs)) as info:
        assert not info["started"]
    assert (pipe / "fake_running").exists()
    assert calls.read_text().split("\n")[:-1] == ["get_server_list"]


# ------------------------------------------------------------ one-GPU host

def _gpu_present() -> bool:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi") or not shutil.which("nvidia-cuda-mps-control"):
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and b"GPU" in out.stdout


@needs_spawn
@pytest.mark.skipif(not _gpu_present(), reason="needs an NVIDIA GPU and CUDA MPS")
@pytest.mark.parametrize("procs", [2, 4])
def test_gpu_processes_share_one_gpu_under_mps(procs):
    # this process must not touch the GPU itself (conftest keeps JAX on CPU)
    with mps_daemon():
        results = launch("mp_workers:gpu_smoke", procs, platform="gpu", timeout=180)
    want = [256.0 ** 3 * (i + 1) ** 2 for i in range(procs)]
    for r in results:
        assert r.result["seen"] == want
        assert float(r.result["mem_fraction"]) <= 0.4
        assert r.result["mps_pipe"]


def test_gpu_layouts_set_the_environment_a_multi_gpu_host_needs():
    from jax_ep.testing import launcher

    shared = launcher._platform_env("gpu", 4, 1)
    assert shared["CUDA_VISIBLE_DEVICES"] == "0" and shared["JAX_PLATFORMS"] == "cuda"
    per = launcher._platform_env("gpu-per-process", 8, 1)
    assert "CUDA_VISIBLE_DEVICES" not in per  # IPC between GPUs needs them all visible
    assert launcher._process_env("gpu-per-process", 3)["JAX_EP_LOCAL_DEVICE_IDS"] == "3"
    assert "JAX_EP_LOCAL_DEVICE_IDS" not in launcher._process_env("gpu", 3)
    with pytest.raises(ValueError, match="platform must be"):
        launcher._platform_env("tpu", 1, 1)
