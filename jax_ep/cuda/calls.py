"""What the custom-call wrappers of every mode share: the call's EP axis index operand,
payloads as 2-D rows, their byte size, and the type of a payload moved to other rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import extension


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
