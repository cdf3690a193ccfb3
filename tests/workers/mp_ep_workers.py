"""Worker functions for tests/test_multiprocess.py: the EP ops across processes.

Each process regenerates every rank's inputs from a seed, runs the ops on the
global mesh and checks the gathered results against the numpy oracle.
Nothing here touches JAX at import time.
"""

import numpy as np

R_LOCAL = 4
T, H, K, E, M = 12, 128, 3, 16, 16


def _setup():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    sharding = NamedSharding(mesh, P("ep"))

    def put(per_rank):
        g = np.concatenate([np.asarray(a) for a in per_rank])
        return jax.make_array_from_callback(g.shape, sharding, lambda i: g[i])

    return n, mesh, put


def _gather(a, n):
    from jax.experimental import multihost_utils

    return np.split(np.asarray(multihost_utils.process_allgather(a, tiled=True)), n)


def ops_against_oracle(seed="0"):
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_ep
    from jax_ep.testing import oracle

    n, mesh, put = _setup()
    xs, idxs, ws = oracle.make_inputs(int(seed), n, T, H, E, K, none_prob=0.1,
                                      invalid_prob=0.05)
    cap = 2 * T  # small enough to overflow on some ranks
    spec = P("ep")

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def normal(x, idx, w):
        rx, ri, rw, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", capacity=cap)
        return rx, ri, rw, h.num_dropped_tokens[None], jax_ep.combine(rx * 2.0, h)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def low_latency(x, idx, w):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                 max_tokens_per_rank=M)
        grx, _, gh = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                 max_tokens_per_rank=M, layout="ragged")
        return (rx, cnt, jax_ep.low_latency_combine(rx, idx, w, h), grx,
                jax_ep.low_latency_combine(grx, idx, w, gh))

    def loss(x, w, idx):
        return jnp.sum(normal(x, idx, w)[4] ** 2)

    args = put(xs), put(idxs), put(ws)
    rx, ri, rw, dropped, comb = (_gather(a, n) for a in normal(*args))
    exp = oracle.dispatch(xs, idxs, ws, E, capacity=cap)
    exp_comb = oracle.combine([2.0 * e["recv_x"] for e in exp], idxs, E, capacity=cap)
    assert sum(e["num_dropped_tokens"] for e in exp) > 0
    for r in range(n):
        np.testing.assert_array_equal(rx[r], exp[r]["recv_x"])
        np.testing.assert_array_equal(ri[r], exp[r]["recv_topk_idx"])
        np.testing.assert_array_equal(rw[r], exp[r]["recv_topk_weights"])
        assert int(dropped[r][0]) == exp[r]["num_dropped_tokens"]
        np.testing.assert_array_equal(comb[r], exp_comb[r])

    # d/dx sum(combine(2 dispatch(x))^2) = combine(2 dispatch(2 out)), via the oracle.
    dx = _gather(jax.jit(jax.grad(loss))(args[0], args[2], args[1]), n)
    back = oracle.dispatch([2.0 * c for c in exp_comb], idxs, ws, E, capacity=cap)
    exp_dx = oracle.combine([2.0 * b["recv_x"] for b in back], idxs, E, capacity=cap)
    for r in range(n):
        np.testing.assert_allclose(dx[r], exp_dx[r], rtol=1e-6)

    lrx, cnt, lout, grx, gout = (_gather(a, n) for a in low_latency(*args))
    lexp = oracle.low_latency_dispatch(xs, idxs, E, M)
    lexp_out = oracle.low_latency_combine([e["recv_x"] for e in lexp], idxs, ws, E, M)
    gexp = oracle.low_latency_dispatch(xs, idxs, E, M, layout="ragged")
    for r in range(n):
        np.testing.assert_array_equal(lrx[r], lexp[r]["recv_x"])
        np.testing.assert_array_equal(cnt[r], lexp[r]["recv_count"])
        np.testing.assert_array_equal(grx[r], gexp[r]["recv_x"])
        # float32 weighted sums: XLA may contract w * y + acc into an FMA.
        np.testing.assert_allclose(lout[r], lexp_out[r], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gout[r], lexp_out[r], rtol=1e-6, atol=1e-6)
    return {"ranks": n, "processes": jax.process_count()}
