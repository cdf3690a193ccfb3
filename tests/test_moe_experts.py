"""jax_ep.moe.ragged_experts (the decode experts on the ragged low-latency layout)
against a dense per-row computation in numpy."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_ep import moe

L, N, H, F = 3, 40, 32, 24


def _silu(v):
    return v / (1.0 + np.exp(-v))


def dense_rows(x, group_sizes, w_gate, w_up, w_down):
    """Row by row: the SwiGLU of the expert whose group holds the row; 0 past the groups."""
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], w_down.shape[-1]))
    ends = np.cumsum(group_sizes)
    for i in range(int(ends[-1])):
        e = int(np.searchsorted(ends, i, side="right"))
        h = _silu(x[i] @ w_gate[e]) * (x[i] @ w_up[e])
        out[i] = h @ w_down[e]
    return out


def weights(seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((L, H, F)) * 0.2, rng.standard_normal((L, H, F)) * 0.2,
            rng.standard_normal((L, F, H)) * 0.2)


@pytest.mark.parametrize("group_sizes", [[7, 0, 12], [0, 0, 0], [14, 13, 13]],
                         ids=["with-tail", "empty", "full"])
def test_ragged_experts_match_dense_rows(group_sizes):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, H)).astype(np.float32)
    used = int(np.sum(group_sizes))
    x[used:] = np.nan  # the tail may hold anything (zero_padding=False)
    wg, wu, wd = (w.astype(np.float32) for w in weights(2))
    got = jax.jit(moe.ragged_experts)(x, jnp.asarray(group_sizes, jnp.int32), wg, wu, wd)
    assert got.shape == (N, H) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), dense_rows(x, group_sizes, wg, wu, wd),
                               rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got)[used:])


def test_ragged_experts_keep_the_input_dtype():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((N, H)).astype(ml_dtypes.bfloat16)
    group_sizes = [10, 5, 9]
    wg, wu, wd = (w.astype(np.float32) for w in weights(4))
    got = moe.ragged_experts(x, jnp.asarray(group_sizes, jnp.int32), wg, wu, wd)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               dense_rows(x.astype(np.float32), group_sizes, wg, wu, wd),
                               rtol=2e-2, atol=2e-2)


def test_cuda_compiler_options_are_options_xla_knows():
    """jax_ep.moe.CUDA_COMPILER_OPTIONS names a real XLA option (XLA refuses
    unknown ones, on CPU too) and compiles a ragged_dot."""
    assert moe.CUDA_COMPILER_OPTIONS == {"xla_gpu_experimental_use_ragged_dot_fusion": True}
    x = jnp.ones((6, 4), jnp.float32)
    w = jnp.ones((2, 4, 3), jnp.float32)
    f = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g),
                compiler_options=moe.CUDA_COMPILER_OPTIONS)
    out = f(x, w, jnp.array([2, 3], jnp.int32))
    np.testing.assert_array_equal(out[:5], 4.0)
    with pytest.raises(Exception):
        jax.jit(lambda v: v, compiler_options={"xla_gpu_experimental_use_ragged_dot_fusionX": True})(x)


def dense_pairs(x, idx, w, w_in, w_out, w_gate, capacity=None):
    """numpy: out[n] = sum over k of w[n, k] * expert(x[n]), each expert
    taking only its first `capacity` (row, k) pairs in row order."""
    x = np.asarray(x, np.float64)
    out = np.zeros((x.shape[0], w_out.shape[-1]))
    taken = np.zeros(w_in.shape[0], np.int64)
    dropped = 0
    for n in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            if e < 0:
                continue
            if capacity is not None and taken[e] >= capacity:
                dropped += 1
                continue
            taken[e] += 1
            h = _silu(x[n] @ w_gate[e]) * (x[n] @ w_in[e])
            out[n] += w[n, k] * (h @ w_out[e])
    return out, dropped


def routed(seed, n=30, k=4, none_prob=0.3):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, L, (n, k)).astype(np.int32)
    idx = np.where(rng.random((n, k)) < none_prob, -1, idx).astype(np.int32)
    return (rng.standard_normal((n, H)).astype(np.float32), idx,
            rng.uniform(0.1, 1.0, (n, k)).astype(np.float32))


@pytest.mark.parametrize("capacity", [1, 5, 20, 200])
def test_capped_local_experts_match_dense_pairs(capacity):
    x, idx, w = routed(3)
    w_gate, w_up, w_down = (a.astype(np.float32) for a in weights(4))
    got = jax.jit(lambda *a: moe.local_experts(*a, expert_capacity=capacity))(
        x, idx, w, w_up, w_down, w_gate)
    want, dropped = dense_pairs(x, idx, w, w_up, w_down, w_gate, capacity)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
    assert int(moe.expert_capacity_drops(idx, L, capacity)) == dropped
    busiest = np.bincount(idx[idx >= 0], minlength=L).max()
    assert (dropped > 0) == (capacity < busiest)  # the small capacities really drop


def test_capped_local_experts_with_room_equal_the_uncapped_ones_and_their_gradients():
    x, idx, w = routed(5)
    w_gate, w_up, w_down = (a.astype(np.float32) for a in weights(6))
    f = lambda cap: (lambda x, w, a, b, c: jnp.sum(
        moe.local_experts(x, idx, w, a, b, c, expert_capacity=cap) ** 2))
    args = (x, w, w_up, w_down, w_gate)
    np.testing.assert_allclose(f(idx.size)(*args), f(None)(*args), rtol=1e-5)
    for g_cap, g_all in zip(jax.grad(f(idx.size), argnums=range(5))(*args),
                            jax.grad(f(None), argnums=range(5))(*args)):
        np.testing.assert_allclose(g_cap, g_all, rtol=1e-4, atol=1e-5)


def test_capped_local_experts_work_on_l_times_c_slots():
    """The point of the capacity: the experts' matmuls see L * C rows, not N * K."""
    x, idx, w = routed(7, n=64, k=8)
    w_gate, w_up, w_down = (a.astype(np.float32) for a in weights(8))
    text = str(jax.make_jaxpr(lambda *a: moe.local_experts(*a, expert_capacity=10))(
        x, idx, w, w_up, w_down, w_gate))
    assert f"f32[{L * 10},{F}]" in text and f"f32[{64 * 8},{F}]" not in text
