"""Lowering a shard_map'd body for CUDA on CPU devices, and finding a custom call in
the text: what the tests in tests/cuda/ that check operands and results share."""

import jax
from jax.sharding import NamedSharding, PartitionSpec as P


def lower_for_cuda(body, num_ranks, *shapes):
    """StableHLO text of jit(shard_map(body)) over `num_ranks` CPU devices, lowered for
    CUDA; shapes are per-rank (shape, dtype) pairs, stacked along the EP axis."""
    mesh = jax.make_mesh((num_ranks,), ("ep",), devices=jax.devices("cpu")[:num_ranks])
    sharded = NamedSharding(mesh, P("ep"))
    args = [jax.ShapeDtypeStruct((num_ranks * s[0],) + tuple(s[1:]), d, sharding=sharded)
            for s, d in shapes]
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def custom_call(text, target):
    """The one line of `text` that calls `target` (asserts there is exactly one)."""
    calls = [line for line in text.splitlines() if f"custom_call @{target}(" in line]
    assert len(calls) == 1, text
    return calls[0]
