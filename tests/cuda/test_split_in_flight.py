"""At most two low-latency ops in flight per traced function on the CUDA backend.

Traced (not run) on CPU with the CUDA low-latency mode faked as set up: the
check is a trace-time one, so no GPU is needed; only the trace is taken.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep.cuda import extension, low_latency

pytestmark = pytest.mark.skipif(not extension.nvshmem_available(),
                                reason="jax_ep built without the NVSHMEM low-latency ops")

R, T, H, K, E, M = 8, 4, 128, 2, 16, 8


@pytest.fixture
def cuda_low_latency(monkeypatch):
    layout = dict(num_ranks=R, max_tokens_per_rank=M, hidden=H, top_k=K, num_experts=E)
    monkeypatch.setattr(low_latency, "info", lambda: dict(allocated=True, num_ranks=R,
                                                          layout=layout))


def _trace(body):
    # CPU devices also on a GPU host: only the trace is taken
    mesh = jax.make_mesh((R,), ("ep",), devices=jax.devices("cpu")[:R])
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    sharded = NamedSharding(mesh, P("ep"))
    x = jax.ShapeDtypeStruct((R * T, H), jnp.bfloat16, sharding=sharded)
    idx = jax.ShapeDtypeStruct((R * T, K), jnp.int32, sharding=sharded)
    return f.trace(x, idx)


kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, backend="cuda")
send = functools.partial(jax_ep.low_latency_dispatch_send, **kw)
fused = functools.partial(jax_ep.low_latency_dispatch, **kw)


def test_two_sends_then_their_receives_trace(cuda_low_latency):
    def body(x, idx):
        a, b = send(x, idx), send(x, idx)
        jax_ep.low_latency_dispatch_recv(a)
        c = send(x, idx)  # a is done: c reuses its buffer set
        jax_ep.low_latency_dispatch_recv(b), jax_ep.low_latency_dispatch_recv(c)
        return x
    _trace(body)


def test_a_third_send_in_flight_raises(cuda_low_latency):
    def body(x, idx):
        send(x, idx), send(x, idx), send(x, idx)
        return x
    with pytest.raises(RuntimeError, match="third low-latency op in flight.*"
                                           "low_latency_dispatch_send"):
        _trace(body)


def test_fused_ops_count_too(cuda_low_latency):
    def body(x, idx):
        pending = send(x, idx)
        fused(x, idx)          # op n+1: fine, needs op n-1
        fused(x, idx)          # op n+2: needs `pending` received first
        jax_ep.low_latency_dispatch_recv(pending)
        return x
    with pytest.raises(RuntimeError, match="third low-latency op in flight"):
        _trace(body)


def test_the_reference_backend_is_not_limited():
    ref = functools.partial(jax_ep.low_latency_dispatch_send, num_experts=E, axis_name="ep",
                            max_tokens_per_rank=M, backend="reference")

    def body(x, idx):
        ref(x, idx), ref(x, idx), ref(x, idx)
        return x
    _trace(body)
