"""Autodiff of every op: VJPs against the oracle's linear maps, and check_grads.

Gradients are taken outside shard_map (the usual training pattern) under jit.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jax_ep
from jax_ep.testing import oracle
from ep_harness import ep_mesh

R, T, H, K, E, M = 8, 10, 128, 3, 16, 12
SPEC = P("ep")


def glob(per_rank, mesh):
    return jax.device_put(np.concatenate([np.asarray(a) for a in per_rank]),
                          NamedSharding(mesh, SPEC))


def split(a):
    return np.split(np.asarray(a), R)


def smap(fn, mesh):
    """shard_map over EP; inputs are resharded first (check_grads perturbs them
    with unsharded arrays)."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=SPEC, out_specs=SPEC)
    return lambda *a: mapped(*(jax.reshard(x, NamedSharding(mesh, SPEC)) for x in a))


@pytest.fixture(scope="module")
def mesh():
    return ep_mesh(R)


@pytest.fixture(scope="module")
def data():
    xs, idxs, ws = oracle.make_inputs(30, R, T, H, E, K, none_prob=0.1, invalid_prob=0.05,
                                      duplicate_prob=0.2)
    return xs, idxs, ws


def test_dispatch_vjp_is_combine_and_weight_gather(mesh, data):
    xs, idxs, ws = data
    idx = glob(idxs, mesh)

    def fwd(x, w):
        def body(x, idx, w):
            rx, _, rw, _ = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", capacity=40)
            return rx, rw
        return smap(body, mesh)(x, idx, w)

    rng = np.random.default_rng(0)
    ct_x = [rng.standard_normal((40, H)).astype(np.float32) for _ in range(R)]
    ct_w = [rng.standard_normal((40, K)).astype(np.float32) for _ in range(R)]
    _, vjp = jax.vjp(fwd, glob(xs, mesh), glob(ws, mesh))
    dx, dw = jax.jit(vjp)((glob(ct_x, mesh), glob(ct_w, mesh)))
    exp_dx = oracle.combine(ct_x, idxs, E, capacity=40)
    exp_dw = oracle.dispatch_weights_grad(ct_w, idxs, E, capacity=40)
    for r in range(R):
        np.testing.assert_array_equal(split(dx)[r], exp_dx[r])
        np.testing.assert_array_equal(split(dw)[r], exp_dw[r])


def test_combine_vjp_is_cached_dispatch(mesh, data):
    xs, idxs, ws = data
    idx, w = glob(idxs, mesh), glob(ws, mesh)

    def fwd(y_seed):
        def body(y_seed, idx, w):
            rx, _, _, h = jax_ep.dispatch(y_seed, idx, w, num_experts=E, axis_name="ep",
                                          capacity=40)
            return jax_ep.combine(rx * 3.0, h)
        return smap(body, mesh)(y_seed, idx, w)

    rng = np.random.default_rng(1)
    ct = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    _, vjp = jax.vjp(fwd, glob(xs, mesh))
    (dx,) = jax.jit(vjp)(glob(ct, mesh))
    # d/dx combine(3 * dispatch(x)) = 3 * combine(dispatch(ct)), via the oracle.
    recv_ct = [e["recv_x"] for e in oracle.dispatch(ct, idxs, ws, E, capacity=40)]
    exp = oracle.combine([3.0 * r for r in recv_ct], idxs, E, capacity=40)
    for r in range(R):
        np.testing.assert_allclose(split(dx)[r], exp[r], rtol=1e-6, atol=1e-6)


def test_low_latency_vjps_match_oracle(mesh, data):
    xs, idxs, ws = data
    idx = glob(idxs, mesh)

    def disp(x):
        def body(x, idx):
            return jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                               max_tokens_per_rank=M)[0]
        return smap(body, mesh)(x, idx)

    def comb(y, w):
        def body(x, y, idx, w):
            _, _, h = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                  max_tokens_per_rank=M)
            return jax_ep.low_latency_combine(y, idx, w, h)
        return jax.shard_map(body, mesh=mesh, in_specs=SPEC, out_specs=SPEC)(
            glob(xs, mesh), y, idx, w)

    rng = np.random.default_rng(2)
    L = E // R
    ct_recv = [rng.standard_normal((L, R * M, H)).astype(np.float32) for _ in range(R)]
    _, vjp = jax.vjp(disp, glob(xs, mesh))
    (dx,) = jax.jit(vjp)(glob(ct_recv, mesh))
    exp_dx = oracle.low_latency_dispatch_grad_x(ct_recv, idxs, E, M)
    for r in range(R):
        np.testing.assert_allclose(split(dx)[r], exp_dx[r], rtol=1e-6, atol=1e-6)

    ys = [rng.standard_normal((L, R * M, H)).astype(np.float32) for _ in range(R)]
    ct_out = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    _, vjp = jax.vjp(comb, glob(ys, mesh), glob(ws, mesh))
    dy, dw = jax.jit(vjp)(glob(ct_out, mesh))
    exp_dy = oracle.low_latency_combine_grad_y(ct_out, idxs, ws, E, M)
    exp_dw = oracle.low_latency_combine_grad_w(ct_out, ys, idxs, E, M)
    for r in range(R):
        np.testing.assert_allclose(split(dy)[r], exp_dy[r], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(split(dw)[r], exp_dw[r], rtol=1e-5, atol=1e-5)


def test_check_grads_normal_mode(mesh, data):
    xs, idxs, ws = data
    idx = glob(idxs, mesh)

    def loss(x, w):
        def body(x, idx, w):
            rx, ridx, rw, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep")
            y = rx * jnp.sum(rw, axis=1, keepdims=True)  # weight the local experts
            return jax_ep.combine(jnp.tanh(y), h)
        return smap(body, mesh)(x, idx, w)

    check_grads(jax.jit(loss), (glob(xs, mesh), glob(ws, mesh)), order=1, modes=("rev",),
                atol=2e-2, rtol=2e-2, eps=1e-3)


def test_check_grads_low_latency(mesh, data):
    xs, idxs, ws = data
    idx = glob(idxs, mesh)

    def loss(x, w):
        def body(x, idx, w):
            rx, _, h = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                   max_tokens_per_rank=M)
            return jax_ep.low_latency_combine(jnp.sin(rx), idx, w, h)
        return smap(body, mesh)(x, idx, w)

    check_grads(jax.jit(loss), (glob(xs, mesh), glob(ws, mesh)), order=1, modes=("rev",),
                atol=2e-2, rtol=2e-2, eps=1e-3)


def test_fp8_low_latency_dispatch_refuses_differentiation(mesh, data):
    xs, idxs, _ = data
    idx = glob(idxs, mesh)

    def loss(x):
        def body(x, idx):
            (q, s), _, _ = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                       max_tokens_per_rank=M, use_fp8=True)
            return s
        return jnp.sum(smap(body, mesh)(x, idx))

    with jax.set_mesh(mesh), pytest.raises(TypeError, match="not differentiable"):
        jax.jit(jax.grad(loss))(glob(xs, mesh))


def _moe_loss(mesh, low_latency, remat):
    """loss(x, w_in, w_out) of dispatch -> a per-expert matmul -> combine, optionally
    under jax.checkpoint (the forward ops then run again in the backward pass)."""
    def layer(x, idx, w, w_in, w_out):
        if low_latency:
            recv, count, h = jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                                         max_tokens_per_rank=M)
            y = jnp.einsum("lnh,lhf->lnf", recv, w_in)
            y = jnp.einsum("lnf,lfh->lnh", jnp.tanh(y), w_out)
            return jax_ep.low_latency_combine(y, idx, w, h)
        recv, ridx, rw, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep")
        y = jnp.tanh(recv @ w_in[0]) @ w_out[0] * jnp.sum(rw, axis=1, keepdims=True)
        return jax_ep.combine(y, h)

    body = jax.checkpoint(layer) if remat else layer
    smapped = jax.shard_map(body, mesh=mesh, in_specs=(SPEC, SPEC, SPEC, SPEC, SPEC),
                            out_specs=SPEC)
    return lambda x, idx, w, w_in, w_out: jnp.sum(smapped(x, idx, w, w_in, w_out) ** 2)


@pytest.mark.parametrize("low_latency", [False, True], ids=["normal", "low_latency"])
def test_checkpointed_layer_has_the_same_gradients(mesh, data, low_latency):
    """jax.checkpoint (remat) around dispatch -> experts -> combine: the ops can be
    rematerialised (no side effects) and give the same gradients."""
    xs, idxs, ws = data
    f, local = 16, E // R
    rng = np.random.default_rng(5)
    w_in = glob([rng.standard_normal((local, H, f), np.float32) * 0.1] * R, mesh)
    w_out = glob([rng.standard_normal((local, f, H), np.float32) * 0.1] * R, mesh)
    args = (glob(xs, mesh), glob(idxs, mesh), glob(ws, mesh), w_in, w_out)
    grads = [jax.jit(jax.grad(_moe_loss(mesh, low_latency, remat), argnums=(0, 3, 4)))(*args)
             for remat in (False, True)]
    text = jax.jit(jax.grad(_moe_loss(mesh, low_latency, True), argnums=(0, 3, 4))).lower(
        *args).as_text()
    assert "checkpoint" in text or "remat" in text or "optimization_barrier" in text
    for plain, remat in zip(*grads):
        np.testing.assert_allclose(np.asarray(remat), np.asarray(plain), rtol=1e-6, atol=1e-6)
        assert np.any(np.asarray(plain) != 0)
