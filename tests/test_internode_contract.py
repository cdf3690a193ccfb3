"""The internode contract (docs/design.md §2.16) on the reference backend, 8 CPU devices.

initialize(ranks_per_node=G) groups the 8 ranks into 8 / G nodes: dispatch is
unchanged, combine (and dispatch's VJP) sums within each node in rank order,
rounds each node's partial to y's dtype and sums the partials in node order.
Everything is compared with the numpy oracle, bit for bit.
"""

import contextlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jax_ep
from jax_ep import _reference, _runtime
from jax_ep.testing import oracle
from ep_harness import as_dtype, ep_mesh, rank, run_ep

R, T, H, K, E, CAP = 8, 16, 64, 4, 32, 56
GROUPS = [1, 2, 4, 8]
DTYPES = [ml_dtypes.bfloat16, np.float16, np.float32]
SPEC = P("ep")


@pytest.fixture(scope="module")
def mesh():
    return ep_mesh(R)


@contextlib.contextmanager
def nodes(mesh, g):
    jax_ep.initialize(mesh, axis_name="ep", ranks_per_node=g, backend="reference")
    try:
        yield
    finally:
        jax_ep.shutdown()


def routing(seed):
    """Inputs with invalid ids, -1, duplicate experts and a hot expert (1, on rank 0)."""
    xs, idxs, ws = oracle.make_inputs(seed, R, T, H, E, K, none_prob=0.1, invalid_prob=0.1,
                                      duplicate_prob=0.2)
    for idx in idxs:
        idx[: T // 2, 0] = 1
    return xs, idxs, ws


def random_rows(seed, dtype, rows=CAP):
    rng = np.random.default_rng(seed)
    scale = 2.0 ** rng.integers(-4, 5, (R, rows, 1))
    return [(rng.standard_normal((rows, H)) * scale[r]).astype(np.float32).astype(dtype)
            for r in range(R)]


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint16 if a.itemsize == 2 else np.uint32)


def dispatch_combine(x, idx, w, y):
    recv_x, recv_idx, recv_w, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                                  capacity=CAP)
    return dict(recv_x=recv_x, recv_topk_idx=recv_idx, recv_topk_weights=recv_w, handle=h,
                combined=jax_ep.combine(y, h))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("g", GROUPS)
def test_dispatch_unchanged_combine_is_the_node_tree(mesh, g, dtype):
    xs, idxs, ws = routing(1)
    xs, ys = as_dtype(xs, dtype), random_rows(2, dtype)
    with nodes(mesh, g):
        got = run_ep(dispatch_combine, xs, idxs, ws, ys, mesh=mesh)
    exp = oracle.dispatch(xs, idxs, ws, E, CAP)
    assert sum(e["num_dropped_tokens"] for e in exp) > 0
    assert sum(e["num_invalid_experts"] for e in exp) > 0
    tree = oracle.combine(ys, idxs, E, CAP, ranks_per_node=g)
    plain = oracle.combine(ys, idxs, E, CAP)
    for r in range(R):
        got_r, exp_r = rank(got, r), exp[r]
        for key in ("recv_x", "recv_topk_idx", "recv_topk_weights"):
            np.testing.assert_array_equal(bits(got_r[key]), bits(exp_r[key]), err_msg=key)
        h = got_r["handle"]
        for key in ("num_recv_tokens", "num_dropped_tokens", "num_invalid_experts"):
            assert int(getattr(h, key)) == exp_r[key], (key, r)
        np.testing.assert_array_equal(h.num_recv_tokens_per_expert,
                                      exp_r["num_recv_tokens_per_expert"])
        np.testing.assert_array_equal(bits(got_r["combined"]), bits(tree[r]))
        if g in (1, R):  # one row per node, or one node: the plain rank order
            np.testing.assert_array_equal(bits(got_r["combined"]), bits(plain[r]))
        assert h.ranks_per_node == (None if g == R else g)


def test_node_partials_are_rounded(mesh):
    """bf16 rows where rounding each node's partial changes the sum: the result must
    differ from the plain order and from an unrounded tree, and equal the oracle."""
    g, dtype = 2, ml_dtypes.bfloat16
    xs, idxs, ws = routing(3)
    xs, ys = as_dtype(xs, dtype), random_rows(4, dtype)
    with nodes(mesh, g):
        got = run_ep(dispatch_combine, xs, idxs, ws, ys, mesh=mesh)
    tree = oracle.combine(ys, idxs, E, CAP, ranks_per_node=g)
    plain = oracle.combine(ys, idxs, E, CAP)
    send_rows = [e["send_rows"] for e in oracle.dispatch(xs, idxs, ws, E, CAP)]
    unrounded = [np.zeros((T, H), np.float32) for _ in range(R)]
    for s in range(R):
        for n in range(R // g):
            partial = np.zeros((T, H), np.float32)
            for r in range(n * g, (n + 1) * g):
                sent = send_rows[s][:, r] >= 0
                partial[sent] += ys[r][send_rows[s][sent, r]].astype(np.float32)
            unrounded[s] += partial
    combined = [np.asarray(got["combined"][r]) for r in range(R)]
    for r in range(R):
        np.testing.assert_array_equal(bits(combined[r]), bits(tree[r]))
    assert any(np.any(bits(c) != bits(p)) for c, p in zip(combined, plain))
    assert any(np.any(bits(c) != bits(u.astype(dtype))) for c, u in zip(combined, unrounded))


def test_node_tree_as_loops(mesh, monkeypatch):
    """Past _UNROLL_RANKS ranks the sums run as fori_loops: the same bits."""
    monkeypatch.setattr(_reference, "_UNROLL_RANKS", 4)
    xs, idxs, ws = routing(14)
    ys = random_rows(15, ml_dtypes.bfloat16)
    with nodes(mesh, 2):
        got = run_ep(dispatch_combine, xs, idxs, ws, ys, mesh=mesh)
    tree = oracle.combine(ys, idxs, E, CAP, ranks_per_node=2)
    for r in range(R):
        np.testing.assert_array_equal(bits(got["combined"][r]), bits(tree[r]))


def pre_drop_slots(idxs):
    """Per source: int [T, R] position of t among the tokens it sends to r, or -1."""
    out = []
    for ids in idxs:
        owner = np.where((ids >= 0) & (ids < E), ids // (E // R), -1)
        in_rank = np.stack([np.any(owner == r, axis=1) for r in range(R)], axis=1)
        out.append(np.where(in_rank, np.cumsum(in_rank, axis=0) - 1, -1))
    return out


def expected_node_fields(idxs, g):
    """node_slot, relay_pos, relay_rows of every rank, from their definitions."""
    n_nodes, slots, out = R // g, pre_drop_slots(idxs), []
    for me in range(R):
        n_me, g_me = divmod(me, g)
        in_node = np.stack([np.any(slots[me][:, n * g:(n + 1) * g] >= 0, axis=1)
                            for n in range(n_nodes)], axis=1)
        node_slot = np.where(in_node, np.cumsum(in_node, axis=0) - 1, -1)
        relay_pos = np.full((n_nodes, T, g), -1)
        relay_rows = np.zeros(n_nodes)
        for n in range(n_nodes):
            cols = slots[n * g + g_me][:, n_me * g:(n_me + 1) * g]
            tokens = [t for t in range(T) if np.any(cols[t] >= 0)]
            relay_rows[n] = len(tokens)
            for j, t in enumerate(tokens):
                relay_pos[n, j] = cols[t]
        out.append((node_slot, relay_pos, relay_rows))
    return out


@pytest.mark.parametrize("g", GROUPS)
def test_handle_node_fields(mesh, g):
    xs, idxs, ws = routing(5)
    ys = random_rows(6, np.float32)
    with nodes(mesh, g):
        got = run_ep(dispatch_combine, xs, idxs, ws, ys, mesh=mesh)
    if g == R:
        h = rank(got, 0)["handle"]
        assert (h.ranks_per_node, h.node_slot, h.relay_pos, h.relay_rows) == (None,) * 4
        return
    for r, (node_slot, relay_pos, relay_rows) in enumerate(expected_node_fields(idxs, g)):
        h = rank(got, r)["handle"]
        assert h.node_slot.dtype == h.relay_pos.dtype == h.relay_rows.dtype == np.int32
        np.testing.assert_array_equal(h.node_slot, node_slot)
        np.testing.assert_array_equal(h.relay_pos, relay_pos)
        np.testing.assert_array_equal(h.relay_rows, relay_rows)


def glob(per_rank, mesh):
    return jax.device_put(np.concatenate([np.asarray(a) for a in per_rank]),
                          NamedSharding(mesh, SPEC))


def smap(fn, mesh):
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=SPEC, out_specs=SPEC)
    return lambda *a: mapped(*(jax.reshard(x, NamedSharding(mesh, SPEC)) for x in a))


@pytest.mark.parametrize("g", GROUPS)
def test_dispatch_vjp_is_the_node_tree(mesh, g):
    """dx of a bf16 dispatch is the node-tree combine of the cotangents (rounded
    partials); dw the float32 tree; combine's VJP is the unchanged cached dispatch."""
    dtype = ml_dtypes.bfloat16
    xs, idxs, ws = routing(7)
    xs = as_dtype(xs, dtype)
    idx = glob(idxs, mesh)
    ct_x, ct_w = random_rows(8, dtype), random_rows(9, np.float32, CAP)
    ct_w = [c[:, :K] for c in ct_w]
    ct_out = random_rows(10, dtype, T)

    def fwd(x, w):
        def body(x, idx, w):
            rx, _, rw, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                           capacity=CAP)
            return rx, rw, jax_ep.combine(rx, h)
        return smap(body, mesh)(x, idx, w)

    with nodes(mesh, g):
        _, vjp = jax.vjp(fwd, glob(xs, mesh), glob(ws, mesh))
        zeros = lambda rows, cols, dt: glob([np.zeros((rows, cols), dt)] * R, mesh)
        dx, dw = jax.jit(vjp)((glob(ct_x, mesh), glob(ct_w, mesh), zeros(T, H, dtype)))
        dx_comb, _ = jax.jit(vjp)((zeros(CAP, H, dtype), zeros(CAP, K, np.float32),
                                   glob(ct_out, mesh)))
    exp_dx = oracle.combine(ct_x, idxs, E, CAP, ranks_per_node=g)
    exp_dw = oracle.dispatch_weights_grad(ct_w, idxs, E, CAP, ranks_per_node=g)
    # d/dx combine(dispatch(x)) = combine(dispatch(ct)): the tree again, on the
    # cached dispatch of the cotangent
    recv_ct = [e["recv_x"] for e in oracle.dispatch(ct_out, idxs, ws, E, CAP)]
    exp_dx_comb = oracle.combine(recv_ct, idxs, E, CAP, ranks_per_node=g)
    dx, dw, dx_comb = (np.split(np.asarray(a), R) for a in (dx, dw, dx_comb))
    for r in range(R):
        np.testing.assert_array_equal(bits(dx[r]), bits(exp_dx[r]))
        np.testing.assert_array_equal(bits(dw[r]), bits(exp_dw[r]))
        np.testing.assert_array_equal(bits(dx_comb[r]), bits(exp_dx_comb[r]))


def moe_loss(mesh, remat):
    def layer(x, idx, w, w_in):
        recv, _, rw, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep")
        y = jnp.tanh(recv @ w_in[0]) * jnp.sum(rw, axis=1, keepdims=True)
        return jax_ep.combine(y, h)

    mapped = smap(jax.checkpoint(layer) if remat else layer, mesh)
    return lambda x, idx, w, w_in: jnp.sum(mapped(x, idx, w, w_in) ** 2)


def test_check_grads_and_checkpoint(mesh):
    xs, idxs, ws = routing(11)
    rng = np.random.default_rng(12)
    w_in = glob([rng.standard_normal((1, H, H), np.float32) * 0.1] * R, mesh)
    x, idx, w = glob(xs, mesh), glob(idxs, mesh), glob(ws, mesh)
    with nodes(mesh, 2):
        loss = moe_loss(mesh, remat=False)
        check_grads(jax.jit(lambda x, w: loss(x, idx, w, w_in)), (x, w), order=1,
                    modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-3)
        grads = [jax.jit(jax.grad(moe_loss(mesh, remat), argnums=(0, 2, 3)))(x, idx, w, w_in)
                 for remat in (False, True)]
    for plain, remat in zip(*grads):
        np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), rtol=1e-6, atol=1e-6)
        assert np.any(np.asarray(plain) != 0)


@pytest.mark.parametrize("bad", [3, 0, -2, True, 2.0, "2", 16])
def test_bad_ranks_per_node_is_refused_at_initialize(mesh, bad):
    with pytest.raises(ValueError, match="ranks_per_node"):
        jax_ep.initialize(mesh, axis_name="ep", ranks_per_node=bad, backend="reference")
    assert not jax_ep.is_initialized()
    assert jax_ep.runtime_info()["ranks_per_node"] is None


def test_ranks_per_node_needs_a_mesh():
    with pytest.raises(ValueError, match="ranks_per_node.*mesh"):
        jax_ep.initialize(None, ranks_per_node=2)
    assert not jax_ep.is_initialized()


def test_runtime_info_and_fingerprint(mesh, monkeypatch):
    seen = []
    monkeypatch.setattr(_runtime._agreement, "compare_configs",
                        lambda mesh, fingerprint, **kw: seen.append(fingerprint))
    with nodes(mesh, np.int64(4)):
        info = jax_ep.runtime_info()
        assert info["ranks_per_node"] == 4 and type(info["ranks_per_node"]) is int
    assert seen[-1]["ranks_per_node"] == 4
    assert jax_ep.runtime_info()["ranks_per_node"] is None
    with nodes(mesh, None):
        assert jax_ep.runtime_info()["ranks_per_node"] is None
    assert seen[-1]["ranks_per_node"] is None


def test_internode_calls_refuse_cuda_and_another_axis_size(mesh):
    xs, idxs, ws = routing(13)
    with nodes(mesh, 2):
        with pytest.raises(NotImplementedError, match="internode"):
            run_ep(lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=E, axis_name="ep",
                                                   backend="cuda")[2], xs, idxs, ws, mesh=mesh)
    small = ep_mesh(4)
    with nodes(mesh, 8):
        with pytest.raises(ValueError, match="ranks_per_node=8"):
            run_ep(lambda x, i, w: jax_ep.dispatch(x, i, w, num_experts=E, axis_name="ep")[2],
                   xs[:4], idxs[:4], ws[:4], mesh=small)
