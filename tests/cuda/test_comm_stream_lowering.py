"""Options.comm_stream on a CPU-only machine: the communication custom calls of
every mode lower inside a call XLA runs on its own stream (the
`_xla_stream_annotation` compute_on attaches), the routing kernels and
everything else stay on the compute stream, and without the option nothing
is annotated. Whether XLA then overlaps them is tests/gpu/test_graphs_gpu.py."""

import re

import jax
import jax.numpy as jnp
import pytest

from jax_ep.cuda import calls, extension
from jax_ep.cuda import intranode, layout
from jax_ep.cuda import low_latency as ll
from lowering import fake_low_latency, lower_loss_grad_for_cuda

pytestmark = pytest.mark.skipif(not extension.cuda_available(),
                                reason="jax_ep was built without its CUDA ops")

AX = jnp.zeros((), jnp.int32)
R, M, E, K, T, H = 4, 16, 32, 4, 12, 256


@pytest.fixture
def stream(request):
    calls.set_comm_stream(request.param)
    yield request.param
    calls.set_comm_stream(None)


def _lower(fn, *shapes):
    return jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def _callee_of(text, target):
    """Name of the function whose body holds the custom call to `target`."""
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*func\.func (?:private |public )?@([\w.$-]+)\(", line)
        if m:
            name = m.group(1)
        if f"custom_call @{target}(" in line:
            return name
    raise AssertionError(f"no call to {target} in\n{text}")


def _callees_of(text, target):
    """Names of every function whose body holds a custom call to `target`."""
    names, name = [], None
    for line in text.splitlines():
        m = re.match(r"\s*func\.func (?:private |public )?@([\w.$-]+)\(", line)
        if m:
            name = m.group(1)
        if f"custom_call @{target}(" in line:
            names.append(name)
    return names


def _annotation_of_call_to(text, func):
    """The _xla_stream_annotation of the call op that calls `func`, or None."""
    for line in text.splitlines():
        if re.search(rf"call @{re.escape(func)}\(", line):
            m = re.search(r'_xla_stream_annotation = "([^"]+)"', line)
            return m.group(1) if m else None
    raise AssertionError(f"nothing calls {func}")


def _ll_dispatch(x, i):
    return ll.dispatch_call(x, i, axis_index=AX, num_experts=E, max_tokens_per_rank=M,
                            num_ranks=R)


def _s(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("stream", [1, 3, "collective"], indirect=True)
def test_low_latency_dispatch_runs_on_the_comm_stream(stream):
    text = _lower(_ll_dispatch, _s((T, H), jnp.bfloat16), _s((T, K), jnp.int32))
    func = _callee_of(text, "jax_ep_ll_dispatch")
    assert func != "main"
    assert _annotation_of_call_to(text, func) == str(stream)


@pytest.mark.parametrize("stream", [2], indirect=True)
def test_intranode_calls_run_on_the_comm_stream_and_routing_does_not(stream):
    def body(i, x):
        slot, sent = layout.route_ffi(i, num_experts=E, num_ranks=R)
        counts, recv = intranode.dispatch_call(AX, slot, sent, [x], capacity=T * R)
        return intranode.combine_call(AX, recv, slot, counts)

    text = _lower(body, _s((T, K), jnp.int32), _s((T, H), jnp.bfloat16))
    for target in ("jax_ep_intranode_dispatch", "jax_ep_intranode_combine"):
        assert _annotation_of_call_to(text, _callee_of(text, target)) == "2", target
    assert _callee_of(text, "jax_ep_route") == "main"


def test_without_the_option_nothing_is_annotated():
    text = _lower(_ll_dispatch, _s((T, H), jnp.bfloat16), _s((T, K), jnp.int32))
    assert _callee_of(text, "jax_ep_ll_dispatch") == "main"
    assert "_xla_stream_annotation" not in text


@pytest.fixture
def cuda_low_latency(monkeypatch):
    """The CUDA low-latency mode as if initialize had set it up (only traced here)."""
    fake_low_latency(monkeypatch, R, max_tokens_per_rank=M, hidden=H, top_k=K, num_experts=E)


@pytest.mark.parametrize("stream", [1], indirect=True)
def test_gradients_and_remat_lower_with_the_comm_stream(stream, cuda_low_latency):
    """The VJPs' calls (gather, cached dispatch, combine) go to the stream too,
    under jax.checkpoint as well."""
    import jax_ep

    kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, backend="cuda")

    def body(x, idx, w):
        rx, _, h = jax_ep.low_latency_dispatch(x, idx, **kw)
        return jax_ep.low_latency_combine(jnp.sin(rx), idx, w, h, backend="cuda")

    text = lower_loss_grad_for_cuda(jax.checkpoint(body), R, T, H, K)
    for target in ("jax_ep_ll_dispatch", "jax_ep_ll_combine", "jax_ep_ll_gather",
                   "jax_ep_ll_dispatch_cached"):
        funcs = _callees_of(text, target)
        assert funcs, target
        for func in funcs:
            assert func != "main" and _annotation_of_call_to(text, func) == "1", (target, func)
