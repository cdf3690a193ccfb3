"""The two low-latency layouts on 8 CPU devices against the numpy oracle: "padded"
([L, R*M, H]) and "ragged" ([N, H] grouped by local expert, for ragged_dot)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jax_ep
from jax_ep.testing import oracle
from ep_harness import as_dtype, ep_mesh, rank, run_ep

R, T, H, K, E, M = 8, 12, 256, 4, 16, 16
L = E // R
N = R * M * min(K, L)
LAYOUTS = ["padded", "ragged"]
ROUTING = dict(none_prob=0.15, invalid_prob=0.1, duplicate_prob=0.25)


def inputs(seed, dtype=ml_dtypes.bfloat16, **kw):
    xs, idxs, ws = oracle.make_inputs(seed, R, T, H, E, K, **kw)
    return as_dtype(xs, dtype), idxs, ws


def valid_rows(layout, count):
    """Mask of the rows that hold data in `layout` (recv_count of one rank)."""
    if layout == "ragged":
        return np.arange(N) < int(np.sum(count))
    return np.arange(R * M)[None, :] < np.asarray(count)[:, None]


def to_y(recv_x, dtype):
    """The expert outputs the tests combine: 2 x - 1 of the (dequantised) rows."""
    if isinstance(recv_x, tuple):
        q, s = recv_x
        recv_x = q.astype(jnp.float32) * jnp.repeat(s, 128, axis=-1)
    return (recv_x.astype(jnp.float32) * 2.0 - 1.0).astype(dtype)


def ll_fn(layout, use_fp8=False, zero_padding=True, y_dtype=jnp.bfloat16):
    def fn(x, idx, w):
        recv_x, count, h = jax_ep.low_latency_dispatch(
            x, idx, num_experts=E, axis_name="ep", max_tokens_per_rank=M, use_fp8=use_fp8,
            zero_padding=zero_padding, layout=layout)
        assert h.layout == layout
        y = to_y(recv_x, y_dtype)
        out = jax_ep.low_latency_combine(y, idx, w, h)
        return dict(recv_x=recv_x, count=count, invalid=h.num_invalid_experts, y=y, out=out)
    return fn


@pytest.mark.parametrize("zero_padding", [True, False], ids=["zeroed", "unpadded"])
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_match_the_oracle(layout, dtype, zero_padding):
    xs, idxs, ws = inputs(40, dtype, **ROUTING)
    got = run_ep(ll_fn(layout, zero_padding=zero_padding, y_dtype=dtype), xs, idxs, ws,
                 mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M, layout=layout)
    exp_out = oracle.low_latency_combine([rank(got, r)["y"] for r in range(R)], idxs, ws, E, M,
                                         layout=layout)
    for r in range(R):
        g = rank(got, r)
        np.testing.assert_array_equal(g["count"], exp[r]["recv_count"])
        assert int(g["invalid"]) == exp[r]["num_invalid_experts"]
        if zero_padding:
            np.testing.assert_array_equal(g["recv_x"], exp[r]["recv_x"])
        else:
            valid = valid_rows(layout, exp[r]["recv_count"])
            np.testing.assert_array_equal(g["recv_x"][valid], exp[r]["recv_x"][valid])
        if dtype == np.float32:  # XLA may contract w * y + acc into an FMA
            np.testing.assert_allclose(g["out"], exp_out[r], rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(g["out"], exp_out[r])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp8_layouts_match_the_oracle(layout):
    xs, idxs, ws = inputs(41, none_prob=0.1, duplicate_prob=0.2)
    got = run_ep(ll_fn(layout, use_fp8=True), xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M, use_fp8=True, layout=layout)
    exp_out = oracle.low_latency_combine([rank(got, r)["y"] for r in range(R)], idxs, ws, E, M,
                                         layout=layout)
    lead = (N,) if layout == "ragged" else (L, R * M)
    for r in range(R):
        q, s = rank(got, r)["recv_x"]
        eq, es = exp[r]["recv_x"]
        assert q.shape == lead + (H,) and s.shape == lead + (H // 128,)
        np.testing.assert_array_equal(np.asarray(q).view(np.uint8), eq.view(np.uint8))
        np.testing.assert_array_equal(s, es)
        np.testing.assert_array_equal(rank(got, r)["out"], exp_out[r])


def test_ragged_rows_are_the_padded_valid_rows_in_expert_order():
    xs, idxs, ws = inputs(42, **ROUTING)

    def fn(x, idx, w):
        kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M)
        padded, count, _ = jax_ep.low_latency_dispatch(x, idx, **kw)
        ragged, ragged_count, _ = jax_ep.low_latency_dispatch(x, idx, layout="ragged", **kw)
        return padded, count, ragged, ragged_count

    got = run_ep(fn, xs, idxs, ws, mesh=ep_mesh(R))
    for r in range(R):
        padded, count, ragged, ragged_count = rank(got, r)
        np.testing.assert_array_equal(ragged_count, count)
        want = np.concatenate([padded[l, :count[l]] for l in range(L)])
        np.testing.assert_array_equal(ragged[:len(want)], want)
        assert not np.any(ragged[len(want):].astype(np.float32))


def test_ragged_rows_fill_n_at_the_bound():
    """Every token of every rank names the K = L experts of rank 0, with T = M:
    rank 0 receives exactly N = R * M * min(K, L) rows, the bound."""
    k, m = L, T
    xs, _, ws = inputs(46)
    idxs = [np.tile(np.arange(k, dtype=np.int32), (T, 1)) for _ in range(R)]
    ws = [w[:, :k] for w in ws]

    def fn(x, idx, w):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                 max_tokens_per_rank=m, layout="ragged")
        return rx, cnt, jax_ep.low_latency_combine(rx, idx, w, h)

    got = run_ep(fn, xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, m, layout="ragged")
    assert rank(got, 0)[0].shape == (R * m * k, H) and int(np.sum(rank(got, 0)[1])) == R * m * k
    exp_out = oracle.low_latency_combine([e["recv_x"] for e in exp], idxs, ws, E, m,
                                         layout="ragged")
    for r in range(R):
        np.testing.assert_array_equal(rank(got, r)[0], exp[r]["recv_x"])
        np.testing.assert_array_equal(rank(got, r)[2], exp_out[r])


def test_ragged_dot_computes_the_padded_per_expert_matmul():
    # Quarters times small integers: every product and sum is exact in float32,
    # so the two matmuls agree bit for bit whatever order they add in.
    xs, idxs, ws = inputs(43, np.float32, none_prob=0.1)
    xs = [np.round(x * 4) / 4 for x in xs]
    w = np.random.default_rng(3).integers(-3, 4, (L, H, 32)).astype(np.float32)

    def fn(x, idx, _):
        kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M)
        padded, count, _ = jax_ep.low_latency_dispatch(x, idx, **kw)
        ragged, group_sizes, _ = jax_ep.low_latency_dispatch(x, idx, layout="ragged", **kw)
        per_expert = jnp.stack([padded[l] @ w[l] for l in range(L)])  # [L, R*M, F]
        return per_expert, count, jax.lax.ragged_dot(ragged, jnp.asarray(w), group_sizes)

    got = run_ep(fn, xs, idxs, ws, mesh=ep_mesh(R))
    for r in range(R):
        per_expert, count, ragged_out = rank(got, r)
        assert ragged_out.shape == (N, 32)
        want = np.concatenate([per_expert[l, :count[l]] for l in range(L)])
        np.testing.assert_array_equal(ragged_out[:len(want)], want)
        assert not np.any(ragged_out[len(want):])


def test_ragged_split_forms_match_the_fused_ops():
    xs, idxs, ws = inputs(44, none_prob=0.1)
    kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, layout="ragged")

    def fused(x, idx, w):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, idx, **kw)
        return rx, cnt, jax_ep.low_latency_combine(to_y(rx, rx.dtype), idx, w, h)

    def split(x, idx, w):
        pending = jax_ep.low_latency_dispatch_send(x, idx, **kw)
        rx, cnt, h = jax_ep.low_latency_dispatch_recv(pending)
        assert h.layout == "ragged" and rx.shape == (N, H)
        back = jax_ep.low_latency_combine_send(to_y(rx, rx.dtype), h)
        return rx, cnt, jax_ep.low_latency_combine_recv(back, idx, w)

    a = run_ep(fused, xs, idxs, ws, mesh=ep_mesh(R))
    b = run_ep(split, xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M, layout="ragged")
    for r in range(R):
        for pa, pb in zip(rank(a, r), rank(b, r)):
            np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(rank(b, r)[0], exp[r]["recv_x"])


# ----------------------------------------------------------------- errors


def _trace(body):
    mesh = ep_mesh(R)
    sharded = jax.NamedSharding(mesh, jax.sharding.PartitionSpec("ep"))
    args = [jax.ShapeDtypeStruct((R * T,) + s, d, sharding=sharded)
            for s, d in (((H,), jnp.bfloat16), ((K,), jnp.int32), ((K,), jnp.float32))]
    f = jax.shard_map(body, mesh=mesh, in_specs=jax.sharding.PartitionSpec("ep"),
                      out_specs=jax.sharding.PartitionSpec())
    return jax.jit(f).trace(*args)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", ["low_latency_combine", "low_latency_combine_send"])
def test_y_in_the_other_layout_is_refused(layout, op):
    other = {"padded": (N, H), "ragged": (L, R * M, H)}[layout]

    def body(x, idx, w):
        _, _, h = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                              max_tokens_per_rank=M, layout=layout)
        y = jnp.zeros(other, jnp.bfloat16)
        if op == "low_latency_combine":
            jax_ep.low_latency_combine(y, idx, w, h)
        else:
            jax_ep.low_latency_combine_send(y, h)
        return jnp.zeros(())

    with pytest.raises(ValueError) as err:
        _trace(body)
    text = str(err.value)
    assert f"jax_ep.{op}: y has shape {other}" in text
    assert f"layout={layout!r}, which takes y as" in text
    assert f"[{N}, 'hidden']" in text and f"[{L}, {R * M}, 'hidden']" in text
    assert "'padded'" in text and "'ragged'" in text


@pytest.mark.parametrize("send", [False, True], ids=["fused", "split"])
def test_unknown_layout_is_refused(send):
    op = jax_ep.low_latency_dispatch_send if send else jax_ep.low_latency_dispatch

    def body(x, idx, w):
        op(x, idx, num_experts=E, axis_name="ep", max_tokens_per_rank=M, layout="dense")
        return jnp.zeros(())

    with pytest.raises(ValueError, match="layout must be 'padded'.*or 'ragged'.*got 'dense'"):
        _trace(body)


# ----------------------------------------------------------------- autodiff


def _glob(per_rank, mesh):
    return jax.device_put(np.concatenate([np.asarray(a) for a in per_rank]),
                          jax.NamedSharding(mesh, jax.sharding.PartitionSpec("ep")))


def _smap(fn, mesh):
    spec = jax.sharding.PartitionSpec("ep")
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)
    return lambda *a: mapped(*(jax.reshard(v, jax.NamedSharding(mesh, spec)) for v in a))


@pytest.fixture(scope="module")
def grad_data():
    return oracle.make_inputs(45, R, T, 128, E, K, **ROUTING)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vjps_match_the_oracle(layout, grad_data):
    xs, idxs, ws = grad_data
    h_dim = 128
    mesh = ep_mesh(R)
    kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, layout=layout)
    idx = _glob(idxs, mesh)
    lead = (N,) if layout == "ragged" else (L, R * M)

    def disp(x):
        return _smap(lambda x, i: jax_ep.low_latency_dispatch(x, i, **kw)[0], mesh)(x, idx)

    def comb(y, w):
        def body(x, y, i, w):
            _, _, h = jax_ep.low_latency_dispatch(x, i, **kw)
            return jax_ep.low_latency_combine(y, i, w, h)
        return _smap(body, mesh)(_glob(xs, mesh), y, idx, w)

    rng = np.random.default_rng(6)
    ct_recv = [rng.standard_normal(lead + (h_dim,)).astype(np.float32) for _ in range(R)]
    _, vjp = jax.vjp(disp, _glob(xs, mesh))
    (dx,) = jax.jit(vjp)(_glob(ct_recv, mesh))
    exp_dx = oracle.low_latency_dispatch_grad_x(ct_recv, idxs, E, M, layout=layout)

    ys = [rng.standard_normal(lead + (h_dim,)).astype(np.float32) for _ in range(R)]
    ct_out = [rng.standard_normal((T, h_dim)).astype(np.float32) for _ in range(R)]
    _, vjp = jax.vjp(comb, _glob(ys, mesh), _glob(ws, mesh))
    dy, dw = jax.jit(vjp)(_glob(ct_out, mesh))
    exp_dy = oracle.low_latency_combine_grad_y(ct_out, idxs, ws, E, M, layout=layout)
    exp_dw = oracle.low_latency_combine_grad_w(ct_out, ys, idxs, E, M, layout=layout)
    for r in range(R):
        np.testing.assert_allclose(np.split(np.asarray(dx), R)[r], exp_dx[r], rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(np.split(np.asarray(dy), R)[r], exp_dy[r], rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(np.split(np.asarray(dw), R)[r], exp_dw[r], rtol=1e-5,
                                   atol=1e-5)


def test_check_grads_ragged(grad_data):
    from jax.test_util import check_grads

    xs, idxs, ws = grad_data
    mesh = ep_mesh(R)
    idx = _glob(idxs, mesh)

    def loss(x, w):
        def body(x, i, w):
            rx, _, h = jax_ep.low_latency_dispatch(x, i, num_experts=E, axis_name="ep",
                                                   max_tokens_per_rank=M, layout="ragged")
            return jax_ep.low_latency_combine(jnp.sin(rx), i, w, h)
        return _smap(body, mesh)(x, idx, w)

    check_grads(jax.jit(loss), (_glob(xs, mesh), _glob(ws, mesh)), order=1, modes=("rev",),
                atol=2e-2, rtol=2e-2, eps=1e-3)


def test_ragged_experts_layer_equals_the_padded_one(grad_data):
    """dispatch -> experts -> combine gives the same tokens (and gradients) in both
    layouts: jax_ep.moe.ragged_experts against padded_experts."""
    from jax_ep import moe

    xs, idxs, ws = grad_data
    mesh = ep_mesh(R)
    rng = np.random.default_rng(7)
    wg, wu = (_glob([rng.standard_normal((L, 128, 16)).astype(np.float32) * 0.1] * R, mesh)
              for _ in range(2))
    wd = _glob([rng.standard_normal((L, 16, 128)).astype(np.float32) * 0.1] * R, mesh)

    def layer(layout, x, i, w, wg, wu, wd):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, i, num_experts=E, axis_name="ep",
                                                 max_tokens_per_rank=M, layout=layout,
                                                 zero_padding=False)
        if layout == "ragged":
            y = moe.ragged_experts(rx, cnt, wg, wu, wd)
        else:
            y = moe.padded_experts(rx, cnt, wu, wd, wg)
        return jax_ep.low_latency_combine(y, i, w, h)

    args = (_glob(xs, mesh), _glob(idxs, mesh), _glob(ws, mesh), wg, wu, wd)
    outs, grads = [], []
    for layout in LAYOUTS:
        f = _smap(functools.partial(layer, layout), mesh)
        outs.append(np.asarray(jax.jit(f)(*args)))
        loss = lambda x, wg, wu, wd, f=f: jnp.sum(f(x, args[1], args[2], wg, wu, wd) ** 2)
        grads.append(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(args[0], *args[3:]))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    assert np.any(outs[0])
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
