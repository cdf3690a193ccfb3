"""Index arithmetic of the ragged low-latency layout (docs/design.md §2.6).

The padded layout gives local expert l the rows (l, 0 .. R*M) and fills the
first recv_count[l]; the ragged one concatenates those valid prefixes in
expert order. Padded row (l, p) is ragged row start[l] + p, where start is the
exclusive prefix sum of recv_count, and rows past sum(recv_count) are the
tail. The handle's internal rows (recv_src, slot) stay per expert. The
reference backend maps rows with these functions (gathers, never a scatter,
so its results are bitwise deterministic); the CUDA kernels place ragged rows
themselves (ffi/kernels/low_latency/low_latency.h).
"""

from __future__ import annotations

import jax.numpy as jnp

from ._routing import exclusive_cumsum

LAYOUTS = ("padded", "ragged")


def padded_row_of_ragged(recv_count, rows, rows_per_expert):
    """int32 [rows]: the flat padded row (l * R*M + p) of every ragged row; for
    rows past sum(recv_count), L * R*M (one past the end)."""
    num_local = recv_count.shape[0]
    ends = jnp.cumsum(recv_count, dtype=jnp.int32)
    i = jnp.arange(rows, dtype=jnp.int32)
    # Expert of row i: how many experts end at or before i (empty ones included).
    expert = jnp.searchsorted(ends, i, side="right").astype(jnp.int32)
    start = (ends - recv_count)[jnp.minimum(expert, num_local - 1)]
    return jnp.where(i < ends[-1], expert * rows_per_expert + i - start,
                     num_local * rows_per_expert)


def ragged_row_of_padded(recv_count, rows_per_expert, past):
    """int32 [L, R*M]: the ragged row of every padded row (start[l] + p), or
    `past` where p >= recv_count[l]."""
    p = jnp.arange(rows_per_expert, dtype=jnp.int32)[None, :]
    start = exclusive_cumsum(recv_count.astype(jnp.int32))[:, None]
    return jnp.where(p < recv_count[:, None], start + p, past)


def ragged_of_flat(flat_rows, recv_count, rows_per_expert):
    """Padded flat rows (l * R*M + p, or -1) -> the same rows in the ragged
    layout (start[l] + p, -1 kept). Any shape."""
    start = exclusive_cumsum(recv_count.astype(jnp.int32))
    expert = jnp.maximum(flat_rows, 0) // rows_per_expert
    return jnp.where(flat_rows >= 0, start[expert] + flat_rows % rows_per_expert, -1)


def to_ragged(padded, recv_count, rows, zero_tail=True):
    """[L, R*M, ...] -> [rows, ...]: the valid rows, concatenated in expert order.
    The tail is zero, or with zero_tail=False copies of some padded row."""
    num_local, rows_per_expert = padded.shape[:2]
    flat = padded.reshape((num_local * rows_per_expert,) + padded.shape[2:])
    index = padded_row_of_ragged(recv_count, rows, rows_per_expert)
    if zero_tail:
        return jnp.take(flat, index, axis=0, mode="fill", fill_value=0)
    return jnp.take(flat, index, axis=0, mode="clip")


def to_padded(ragged, recv_count, rows_per_expert):
    """[N, ...] -> [L, R*M, ...]; rows p >= recv_count[l] are zero."""
    index = ragged_row_of_padded(recv_count, rows_per_expert, ragged.shape[0])
    return jnp.take(ragged, index, axis=0, mode="fill", fill_value=0)


def leading_shape(layout, handle):
    """The leading dims of recv_x (and of combine's y) in `layout` for `handle`."""
    if layout == "ragged":
        return (handle.ragged_rows,)
    return (handle.num_local_experts, handle.rows_per_expert)
