"""jax_ep.flax.MoE against a dense reference with no expert parallelism.

The reference (`dense`, plain jax.numpy in float32 at highest precision) runs
every token through every expert and weighs each output by a gate that is the
token's (renormalised) router probability on its top-k experts and zero
elsewhere: no sort, no gather, no dispatch. Drops are checked against a numpy
model of §2.3's rule (last rows in (source rank, source token) order first).
"""

import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

HAVE_FLAX = importlib.util.find_spec("flax") is not None
needs_flax = pytest.mark.skipif(
    not HAVE_FLAX, reason="flax is not installed (pip install 'jax_ep[flax]')")
if HAVE_FLAX:
    from flax import nnx

    from jax_ep.flax import MoE, total_aux_loss

H, F, E, K, N = 16, 32, 8, 2, 64  # N global tokens: 8 per device
HIGHEST = jax.lax.Precision.HIGHEST


def dense(x, router, w_gate, w_up, w_down, top_k=K, renormalize=True):
    """(y [N, H], aux loss) with every token through all experts, gated by its top-k."""
    probs = jax.nn.softmax(jnp.dot(x, router, precision=HIGHEST), axis=-1)
    kth = jnp.sort(probs, axis=-1)[:, -top_k][:, None]
    chosen = probs >= kth
    gate = jnp.where(chosen, probs, 0.0)
    if renormalize:
        gate = gate / gate.sum(-1, keepdims=True)
    a = jnp.einsum("th,ehf->tef", x, w_gate, precision=HIGHEST)
    b = jnp.einsum("th,ehf->tef", x, w_up, precision=HIGHEST)
    out = jnp.einsum("tef,efh->teh", jax.nn.silu(a) * b, w_down, precision=HIGHEST)
    y = jnp.einsum("te,teh->th", gate, out, precision=HIGHEST)
    frac = chosen.sum(0) / (x.shape[0] * top_k)
    aux = probs.shape[-1] * jnp.sum(frac * probs.mean(0))
    return y, aux


def weights(layer):
    return tuple(np.asarray(v[...]) for v in (layer.router, layer.w_gate, layer.w_up,
                                             layer.w_down))


def tokens(seed=1, n=N, h=H):
    return jax.random.normal(jax.random.key(seed), (n, h), jnp.float32)


@pytest.fixture(scope="module")
def mesh2x4():
    return jax.make_mesh((2, 4), ("data", "expert"))


def test_import_jax_ep_does_not_need_flax():
    code = ("import sys; sys.modules['flax'] = None\n"
            "import jax_ep, jax_ep.moe\n"
            "try:\n    import jax_ep.flax\nexcept ImportError as e:\n    print(e)\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'jax_ep[flax]'" in out.stdout


@needs_flax
@pytest.mark.parametrize("shape,renormalize,axis_type", [
    ((2, 4), True, "Explicit"), ((8,), False, "Explicit"), ((2, 4), True, "Auto")])
def test_forward_and_aux_loss_match_dense_under_nnx_jit(shape, renormalize, axis_type):
    names = ("data", "expert")[-len(shape):]
    mesh = jax.make_mesh(shape, names,
                         axis_types=(getattr(jax.sharding.AxisType, axis_type),) * len(shape))
    layer = MoE(H, F, E, K, mesh=mesh, renormalize=renormalize, rngs=nnx.Rngs(0))
    assert layer.w_gate[...].sharding.spec == jax.P("expert", None, None)
    x = tokens()
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    want, aux = dense(x, *weights(layer), renormalize=renormalize)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total_aux_loss(layer), aux, rtol=1e-6)
    assert int(layer.dropped_tokens[...]) == 0
    assert y.sharding.is_equivalent_to(jax.NamedSharding(mesh, jax.P(names)), y.ndim)


@needs_flax
def test_leading_dims_and_the_context_mesh(mesh2x4):
    with jax.set_mesh(mesh2x4):
        layer = MoE(H, F, E, K, rngs=nnx.Rngs(0))
        x = tokens().reshape(8, N // 8, H)
        y = layer(x)
    assert y.shape == x.shape
    np.testing.assert_allclose(y.reshape(N, H), dense(x.reshape(N, H), *weights(layer))[0],
                               rtol=1e-5, atol=1e-5)


@needs_flax
def test_gradients_match_dense(mesh2x4):
    layer = MoE(H, F, E, K, mesh=mesh2x4, rngs=nnx.Rngs(2))
    x = tokens(3)
    ct = tokens(4)

    def loss(m, x):
        return jnp.sum(m(x) * ct) + 0.5 * total_aux_loss(m)

    gm, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)

    def dense_loss(params, x):
        y, aux = dense(x, *params)
        return jnp.sum(y * ct) + 0.5 * aux

    want_p, want_x = jax.grad(dense_loss, argnums=(0, 1))(weights(layer), x)
    np.testing.assert_allclose(gx, want_x, rtol=2e-4, atol=2e-4)
    for name, want in zip(("router", "w_gate", "w_up", "w_down"), want_p):
        np.testing.assert_allclose(gm[name][...], want, rtol=2e-4, atol=2e-4, err_msg=name)


@needs_flax
def test_check_grads_finite_differences(mesh2x4):
    layer = MoE(8, 16, E, K, mesh=mesh2x4, rngs=nnx.Rngs(5))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def f(x, params):
        m = nnx.merge(graphdef, params, rest, copy=True)  # new Variables in this trace
        return m(x), total_aux_loss(m)

    x = tokens(6, n=16, h=8)
    check_grads(f, (x, params), order=1, modes=("rev",), eps=1e-3, atol=2e-2, rtol=2e-2)


@needs_flax
def test_remat_gives_the_same_values_and_gradients(mesh2x4):
    layer = MoE(H, F, E, K, mesh=mesh2x4, rngs=nnx.Rngs(7))
    x = tokens(8)

    def plain(m, x):
        return jnp.sum(jnp.tanh(m(x))) + total_aux_loss(m)

    @nnx.remat
    def checkpointed_call(m, x):
        return m(x)

    def with_nnx_remat(m, x):
        return jnp.sum(jnp.tanh(checkpointed_call(m, x))) + total_aux_loss(m)

    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.checkpoint
    def functional(params, rest, x):
        m = nnx.merge(graphdef, params, rest)
        return jnp.sum(jnp.tanh(m(x))) + total_aux_loss(m)

    grad = nnx.jit(nnx.value_and_grad(plain))
    want_loss, want = grad(layer, x)
    for loss, g in [nnx.jit(nnx.value_and_grad(with_nnx_remat))(layer, x),
                    jax.jit(jax.value_and_grad(functional))(params, rest, x)]:
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        for name in ("router", "w_gate", "w_up", "w_down"):
            np.testing.assert_allclose(g[name][...], want[name][...], rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.grad(functional))(params, rest, x))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def dense_with_drops(x, params, shape, cap):
    """numpy: dense output with the rows a device drops past `cap` removed (§2.3)."""
    router, w_gate, w_up, w_down = (np.asarray(p, np.float64) for p in params)
    x = np.asarray(x, np.float64)
    data, ranks = shape
    local = E // ranks
    t = N // (data * ranks)
    logits = x @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :K]
    w = np.take_along_axis(probs, idx, -1)
    w /= w.sum(-1, keepdims=True)
    y = np.zeros_like(x)
    dropped = 0
    for d in range(data):
        for dest in range(ranks):
            rows = [s_tok for s_tok in range((d * ranks) * t, (d * ranks + ranks) * t)
                    if np.any(idx[s_tok] // local == dest)]  # source rank, then token
            dropped += max(0, len(rows) - cap)
            for tok in rows[:cap]:
                for k in np.flatnonzero(idx[tok] // local == dest):
                    e = idx[tok, k]
                    a, b = x[tok] @ w_gate[e], x[tok] @ w_up[e]
                    y[tok] += w[tok, k] * ((a / (1 + np.exp(-a)) * b) @ w_down[e])
    return y, dropped


@needs_flax
def test_capacity_factor_drops_the_last_rows(mesh2x4):
    factor = 0.75  # 8 tokens x top-2 per device: ceil(0.75 * 16) = 12 rows
    layer = MoE(H, F, E, K, mesh=mesh2x4, capacity_factor=factor, rngs=nnx.Rngs(9))
    x = tokens(10)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    want, dropped = dense_with_drops(x, weights(layer), (2, 4), cap=12)
    assert dropped > 0
    assert int(layer.dropped_tokens[...]) == dropped
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


@needs_flax
def test_decode_path_matches_dense(mesh2x4):
    layer = MoE(H, F, E, K, mesh=mesh2x4, max_tokens_per_rank=12, rngs=nnx.Rngs(11))
    x = tokens(12)
    y = nnx.jit(lambda m, x: m(x, decode=True))(layer, x)
    want, aux = dense(x, *weights(layer))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(total_aux_loss(layer), aux, rtol=1e-6)


@needs_flax
def test_expert_capacity_with_room_matches_dense_and_a_tight_one_counts_its_drops(mesh2x4):
    x = tokens(21)
    roomy = MoE(H, F, E, K, mesh=mesh2x4, expert_capacity_factor=8.0, rngs=nnx.Rngs(5))
    y = nnx.jit(lambda m, x: m(x))(roomy, x)
    np.testing.assert_allclose(y, dense(x, *weights(roomy))[0], rtol=1e-5, atol=1e-5)
    assert int(roomy.dropped_pairs[...]) == 0

    tight = MoE(H, F, E, K, mesh=mesh2x4, expert_capacity_factor=0.5, rngs=nnx.Rngs(5))
    nnx.jit(lambda m, x: m(x))(tight, x)
    # Each "data" row of the mesh is an EP group of 4 devices over its own 32
    # tokens; an expert lives on one device of each group and sees all of the
    # group's pairs for it (no receive rows dropped here), keeping
    # ceil(0.5 * T * K / L) of them.
    router = weights(tight)[0]
    idx = np.asarray(jax.lax.top_k(jnp.dot(x, router, precision=HIGHEST), K)[1])
    t, local = N // 8, E // mesh2x4.shape["expert"]
    cap = int(np.ceil(0.5 * t * K / local))
    want = sum(int(np.maximum(np.bincount(group.reshape(-1), minlength=E) - cap, 0).sum())
               for group in np.split(idx, mesh2x4.shape["data"]))
    assert int(tight.dropped_pairs[...]) == want > 0
    assert int(tight.dropped_tokens[...]) == 0


@needs_flax
def test_decode_computes_only_the_received_rows(mesh2x4):
    """The decode path runs the experts on the ragged layout (ragged_dot over
    the rows grouped by expert), not a batched matmul over every slot."""
    layer = MoE(H, F, E, K, mesh=mesh2x4, max_tokens_per_rank=12, rngs=nnx.Rngs(11))
    x = tokens(12)
    graphdef, state = nnx.split(layer)
    text = str(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, decode=True))(state, x))
    assert text.count("ragged_dot") >= 3, text  # gate, up and down
    # A batched matmul over the padded slots ([L, S, H] x [L, H, F], as
    # moe.padded_experts does) is a dot_general with the expert as batch dimension.
    assert "dimension_numbers=(([2], [1]), ([0], [0]))" not in text


@needs_flax
def test_decode_in_fp8_is_close_to_dense(mesh2x4):
    layer = MoE(128, 32, E, K, mesh=mesh2x4, decode_fp8=True, rngs=nnx.Rngs(13))
    x = tokens(14, n=16, h=128)
    y = nnx.jit(lambda m, x: m(x, decode=True))(layer, x)
    want = np.asarray(dense(x, *weights(layer))[0])
    assert np.abs(np.asarray(y) - want).max() < 0.1 * np.abs(want).max()


@needs_flax
def test_bad_configurations_are_named(mesh2x4):
    with pytest.raises(ValueError, match="not a multiple"):
        MoE(H, F, 6, K, mesh=mesh2x4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="expert_axis"):
        MoE(H, F, E, K, mesh=mesh2x4, expert_axis="ep", rngs=nnx.Rngs(0))
    layer = MoE(H, F, E, K, mesh=mesh2x4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="split evenly"):
        layer(tokens(n=12))
    with pytest.raises(ValueError, match="split evenly"):
        layer(tokens(n=16).reshape(4, 4, H))
