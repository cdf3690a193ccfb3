"""The CUDA backend's ragged layout, run on CPU around stand-in kernels.

The kernels write and read the ragged layout themselves (the custom calls'
recv_x / y / out are [N, H]); jax_ep/cuda/low_latency.py only passes the
layout through. Here each custom call is replaced by a stand-in that keeps
the kernels' contract (the reference backend's rows, in the layout the call
asks for, NaN in rows a kernel leaves unwritten when it does not zero-fill),
so the public ops with backend="cuda" run on 8 CPU devices and their ragged
results and gradients are checked against the numpy oracle. The custom
calls' shapes in both layouts: tests/cuda/test_low_latency_lowering.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_ep
from jax_ep import _ragged, _reference
from jax_ep.cuda import extension
from jax_ep.cuda import low_latency as ll
from jax_ep.testing import oracle
from ep_harness import ep_mesh, rank, run_ep

pytestmark = pytest.mark.skipif(not extension.nvshmem_available(),
                                reason="jax_ep built without the NVSHMEM low-latency ops")

R, T, H, K, E, M = 8, 6, 128, 3, 16, 8
L = E // R
N = R * M * min(K, L)


def _handle(ids, num_experts, max_tokens_per_rank):
    return _reference.make_low_latency_handle(ids, num_experts=num_experts, axis_name="ep",
                                              max_tokens_per_rank=max_tokens_per_rank)


def _in_layout(padded, count, zero_fill, layout):
    """What a kernel writes: the padded rows, or the ragged ones (N = R*M*min(K, L)
    rows); NaN where it leaves rows unwritten (zero_fill off)."""
    if layout == "ragged":
        rows = _ragged.to_ragged(padded, count, N)
        valid = jnp.arange(N) < jnp.sum(count)
        valid = valid.reshape(valid.shape + (1,) * (rows.ndim - 1))
    else:
        rows = padded
        valid = jnp.arange(padded.shape[1])[None, :] < count[:, None]
        valid = valid.reshape(valid.shape + (1,) * (padded.ndim - 2))
    if zero_fill:
        return rows
    return jnp.where(valid, rows, jnp.asarray(jnp.nan, jnp.float32).astype(rows.dtype))


def _padded_y(y, count):
    """A combine's y as the kernels read it: ragged [N, H] rows at their offsets."""
    return _ragged.to_padded(y, count, R * M) if y.ndim == 2 else y


def fake_dispatch(x, ids, *, axis_index, num_experts, max_tokens_per_rank, use_fp8=False,
                  zero_fill=True, num_ranks=None, layout="padded"):
    h = _handle(ids, num_experts, max_tokens_per_rank)
    parts = list(_reference.fp8_quantize(x)) if use_fp8 else [x]
    recv = [_in_layout(p, h.recv_count, zero_fill, layout)
            for p in _reference.low_latency_dispatch_rows(parts, h)]
    slot = jnp.where(h.slot >= 0, h.slot % (R * max_tokens_per_rank), -1)
    return (tuple(recv) if use_fp8 else recv[0]), h.recv_count, h.recv_src, slot


def fake_combine(y, ids, w, recv_src, count, slot, *, axis_index, num_ranks=None):
    return _reference.low_latency_combine(_padded_y(y, count), w, _handle(ids, E, M))


def fake_gather(y, ids, recv_src, count, slot, *, axis_index, num_ranks=None):
    return _reference.low_latency_gather_rows(_padded_y(y, count), _handle(ids, E, M))


def fake_cached(x, ids, slot, count, scale=None, *, axis_index, num_experts,
                max_tokens_per_rank, zero_fill=True, num_ranks=None, layout="padded"):
    h = _handle(ids, num_experts, max_tokens_per_rank)
    out = _reference.low_latency_dispatch_rows([x], h, scale)[0]
    return _in_layout(out, h.recv_count, zero_fill, layout)


@pytest.fixture(autouse=True)
def stand_in_kernels(monkeypatch):
    layout = dict(num_ranks=R, max_tokens_per_rank=M, hidden=H, top_k=K, num_experts=E)
    monkeypatch.setattr(ll, "info", lambda: dict(allocated=True, num_ranks=R, layout=layout))
    for name, fake in [("dispatch_call", fake_dispatch), ("combine_call", fake_combine),
                       ("gather_call", fake_gather), ("dispatch_cached_call", fake_cached)]:
        monkeypatch.setattr(ll, name, fake)


@pytest.fixture(scope="module")
def data():
    return oracle.make_inputs(50, R, T, H, E, K, none_prob=0.1, invalid_prob=0.05,
                              duplicate_prob=0.2)


KW = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, layout="ragged", backend="cuda")


@pytest.mark.parametrize("zero_padding", [True, False], ids=["zeroed", "unpadded"])
@pytest.mark.parametrize("use_fp8", [False, True], ids=["f32", "fp8"])
def test_ragged_dispatch_and_combine(data, use_fp8, zero_padding):
    xs, idxs, ws = data

    def fn(x, idx, w):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, idx, use_fp8=use_fp8,
                                                 zero_padding=zero_padding, **KW)
        y = rx[0].astype(jnp.float32) * jnp.repeat(rx[1], 128, axis=-1) if use_fp8 else rx
        y = jnp.where(jnp.isnan(y), 0.0, y)  # the unspecified tail may be NaN here
        return rx, cnt, y, jax_ep.low_latency_combine(y * 2.0, idx, w, h, backend="cuda")

    got = run_ep(fn, xs, idxs, ws, mesh=ep_mesh(R))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M, use_fp8=use_fp8, layout="ragged")
    exp_out = oracle.low_latency_combine([2.0 * rank(got, r)[2] for r in range(R)], idxs, ws,
                                         E, M, layout="ragged")
    for r in range(R):
        rx, cnt, _, out = rank(got, r)
        np.testing.assert_array_equal(cnt, exp[r]["recv_count"])
        used = int(np.sum(cnt))
        for g, e in zip(rx if use_fp8 else [rx], exp[r]["recv_x"] if use_fp8 else
                        [exp[r]["recv_x"]]):
            g, e = np.asarray(g).astype(np.float32), e.astype(np.float32)
            np.testing.assert_array_equal(g[:used], e[:used])
            if zero_padding:
                np.testing.assert_array_equal(g[used:], 0)
        np.testing.assert_allclose(out, exp_out[r], rtol=1e-6, atol=1e-6)


def test_ragged_gradients(data):
    xs, idxs, ws = data
    mesh = ep_mesh(R)
    spec = jax.sharding.PartitionSpec("ep")
    put = lambda per: jax.device_put(np.concatenate(per), jax.NamedSharding(mesh, spec))

    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def both(x, y, idx, w):
        rx, _, h = jax_ep.low_latency_dispatch(x, idx, **KW)
        return rx, jax_ep.low_latency_combine(y, idx, w, h, backend="cuda")

    rng = np.random.default_rng(9)
    ct_recv = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
    ys = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
    ct_out = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(R)]
    idx = put(idxs)
    _, vjp = jax.vjp(lambda x, y, w: both(x, y, idx, w), put(xs), put(ys), put(ws))
    dx, dy, dw = (np.split(np.asarray(a), R) for a in jax.jit(vjp)((put(ct_recv), put(ct_out))))
    exp_dx = oracle.low_latency_dispatch_grad_x(ct_recv, idxs, E, M, layout="ragged")
    exp_dy = oracle.low_latency_combine_grad_y(ct_out, idxs, ws, E, M, layout="ragged")
    exp_dw = oracle.low_latency_combine_grad_w(ct_out, ys, idxs, E, M, layout="ragged")
    for r in range(R):
        np.testing.assert_allclose(dx[r], exp_dx[r], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dy[r], exp_dy[r], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dw[r], exp_dw[r], rtol=1e-5, atol=1e-5)
