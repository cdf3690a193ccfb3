"""low_latency_dispatch / low_latency_combine on 8 CPU devices against the numpy oracle."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_ep
from jax_ep.testing import oracle
from ep_harness import as_dtype, ep_mesh, rank, run_ep

R, T, H, K, E, M = 8, 12, 256, 4, 16, 16


def inputs(seed, **kw):
    xs, idxs, ws = oracle.make_inputs(seed, R, T, H, E, K, **kw)
    return as_dtype(xs, ml_dtypes.bfloat16), idxs, ws


def ll_fn(use_fp8=False):
    def fn(x, idx, w):
        recv_x, count, h = jax_ep.low_latency_dispatch(
            x, idx, num_experts=E, axis_name="ep", max_tokens_per_rank=M, use_fp8=use_fp8,
            backend="reference")
        y = recv_x
        if use_fp8:
            y = (recv_x[0].astype(jnp.float32) * jnp.repeat(recv_x[1], 128, axis=-1))
        y = (y.astype(jnp.float32) * 2.0 - 1.0).astype(jnp.bfloat16)
        out = jax_ep.low_latency_combine(y, idx, w, h, backend="reference")
        return dict(recv_x=recv_x, count=count, invalid=h.num_invalid_experts, y=y, out=out)
    return fn


@pytest.mark.parametrize("kw", [{}, dict(none_prob=0.15, invalid_prob=0.1, duplicate_prob=0.25)],
                         ids=["plain", "invalid+duplicates"])
def test_low_latency_bf16_matches_oracle(kw):
    xs, idxs, ws = inputs(11, **kw)
    got = run_ep(ll_fn(), xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M)
    ys = [rank(got, r)["y"] for r in range(R)]
    exp_out = oracle.low_latency_combine(ys, idxs, ws, E, M)
    for r in range(R):
        g = rank(got, r)
        np.testing.assert_array_equal(g["recv_x"], exp[r]["recv_x"])
        np.testing.assert_array_equal(g["count"], exp[r]["recv_count"])
        assert int(g["invalid"]) == exp[r]["num_invalid_experts"]
        # y is derived from recv_x by the same elementwise map in both worlds.
        exp_y = (exp[r]["recv_x"].astype(np.float32) * 2 - 1).astype(ml_dtypes.bfloat16)
        valid = np.arange(R * M)[None, :] < exp[r]["recv_count"][:, None]
        np.testing.assert_array_equal(g["y"][valid], exp_y[valid])
        np.testing.assert_array_equal(g["out"], exp_out[r])


def test_low_latency_fp8_matches_oracle_after_dequantisation():
    xs, idxs, ws = inputs(12, none_prob=0.1)
    got = run_ep(ll_fn(use_fp8=True), xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M, use_fp8=True)
    ref = oracle.low_latency_dispatch(xs, idxs, E, M)
    for r in range(R):
        q, s = rank(got, r)["recv_x"]
        eq, es = exp[r]["recv_x"]
        np.testing.assert_array_equal(s, es)
        np.testing.assert_array_equal(np.asarray(q).view(np.uint8), eq.view(np.uint8))
        # Stated tolerance: e4m3 keeps 3 mantissa bits -> relative error <= 2^-4 of the block amax.
        deq = oracle.fp8_dequantize(q, s)
        x_ref = ref[r]["recv_x"].astype(np.float32)
        amax = np.repeat(s * 448.0, 128, axis=-1)
        assert np.all(np.abs(deq - x_ref) <= amax * 2.0**-4 + 1e-6)


def test_fp8_cast_of_nan_and_inf_follows_the_oracle():
    """A NaN stays in its own channel (amax ignores it, as fmaxf in the kernels);
    an infinity makes its block's scale infinite."""
    xs, idxs, ws = inputs(14)
    xs = [np.array(x) for x in xs]
    for r, x in enumerate(xs):
        x[r % T, 5] = np.nan           # a NaN beside finite channels of block 0
        x[(r + 1) % T, 128:256] = np.nan  # a whole block of NaN
        x[(r + 2) % T, 130] = np.inf   # an infinity in block 1
    got = run_ep(ll_fn(use_fp8=True), xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M, use_fp8=True)
    for r in range(R):
        q, s = rank(got, r)["recv_x"]
        eq, es = exp[r]["recv_x"]
        np.testing.assert_array_equal(s, es)
        np.testing.assert_array_equal(np.asarray(q).astype(np.float32), eq.astype(np.float32))
    assert any(np.isnan(rank(got, r)["recv_x"][0].astype(np.float32)).any() for r in range(R))


def test_low_latency_rejects_too_many_tokens():
    xs, idxs, ws = inputs(13)
    def fn(x, idx, w):
        return jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                           max_tokens_per_rank=T - 1)[1]
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        run_ep(fn, xs, idxs, ws, mesh=ep_mesh(R))


def test_low_latency_repeated_calls_with_changing_routing():
    fn = ll_fn()
    for seed in (20, 21, 22):
        xs, idxs, ws = inputs(seed, none_prob=0.2)
        got = run_ep(fn, xs, idxs, ws, mesh=ep_mesh(R))
        exp = oracle.low_latency_dispatch(xs, idxs, E, M)
        for r in range(R):
            np.testing.assert_array_equal(rank(got, r)["recv_x"], exp[r]["recv_x"])


def test_zero_padding_false_is_accepted_and_keeps_the_valid_rows():
    # The reference zeroes the padding either way; the cuda backend leaves it
    # unspecified with zero_padding=False (checked on the GPU).
    xs, idxs, ws = inputs(25, none_prob=0.1)

    def fn(x, idx, w):
        pending = jax_ep.low_latency_dispatch_send(x, idx, num_experts=E, axis_name="ep",
                                                   max_tokens_per_rank=M, zero_padding=False)
        split_rx = jax_ep.low_latency_dispatch_recv(pending)[0]
        rx, cnt, _ = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                 max_tokens_per_rank=M, zero_padding=False)
        return rx, cnt, split_rx

    got = run_ep(fn, xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M)
    for r in range(R):
        rx, cnt, split_rx = rank(got, r)
        valid = np.arange(R * M)[None, :] < exp[r]["recv_count"][:, None]
        np.testing.assert_array_equal(cnt, exp[r]["recv_count"])
        np.testing.assert_array_equal(rx[valid], exp[r]["recv_x"][valid])
        np.testing.assert_array_equal(split_rx[valid], exp[r]["recv_x"][valid])


def test_split_send_recv_matches_fused_ops_and_refuses_gradients():
    xs, idxs, ws = inputs(30, none_prob=0.1)

    def fused(x, idx, w):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                 max_tokens_per_rank=M)
        return rx, cnt, jax_ep.low_latency_combine(rx, idx, w, h)

    def split(x, idx, w):
        pending = jax_ep.low_latency_dispatch_send(x, idx, num_experts=E, axis_name="ep",
                                                   max_tokens_per_rank=M)
        rx, cnt, h = jax_ep.low_latency_dispatch_recv(pending)
        back = jax_ep.low_latency_combine_send(rx, h)
        return rx, cnt, jax_ep.low_latency_combine_recv(back, idx, w)

    a = run_ep(fused, xs, idxs, ws, mesh=ep_mesh(R))
    b = run_ep(split, xs, idxs, ws, mesh=ep_mesh(R))
    for la, lb in zip(a, b):
        for pa, pb in zip(la, lb):
            np.testing.assert_array_equal(pa, pb)

    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = ep_mesh(R)
    put = lambda per: jax.device_put(np.concatenate(per), NamedSharding(mesh, P("ep")))
    body = jax.shard_map(lambda x, i, w: split(x, i, w)[2].astype(jnp.float32), mesh=mesh,
                         in_specs=P("ep"), out_specs=P("ep"))
    with jax.set_mesh(mesh), pytest.raises(TypeError, match="not differentiable"):
        jax.jit(jax.grad(lambda x: body(x, put(idxs), put(ws)).sum()))(
            put([np.asarray(x, np.float32) for x in xs]))
