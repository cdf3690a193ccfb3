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


def fake_low_latency(monkeypatch, num_ranks, **layout):
    """The CUDA low-latency mode as if initialize had set it up with this region
    layout (max_tokens_per_rank, hidden, top_k, num_experts), for tracing only."""
    from jax_ep.cuda import low_latency as ll

    lay = dict(num_ranks=num_ranks, **layout)
    monkeypatch.setattr(ll, "info", lambda: dict(allocated=True, num_ranks=num_ranks, layout=lay))


def lower_loss_grad_for_cuda(body, num_ranks, tokens, hidden, top_k):
    """StableHLO text, lowered for CUDA on CPU devices, of value_and_grad (w.r.t.
    x and w) of sum(shard_map(body)(x, idx, w)), with per-rank x [T, H] f32,
    idx int32 [T, K] and w f32 [T, K]."""
    import jax.numpy as jnp

    mesh = jax.make_mesh((num_ranks,), ("ep",), devices=jax.devices("cpu")[:num_ranks])
    spec = P("ep")
    smapped = jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec)
    loss = lambda x, idx, w: jnp.sum(smapped(x, idx, w))
    sharded = NamedSharding(mesh, spec)
    args = [jax.ShapeDtypeStruct((num_ranks * tokens,) + s, d, sharding=sharded)
            for s, d in (((hidden,), jnp.float32), ((top_k,), jnp.int32),
                         ((top_k,), jnp.float32))]
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
