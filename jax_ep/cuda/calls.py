"""What the custom-call wrappers of every mode share: the call itself (on the
communication stream when `Options.comm_stream` asks), the call's EP axis index
operand, payloads as 2-D rows, their byte size, and the type of a payload moved
to other rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.compute_on import compute_on

from . import extension

# Options.comm_stream of the initialize in force (set by jax_ep._runtime).
_comm_stream: int | str | None = None


def set_comm_stream(stream: int | str | None) -> None:
    """Set the stream comm_call puts calls on. It is read when a function is
    traced, so a change drops JAX's caches: functions traced before trace again."""
    global _comm_stream
    if stream != _comm_stream:
        jax.clear_caches()
    _comm_stream = stream


def comm_call(target, result_types, *operands, **attrs):
    """jax.ffi.ffi_call of a communication target, on XLA's stream
    `Options.comm_stream` (an async start / done pair) when one is set."""
    call = jax.ffi.ffi_call(target, result_types)
    if _comm_stream is None:
        return call(*operands, **attrs)
    on_stream = compute_on(lambda *ops: call(*ops, **attrs),
                           compute_type=f"gpu_stream:{_comm_stream}",
                           out_memory_spaces=jax.memory.Space.Device)
    return on_stream(*operands)


def axis_index(axis_name):
    """This call's position on the EP axis: the kernels check it against the rank
    initialize gave the device (a mesh of another device order stops with a message)."""
    return lax.axis_index(axis_name).astype(jnp.int32)


def as_rows(a):
    """Payloads travel as 2-D [rows, row] arrays; the shape is restored after."""
    return a.reshape(a.shape[0], -1) if a.ndim != 2 else a


def row_bytes(a) -> int:
    """Bytes of one row (everything but the leading axis) of `a`."""
    t = jax.typeof(a)
    return int(np.prod(t.shape[1:], dtype=np.int64)) * t.dtype.itemsize


def moved_type(p, rows):
    """The result type of payload `p` moved to `rows` rows of the same shape."""
    t = jax.typeof(p)
    return extension.result_type(t, (rows,) + tuple(t.shape[1:]), t.dtype)
