"""Hostile routing through every CUDA kernel at one rank, for compute-sanitizer.

    compute-sanitizer --tool memcheck python3 tests/gpu/memcheck_hostile.py

Runs dispatch / combine (intranode) and the low-latency dispatch / combine /
split forms / gradients with: invalid ids (negative, >= E, huge), every
token on one expert, no token routed, and a capacity that overflows; checks
each result against the numpy oracle, so a run that completes with
"ERROR SUMMARY: 0 errors" means nothing was read or written out of bounds
and the counters are right. tests/gpu/test_memcheck_gpu.py runs it.
"""

import os
import sys

import numpy as np

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_ep  # noqa: E402
from jax_ep.testing import oracle  # noqa: E402

T, H, K, E = 48, 256, 4, 16


def routings():
    rng = np.random.default_rng(0)
    base = rng.integers(0, E, (T, K)).astype(np.int32)
    bad = base.copy()
    bad[::3, 0] = -7
    bad[1::3, 1] = E
    bad[2::5, 2] = 2**31 - 1
    return {"invalid ids": bad, "one expert": np.full((T, K), 5, np.int32),
            "none routed": np.full((T, K), -1, np.int32), "random": base}


def main():
    mesh = jax.make_mesh((1,), ("ep",))
    jax_ep.initialize(mesh, axis_name="ep", backend="auto", max_tokens_per_rank=T, hidden=H,
                      top_k=K, num_experts=E, dtype="float32", low_latency=True, timeout_s=60)
    if jax.devices()[0].platform == "gpu":  # the point: the CUDA kernels, not the reference
        info = jax_ep.runtime_info()
        assert info["intranode"] and info["low_latency"], info
    smap = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    rng = np.random.default_rng(1)
    put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, P("ep")))
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = rng.random((T, K)).astype(np.float32)
    xd, wd = put(x), put(w)
    checked = 0
    for name, idx in routings().items():
        for capacity in (None, T // 3):  # the default never overflows; T // 3 does
            def normal(x, i, w, capacity=capacity):
                recv, ridx, rw, h = jax_ep.dispatch(x, i, w, num_experts=E, axis_name="ep",
                                                    capacity=capacity)
                return recv, jax_ep.combine(recv * 2, h), h.num_dropped_tokens[None], \
                    h.num_invalid_experts[None]
            recv, out, dropped, invalid = smap(normal)(xd, put(idx), wd)
            exp = oracle.dispatch([x], [idx], [w], num_experts=E, capacity=capacity)[0]
            np.testing.assert_array_equal(np.asarray(recv), exp["recv_x"], err_msg=name)
            assert int(dropped[0]) == exp["num_dropped_tokens"], name
            assert int(invalid[0]) == exp["num_invalid_experts"], name
            checked += 1

        def ll(x, i, w):
            recv, count, h = jax_ep.low_latency_dispatch(x, i, num_experts=E, axis_name="ep",
                                                         max_tokens_per_rank=T)
            return count, jax_ep.low_latency_combine(recv, i, w, h), h.num_invalid_experts[None]
        count, out, invalid = smap(ll)(xd, put(idx), wd)
        exp = oracle.low_latency_dispatch([x], [idx], E, T)[0]
        np.testing.assert_array_equal(np.asarray(count), exp["recv_count"], err_msg=name)
        assert int(invalid[0]) == exp["num_invalid_experts"], name

        def split(x, i, w):
            recv, count, h = jax_ep.low_latency_dispatch_recv(jax_ep.low_latency_dispatch_send(
                x, i, num_experts=E, axis_name="ep", max_tokens_per_rank=T))
            pending = jax_ep.low_latency_combine_send(recv, h)
            return jax_ep.low_latency_combine_recv(pending, i, w)
        np.testing.assert_array_equal(np.asarray(smap(split)(xd, put(idx), wd)), np.asarray(out),
                                      err_msg=name)

        def local_loss(x, w, i):
            recv, _, h = jax_ep.low_latency_dispatch(x, i, num_experts=E, axis_name="ep",
                                                     max_tokens_per_rank=T)
            return jnp.sum(jax_ep.low_latency_combine(recv * 1.5, i, w, h) ** 2)[None]
        per_rank = jax.shard_map(local_loss, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
        grads = jax.jit(jax.grad(lambda x, w, i: per_rank(x, w, i).sum(), argnums=(0, 1)))(
            xd, wd, put(idx))
        assert all(np.isfinite(np.asarray(g)).all() for g in grads), name
        checked += 3
    jax_ep.shutdown()
    print(f"memcheck_hostile: {checked} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
