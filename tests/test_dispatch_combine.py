"""dispatch / combine / get_dispatch_layout on 8 CPU devices against the numpy oracle."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_ep
from jax_ep.testing import oracle
from ep_harness import as_dtype, ep_mesh, rank, run_ep

R, T, H, K, E = 8, 24, 256, 4, 32
DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]


def inputs(seed=0, **kw):
    return oracle.make_inputs(seed, R, T, H, E, K, **kw)


def dispatch_fn(capacity=None, backend="reference"):
    def fn(x, idx, w):
        recv_x, recv_idx, recv_w, h = jax_ep.dispatch(
            x, idx, w, num_experts=E, axis_name="ep", capacity=capacity, backend=backend)
        return dict(recv_x=recv_x, recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
                    num_recv_tokens=h.num_recv_tokens,
                    num_recv_tokens_per_expert=h.num_recv_tokens_per_expert,
                    num_dropped_tokens=h.num_dropped_tokens,
                    num_invalid_experts=h.num_invalid_experts,
                    combined=jax_ep.combine(_expert_fn(recv_x), h, backend=backend))
    return fn


def _expert_fn(recv_x):
    """A deterministic per-row change so combine sees rows that differ from x."""
    if isinstance(recv_x, tuple):
        recv_x = recv_x[0].astype(jnp.float32) * jnp.repeat(recv_x[1], 128, axis=1)
        return (recv_x * 0.5).astype(jnp.bfloat16)
    return (recv_x.astype(jnp.float32) * 0.5 + 1.0).astype(recv_x.dtype)


def _expected_y(exp):
    rx = exp["recv_x"]
    if isinstance(rx, tuple):
        deq = oracle.fp8_dequantize(*rx)
        return (deq * 0.5).astype(ml_dtypes.bfloat16)
    y = (rx.astype(np.float32) * 0.5 + 1.0).astype(rx.dtype)
    y[exp["num_recv_tokens"]:] = 0  # combine ignores padding rows anyway
    return y


def check_against_oracle(got, exp_list, capacity, xs, idxs):
    ys = [_expected_y(e) for e in exp_list]
    # Padding rows of recv_x are zero, so the +1.0 on them must not be combined.
    exp_comb = oracle.combine(ys, idxs, E, capacity)
    for r, exp in enumerate(exp_list):
        g = rank(got, r)
        if isinstance(exp["recv_x"], tuple):
            np.testing.assert_array_equal(np.asarray(g["recv_x"][0]).view(np.uint8),
                                          exp["recv_x"][0].view(np.uint8))
            np.testing.assert_array_equal(g["recv_x"][1], exp["recv_x"][1])
        else:
            np.testing.assert_array_equal(g["recv_x"], exp["recv_x"])
        np.testing.assert_array_equal(g["recv_topk_idx"], exp["recv_topk_idx"])
        np.testing.assert_array_equal(g["recv_topk_weights"], exp["recv_topk_weights"])
        for key in ("num_recv_tokens", "num_dropped_tokens", "num_invalid_experts"):
            assert int(g[key]) == exp[key], (key, r)
        np.testing.assert_array_equal(g["num_recv_tokens_per_expert"],
                                      exp["num_recv_tokens_per_expert"])
        np.testing.assert_array_equal(np.asarray(g["combined"]).astype(np.float32),
                                      exp_comb[r].astype(np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_dispatch_combine_matches_oracle(dtype):
    xs, idxs, ws = inputs(1, none_prob=0.1)
    xs = as_dtype(xs, dtype)
    got = run_ep(dispatch_fn(), xs, idxs, ws, mesh=ep_mesh(R))
    check_against_oracle(got, oracle.dispatch(xs, idxs, ws, E), None, xs, idxs)


def test_fp8_pair_is_carried_through():
    xs, idxs, ws = inputs(2)
    pairs = [oracle.fp8_quantize(x) for x in xs]
    got = run_ep(dispatch_fn(), pairs, idxs, ws, mesh=ep_mesh(R))
    check_against_oracle(got, oracle.dispatch(pairs, idxs, ws, E), None, pairs, idxs)


@pytest.mark.parametrize("capacity", [1, 17, 40])
def test_overflow_drops_last_rows_and_counts_them(capacity):
    xs, idxs, ws = inputs(3)
    got = run_ep(dispatch_fn(capacity), xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.dispatch(xs, idxs, ws, E, capacity)
    assert sum(e["num_dropped_tokens"] for e in exp) > 0, "test must actually overflow"
    check_against_oracle(got, exp, capacity, xs, idxs)


def test_invalid_ids_are_counted_and_ignored():
    xs, idxs, ws = inputs(4, invalid_prob=0.2, none_prob=0.1, duplicate_prob=0.2)
    got = run_ep(dispatch_fn(), xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.dispatch(xs, idxs, ws, E)
    assert sum(e["num_invalid_experts"] for e in exp) > 0
    check_against_oracle(got, exp, None, xs, idxs)


def test_deterministic_bitwise():
    xs, idxs, ws = inputs(5)
    xs = as_dtype(xs, ml_dtypes.bfloat16)
    a = run_ep(dispatch_fn(), xs, idxs, ws, mesh=ep_mesh(R))
    b = run_ep(dispatch_fn(), xs, idxs, ws, mesh=ep_mesh(R))
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(la).view(np.uint8), np.asarray(lb).view(np.uint8))


def test_without_jit_matches_jit():
    xs, idxs, ws = inputs(6)
    a = run_ep(dispatch_fn(), xs, idxs, ws, mesh=ep_mesh(R))
    b = run_ep(dispatch_fn(), xs, idxs, ws, mesh=ep_mesh(R), jit=False)
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(la, lb)


def test_two_dimensional_mesh_ep_is_one_axis():
    """EP over 'ep' (size 4) inside a ('dp', 'ep') = (2, 4) mesh: two independent EP groups."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    ep = 4
    mesh = jax.make_mesh((2, ep), ("dp", "ep"), devices=jax.devices()[:8])
    groups = [oracle.make_inputs(10 + g, ep, T, H, E, K) for g in range(2)]
    stack = lambda i: np.concatenate([np.concatenate(groups[g][i]) for g in range(2)])
    spec = P(("dp", "ep"))
    args = [jax.device_put(stack(i), NamedSharding(mesh, spec)) for i in range(3)]

    def fn(x, idx, w):
        rx, ri, rw, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep")
        return rx, jax_ep.combine(rx, h)

    rx, comb = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))(*args)
    rx = np.split(np.asarray(rx), 8)
    comb = np.split(np.asarray(comb), 8)
    for g in range(2):
        xs, idxs, ws = groups[g]
        exp = oracle.dispatch(xs, idxs, ws, E)
        exp_comb = oracle.combine([e["recv_x"] for e in exp], idxs, E)
        for r in range(ep):
            np.testing.assert_array_equal(rx[g * ep + r], exp[r]["recv_x"])
            np.testing.assert_array_equal(comb[g * ep + r], exp_comb[r])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_layout_matches_oracle(backend):
    _, idxs, _ = inputs(7, invalid_prob=0.1, none_prob=0.1, duplicate_prob=0.2)
    for idx in idxs[:3]:
        got = jax.jit(lambda i: jax_ep.get_dispatch_layout(
            i, num_experts=E, num_ranks=R, backend=backend))(idx)
        for g, e in zip(got, oracle.get_dispatch_layout(idx, E, R)):
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("dtype", [np.int64, np.uint32])
def test_wide_ids_are_judged_before_narrowing(dtype):
    """2**32 + e must count as invalid, not wrap to expert e (nor 2**32 - 1 to -1)."""
    xs, idxs, ws = inputs(11)
    wide = [i.astype(np.int64) for i in idxs]
    for r, i in enumerate(wide):
        i[r % T, 0] = 2**32 + 3           # wraps to expert 3 as int32
        i[(r + 1) % T, 1] = 2**32 - 1     # wraps to -1 ("no expert") as int32
    wide = [i.astype(dtype) for i in wide]  # uint32 keeps 2**32 - 1 and drops the 2**32
    with jax.enable_x64(True):
        got = run_ep(dispatch_fn(), xs, wide, ws, mesh=ep_mesh(R))
    exp = oracle.dispatch(xs, [i.astype(np.int64) for i in wide], ws, num_experts=E)
    for r in range(R):
        g = rank(got, r)
        assert int(g["num_invalid_experts"]) == exp[r]["num_invalid_experts"] >= 1
        np.testing.assert_array_equal(g["recv_topk_idx"], exp[r]["recv_topk_idx"])
