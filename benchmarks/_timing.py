"""What the benchmarks share: wall-clock timing of jitted calls, per-rank
inputs on a mesh, and handles that cross a shard_map boundary."""

from __future__ import annotations

import time

import numpy as np


def time_per_call(fn, *args, iters, warm_s=0.5, repeats=5):
    """Seconds per call: best of `repeats` runs of `iters` back-to-back calls.

    Warms up for `warm_s` seconds first: an idle GPU needs that long to reach
    its clocks (a 3-call warm-up measured a copy at a fifth of its speed).
    """
    import jax

    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def mesh_of(devices):
    import jax

    return jax.sharding.Mesh(np.asarray(devices), ("ep",))


def putter(mesh):
    """put(list of per-rank numpy arrays) -> a global array sharded over 'ep'."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharding = NamedSharding(mesh, P("ep"))

    def put(per_rank):
        g = np.concatenate([np.asarray(a) for a in per_rank])
        return jax.make_array_from_callback(g.shape, sharding, lambda i: g[i])

    return put


def lift(handle):
    """Scalars of a handle become [1] pieces so it can leave shard_map."""
    import jax

    return jax.tree.map(lambda a: a[None] if a.ndim == 0 else a, handle)


def drop(handle):
    """Undo `lift` inside the next shard_map."""
    import jax

    return jax.tree.map(lambda a: a[0] if a.shape == (1,) else a, handle)
