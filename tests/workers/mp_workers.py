"""Worker functions for tests/test_launcher.py.

They run inside processes started by jax_ep.testing.launch (or in place
under a scheduler), after jax.distributed is initialised.  Nothing here may
touch JAX at import time.
"""

import json
import os
import time

import numpy as np


def check_collectives(expected_processes="2", expected_local="2"):
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    n_proc, n_local = int(expected_processes), int(expected_local)
    n = n_proc * n_local
    assert jax.process_count() == n_proc, jax.process_count()
    assert jax.local_device_count() == n_local, jax.local_device_count()
    assert jax.device_count() == n, jax.device_count()

    mesh = jax.make_mesh((n,), ("x",))
    spec = P("x")
    # global input g[i, j] = 10 i + j, row i on mesh position i
    g = (10 * np.arange(n)[:, None] + np.arange(n)[None, :]).astype(np.float32)
    x = jax.make_array_from_callback(g.shape, NamedSharding(mesh, spec), lambda idx: g[idx])

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=(spec, spec, spec))
    def f(v):
        s = jax.lax.psum(v, "x")
        a = jax.lax.all_to_all(v, "x", split_axis=1, concat_axis=1, tiled=True)
        i = jax.lax.axis_index("x")
        return s, a, jnp.full((1, 1), i, jnp.int32)

    s, a, i = f(x)
    s = multihost_utils.process_allgather(s, tiled=True)
    a = multihost_utils.process_allgather(a, tiled=True)
    i = multihost_utils.process_allgather(i, tiled=True)
    np.testing.assert_array_equal(s, np.broadcast_to(g.sum(0), (n, n)))
    np.testing.assert_array_equal(a, g.T)      # all_to_all of rows = transpose
    np.testing.assert_array_equal(i[:, 0], np.arange(n))
    return dict(
        process_index=jax.process_index(),
        device_ids=[d.id for d in jax.devices()],
        mesh_device_ids=[d.id for d in mesh.devices.flat],
        local_mesh_positions=[p for p, d in enumerate(mesh.devices.flat)
                              if d.process_index == jax.process_index()],
    )


def kv_round_trip():
    import jax
    from jax_ep.testing import barrier, kv_get_bytes, kv_set_bytes

    me, n = jax.process_index(), jax.process_count()
    kv_set_bytes(f"test/kv/{me}", json.dumps({"from": me, "pid": os.getpid()}).encode())
    got = {i: json.loads(kv_get_bytes(f"test/kv/{i}", timeout=30)) for i in range(n)}
    barrier("test/kv/done", timeout=30)
    assert all(got[i]["from"] == i for i in range(n))
    return [got[i]["pid"] for i in range(n)]


def raise_on(process_id="1"):
    import jax

    if jax.process_index() == int(process_id):
        raise ValueError(f"deliberate failure in process {jax.process_index()}")
    return "fine"


def sleep_forever():
    while True:
        time.sleep(1)


def env_report():
    import jax

    keys = ["JAX_PLATFORMS", "JAX_EP_PLATFORM", "JAX_EP_LOCAL_DEVICES",
            "NVSHMEM_DISABLE_NVLS", "NCCL_NVLS_ENABLE", "MY_TEST_VAR"]
    return dict({k: os.environ.get(k) for k in keys},
                platform=jax.devices()[0].platform,
                local=jax.local_device_count())


def skip_me():
    import pytest

    pytest.skip("nothing to do here")


def announce_then_sleep():
    print("worker function started", flush=True)
    sleep_forever()


def fail_or_wait():
    """Process 1 fails at once; process 0 waits at a barrier it never passes."""
    import jax
    from jax_ep.testing import barrier

    if jax.process_index() == 1:
        raise RuntimeError("process 1 gives up")
    barrier("never-complete", timeout=120)


def gpu_smoke():
    """N processes sharing GPU 0: no XLA collectives, only local work + KV."""
    import jax
    import jax.numpy as jnp
    from jax_ep.testing import barrier, kv_get_bytes, kv_set_bytes

    me, n = jax.process_index(), jax.process_count()
    assert jax.default_backend() == "gpu", jax.default_backend()
    assert jax.local_device_count() == 1 and jax.device_count() == n
    x = jnp.full((256, 256), me + 1, jnp.float32)
    total = float(jax.jit(lambda a: (a @ a).sum())(x))
    assert total == 256 * 256 * 256 * (me + 1) ** 2
    kv_set_bytes(f"gpu_smoke/{me}", str(total).encode())
    seen = [float(kv_get_bytes(f"gpu_smoke/{i}", timeout=60)) for i in range(n)]
    barrier("gpu_smoke/done", timeout=60)
    d = jax.local_devices()[0]
    return dict(seen=seen, device=str(d), global_ids=[g.id for g in jax.devices()],
                mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                mps_pipe=os.environ.get("CUDA_MPS_PIPE_DIRECTORY"))
