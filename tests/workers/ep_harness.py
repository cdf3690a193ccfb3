"""Run a per-shard function over an EP mesh with per-rank numpy inputs.

Tests write per-rank inputs as lists (the oracle's format); this module
stacks them along axis 0, runs the function under jit + shard_map, and splits
every output back into a per-rank list, so results compare directly with
jax_ep.testing.oracle.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def ep_mesh(num_ranks, axis_name="ep"):
    return jax.make_mesh((num_ranks,), (axis_name,), devices=jax.devices()[:num_ranks])


def _stack(per_rank, mesh, spec):
    arr = np.concatenate([np.asarray(a) for a in per_rank], axis=0)
    return jax.device_put(arr, NamedSharding(mesh, spec))


def _stack_tree(per_rank_trees, mesh, spec):
    leaves = [jax.tree.leaves(t) for t in per_rank_trees]
    treedef = jax.tree.structure(per_rank_trees[0])
    stacked = [_stack([l[i] for l in leaves], mesh, spec) for i in range(len(leaves[0]))]
    return jax.tree.unflatten(treedef, stacked)


def _with_rank_axis(tree):
    """Scalars get a leading axis of 1 so every output can be split per rank."""
    return jax.tree.map(lambda a: a[None] if a.ndim == 0 else a, tree)


def run_ep(fn, *per_rank_args, mesh, axis_name="ep", jit=True):
    """fn(*local_args) -> pytree; per_rank_args: lists (one entry per rank) of pytrees."""
    num_ranks = mesh.shape[axis_name]
    spec = P(axis_name)
    args = [_stack_tree(a, mesh, spec) for a in per_rank_args]
    body = jax.shard_map(lambda *a: _with_rank_axis(fn(*a)), mesh=mesh,
                         in_specs=spec, out_specs=spec)
    out = (jax.jit(body) if jit else body)(*args)
    return jax.tree.map(lambda a: np.split(np.asarray(a), num_ranks, axis=0), out)


def rank(per_rank_tree, r):
    """Rank r's piece of a tree of per-rank lists (scalars unwrapped)."""
    def pick(parts):
        p = parts[r]
        return p[0] if p.shape == (1,) else p
    return jax.tree.map(pick, per_rank_tree, is_leaf=lambda x: isinstance(x, list))


def f32(a):
    if isinstance(a, tuple):
        return tuple(f32(b) for b in a)
    return np.asarray(a).astype(np.float32)


def as_dtype(xs, dtype):
    return [np.asarray(jnp.asarray(x).astype(dtype)) for x in xs]
