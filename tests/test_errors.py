"""Bad input raises at trace time with a message naming the argument and the fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_ep
from ep_harness import ep_mesh

R, T, H, K, E = 4, 8, 128, 2, 8


def trace(fn, *shapes_dtypes, ranks=R):
    """Trace fn under shard_map on an R-device mesh with global abstract inputs."""
    mesh = ep_mesh(ranks)
    args = [jax.ShapeDtypeStruct((ranks * s[0],) + tuple(s[1:]), d,
                                 sharding=jax.NamedSharding(mesh, P("ep")))
            for s, d in shapes_dtypes]
    body = jax.shard_map(fn, mesh=mesh, in_specs=P("ep"), out_specs=P())
    return jax.jit(body).trace(*args)


def disp(**kw):
    def fn(x, idx, w):
        args = dict(num_experts=E, axis_name="ep")
        args.update(kw)
        jax_ep.dispatch(x, idx, w, **args)
        return jnp.zeros(())
    return fn


GOOD = [((T, H), jnp.bfloat16), ((T, K), jnp.int32), ((T, K), jnp.float32)]


def with_arg(i, shape, dtype):
    args = list(GOOD)
    args[i] = (shape, dtype)
    return args


@pytest.mark.parametrize("kw,args,match", [
    (dict(num_experts=6), GOOD, "num_experts=6 is not divisible by the EP size 4"),
    ({}, with_arg(1, (T + 1, K), jnp.int32), "topk_idx has 9 tokens but x has 8"),
    ({}, with_arg(2, (T, K + 1), jnp.float32), "topk_weights has shape"),
    ({}, with_arg(1, (T, 33), jnp.int32), "top_k"),
    ({}, with_arg(0, (T, H), jnp.int8), "supported: bfloat16"),
    ({}, with_arg(0, (T, 102), jnp.float32), "not aligned"),
    ({}, with_arg(1, (T, K), jnp.float32), "integer expert ids"),
    (dict(capacity=0), GOOD, "capacity must be a positive"),
    (dict(capacity=3.5), GOOD, "capacity must be a positive"),
    (dict(axis_name="tp"), GOOD, "axis_name='tp' is not a mesh axis"),
], ids=["experts", "tokens", "weights-shape", "topk", "dtype", "hidden", "idx-dtype",
        "capacity0", "capacity-float", "axis"])
def test_dispatch_bad_input(kw, args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        trace(disp(**kw), *args)


def test_fp8_scale_shape_is_checked():
    def fn(q, s, idx, w):
        jax_ep.dispatch((q, s), idx, w, num_experts=E, axis_name="ep")
        return jnp.zeros(())
    with pytest.raises(ValueError, match="FP8 scales must be float32"):
        trace(fn, ((T, H), jnp.float8_e4m3fn), ((T, 2), jnp.float32), *GOOD[1:])


def test_fp8_hidden_must_be_multiple_of_128():
    def fn(q, s, idx, w):
        jax_ep.dispatch((q, s), idx, w, num_experts=E, axis_name="ep")
        return jnp.zeros(())
    with pytest.raises(ValueError, match="multiple of 128"):
        trace(fn, ((T, 64), jnp.float8_e4m3fn), ((T, 1), jnp.float32), *GOOD[1:])


def test_called_outside_shard_map():
    x = jnp.zeros((T, H), jnp.bfloat16)
    idx = jnp.zeros((T, K), jnp.int32)
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        jax_ep.dispatch(x, idx, jnp.zeros((T, K)), num_experts=E, axis_name="ep")
    with pytest.raises(ValueError, match="inside jax.shard_map"):
        jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep", max_tokens_per_rank=T)


def test_combine_checks_rows_and_handle():
    def fn(x, idx, w):
        rx, _, _, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", capacity=5)
        jax_ep.combine(rx[:4], h)
        return jnp.zeros(())
    with pytest.raises(ValueError, match=r"y must be \[5, 'hidden'\]"):
        trace(fn, *GOOD)

    def fn2(x, idx, w):
        jax_ep.combine(x, {"not": "a handle"})
        return jnp.zeros(())
    with pytest.raises(TypeError, match="DispatchHandle"):
        trace(fn2, *GOOD)


def test_low_latency_bad_input():
    def fn(x, idx, w):
        jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                    max_tokens_per_rank=T, use_fp8=True)
        return jnp.zeros(())
    with pytest.raises(ValueError, match="use_fp8=True needs hidden % 128"):
        trace(fn, ((T, 64), jnp.bfloat16), *GOOD[1:])

    def fn2(x, idx, w):
        _, _, h = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                              max_tokens_per_rank=T)
        jax_ep.low_latency_combine(jnp.zeros((2, R * T, H), jnp.bfloat16), idx[:, :1], w, h)
        return jnp.zeros(())
    with pytest.raises(ValueError, match="pass the same routing"):
        trace(fn2, *GOOD)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        trace(disp(backend="nccl"), *GOOD)


def test_cuda_backend_that_cannot_run_says_why():
    """On CPU (no GPU buffers set up) an explicit backend='cuda' explains itself."""
    with pytest.raises(NotImplementedError, match="backend='cuda' is not available: .*"
                       "(built without nvcc|not part of this build|initialize)"):
        trace(disp(backend="cuda"), *GOOD)


def test_layout_checks():
    with pytest.raises(ValueError, match="num_experts=10 is not divisible"):
        jax_ep.get_dispatch_layout(np.zeros((4, 2), np.int32), num_experts=10, num_ranks=4)
    with pytest.raises(ValueError, match="num_ranks must be a positive int"):
        jax_ep.get_dispatch_layout(np.zeros((4, 2), np.int32), num_experts=8, num_ranks=0)
