"""initialize / shutdown as a long job sees them: many times in one process,
and after a failed initialize. Each returns what it measured; the tests in
test_lifecycle_gpu.py judge it. Nothing here touches JAX at import.
"""

import os
import time

import numpy as np

T, H, K, E = 32, 256, 4, 16


def _mesh():
    import jax

    return jax.make_mesh((jax.device_count(),), ("ep",))


def _setup_kwargs(low_latency):
    kw = dict(backend="cuda", max_tokens_per_rank=T, hidden=H, top_k=K, dtype="float32",
              timeout_s=30)
    if low_latency:
        kw.update(num_experts=E, low_latency=True)
    return kw


def _free_device_bytes():
    from cuda.bindings import runtime as cudart

    err, free, _ = cudart.cudaMemGetInfo()
    assert int(err) == 0, err
    return int(free)


def _check_ops(low_latency):
    """One dispatch (+ combine) against the oracle: the setup still works."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep
    from jax_ep.testing import oracle

    mesh = _mesh()
    n = mesh.devices.size
    xs, idxs, ws = oracle.make_inputs(3, n, T, H, E, K)
    put = lambda per: jax.device_put(np.concatenate(per), NamedSharding(mesh, P("ep")))
    smap = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    if low_latency:
        got = smap(lambda x, i: jax_ep.low_latency_dispatch(
            x, i, num_experts=E, axis_name="ep", max_tokens_per_rank=T)[1])(put(xs), put(idxs))
        exp = oracle.low_latency_dispatch(xs, idxs, E, T)
        np.testing.assert_array_equal(np.asarray(got), exp[0]["recv_count"])
    else:
        got = smap(lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=E, axis_name="ep")[0])(
            put(xs), put(idxs), put(ws))
        exp = oracle.dispatch(xs, idxs, ws, num_experts=E)
        np.testing.assert_array_equal(np.asarray(got), exp[0]["recv_x"])


def repeated_setup(times="100", low_latency="0"):
    """initialize + shutdown `times` times; device memory and open files before and after."""
    import jax_ep

    ll = low_latency == "1"
    kw = _setup_kwargs(ll)
    jax_ep.initialize(_mesh(), axis_name="ep", **kw)  # the first one loads libraries, contexts
    jax_ep.shutdown()
    free0, fds0 = _free_device_bytes(), len(os.listdir("/proc/self/fd"))
    start = time.time()
    for _ in range(int(times)):
        jax_ep.initialize(_mesh(), axis_name="ep", **kw)
        jax_ep.shutdown()
    seconds = time.time() - start
    free1, fds1 = _free_device_bytes(), len(os.listdir("/proc/self/fd"))
    jax_ep.initialize(_mesh(), axis_name="ep", **kw)
    _check_ops(ll)
    jax_ep.shutdown()
    return {"times": int(times), "leaked_bytes": free0 - free1, "new_fds": fds1 - fds0,
            "seconds": seconds}


def failed_setups_leave_nothing():
    """A grid too large for co-residency fails initialize (after allocating), for the
    intranode and the low-latency kernels; initialize then works as if nothing happened."""
    import jax_ep
    from jax_ep.cuda import extension

    seen = []
    for ll, blocks in ((False, 60000), (True, None)):
        kw = _setup_kwargs(ll)
        if blocks is None:  # just past what the low-latency kernels can keep resident
            jax_ep.initialize(_mesh(), axis_name="ep", **kw)
            room = extension.nvshmem_module().nvshmem_ll_info()["max_coresident_blocks"]
            jax_ep.shutdown()
            blocks = room + 1
        try:
            jax_ep.initialize(_mesh(), axis_name="ep", num_blocks=blocks, **kw)
            seen.append({"raised": None})
        except ValueError as err:
            seen.append({"raised": str(err), "initialized_after": jax_ep.is_initialized()})
        jax_ep.shutdown()
        jax_ep.initialize(_mesh(), axis_name="ep", **kw)
        _check_ops(ll)
        jax_ep.shutdown()
    return seen
