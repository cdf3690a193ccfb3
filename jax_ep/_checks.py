"""Trace-time validation of every public op's arguments.

Each check raises with a message that names the argument and says how to fix
it, before anything is lowered. Shapes here are local (per-shard) shapes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _ragged

MAX_TOPK = 32
FP8_BLOCK = 128
DENSE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
FP8_DTYPE = jnp.float8_e4m3fn


def _dtype_names(dtypes):
    return ", ".join(np.dtype(d).name for d in dtypes)


def axis_size(axis_name, op):
    """The EP size, or a clear error outside shard_map / for an unknown axis."""
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"jax_ep.{op}: axis_name={axis_name!r} is not a mesh axis bound here. "
            f"Call {op} inside jax.shard_map(..., mesh=mesh) whose mesh has an axis "
            f"named {axis_name!r} (e.g. jax.make_mesh((n,), ({axis_name!r},)))."
        ) from None


def experts(num_experts, num_ranks, op):
    if not isinstance(num_experts, (int, np.integer)) or num_experts <= 0:
        raise ValueError(f"jax_ep.{op}: num_experts must be a positive int, got {num_experts!r}.")
    if num_experts % num_ranks:
        raise ValueError(
            f"jax_ep.{op}: num_experts={num_experts} is not divisible by the EP size "
            f"{num_ranks}; every rank must hold the same number of experts. Pick "
            f"num_experts as a multiple of {num_ranks} (pad with unused experts).")
    return int(num_experts)


def topk_idx(idx, num_tokens, num_experts, op, name="topk_idx"):
    """[T, K] integer ids; returned as int32."""
    if idx.ndim != 2:
        raise ValueError(f"jax_ep.{op}: {name} must be [num_tokens, top_k], got shape {idx.shape}.")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"jax_ep.{op}: {name} must hold integer expert ids, got {idx.dtype}; "
                        f"use {name}.astype(jnp.int32).")
    if num_tokens is not None and idx.shape[0] != num_tokens:
        raise ValueError(f"jax_ep.{op}: {name} has {idx.shape[0]} tokens but x has {num_tokens}; "
                         f"x, {name} and topk_weights must share their first dimension.")
    k = idx.shape[1]
    if k < 1 or k > MAX_TOPK or k > num_experts:
        raise ValueError(f"jax_ep.{op}: top_k = {name}.shape[1] = {k} must be in "
                         f"[1, min({MAX_TOPK}, num_experts={num_experts})].")
    if idx.dtype != jnp.int32 and idx.dtype.itemsize >= 4:
        # Judge the ids before narrowing: int32 would wrap 2**32 + e to the valid
        # expert e (and an unsigned 2**32 - 1 to -1, "no expert"). Out-of-range ids
        # become num_experts, an id that stays invalid and is counted as such.
        if jnp.issubdtype(idx.dtype, jnp.unsignedinteger):
            in_range = idx < num_experts
        else:
            in_range = (idx >= -1) & (idx < num_experts)
        idx = jnp.where(in_range, idx, num_experts)
    return idx.astype(jnp.int32)


def topk_weights(w, idx_shape, op):
    if w.shape != tuple(idx_shape):
        raise ValueError(f"jax_ep.{op}: topk_weights has shape {w.shape} but topk_idx has "
                         f"{tuple(idx_shape)}; they must match ([num_tokens, top_k]).")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise TypeError(f"jax_ep.{op}: topk_weights must be floating point, got {w.dtype}.")
    return w.astype(jnp.float32)


def _hidden(h, itemsize, op, name):
    if (h * itemsize) % 16:
        raise ValueError(f"jax_ep.{op}: hidden size {h} of {name} is not aligned: rows must be a "
                         f"multiple of 16 bytes ({16 // itemsize} elements for this dtype). "
                         f"Pad the hidden dimension.")


def dense(x, op, name="x"):
    if x.ndim != 2:
        raise ValueError(f"jax_ep.{op}: {name} must be [num_tokens, hidden], got shape {x.shape}.")
    if x.dtype not in [np.dtype(d) for d in DENSE_DTYPES]:
        raise TypeError(f"jax_ep.{op}: {name} has dtype {x.dtype}; supported: "
                        f"{_dtype_names(DENSE_DTYPES)} (or an FP8 pair (x_e4m3, scales) for dispatch).")
    _hidden(x.shape[1], x.dtype.itemsize, op, name)


def dispatch_x(x, op):
    """x is an array or an FP8 pair; returns (parts, is_fp8)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"jax_ep.{op}: an FP8 x must be a pair (x_e4m3 [T, H], scales "
                             f"float32 [T, H // {FP8_BLOCK}]), got {len(x)} items.")
        q, scales = x
        if q.ndim != 2 or q.dtype != np.dtype(FP8_DTYPE):
            raise TypeError(f"jax_ep.{op}: x[0] must be float8_e4m3fn [T, H], got {q.dtype} {q.shape}.")
        h = q.shape[1]
        if h % FP8_BLOCK:
            raise ValueError(f"jax_ep.{op}: FP8 hidden size {h} must be a multiple of {FP8_BLOCK} "
                             f"(one scale per {FP8_BLOCK} channels).")
        want = (q.shape[0], h // FP8_BLOCK)
        if scales.shape != want or scales.dtype != np.dtype(jnp.float32):
            raise ValueError(f"jax_ep.{op}: FP8 scales must be float32 {want} (one per "
                             f"{FP8_BLOCK} channels of each token), got {scales.dtype} {scales.shape}.")
        return [q, scales], True
    dense(x, op)
    return [x], False


def capacity(cap, num_ranks, num_tokens, op):
    if cap is None:
        return num_ranks * num_tokens
    if not isinstance(cap, (int, np.integer)) or isinstance(cap, bool) or cap <= 0:
        raise ValueError(f"jax_ep.{op}: capacity must be a positive static int (rows of the "
                         f"receive buffer) or None for the overflow-free default R * T = "
                         f"{num_ranks * num_tokens}; got {cap!r}.")
    return int(cap)


def max_tokens(m, num_tokens, op):
    if not isinstance(m, (int, np.integer)) or isinstance(m, bool) or m <= 0:
        raise ValueError(f"jax_ep.{op}: max_tokens_per_rank must be a positive static int, got {m!r}.")
    if num_tokens > m:
        raise ValueError(f"jax_ep.{op}: this rank has {num_tokens} tokens but "
                         f"max_tokens_per_rank={m}; raise max_tokens_per_rank to at least "
                         f"{num_tokens} (it sizes the per-expert slots, R * M rows each).")
    return int(m)


def low_latency_fp8(x, use_fp8, op):
    if use_fp8 and x.shape[1] % FP8_BLOCK:
        raise ValueError(f"jax_ep.{op}: use_fp8=True needs hidden % {FP8_BLOCK} == 0 (one scale "
                         f"per {FP8_BLOCK} channels); got hidden {x.shape[1]}.")


def low_latency_dispatch_args(x, ids, num_experts, axis_name, max_tokens_per_rank,
                              use_fp8, op):
    """All checks of a low-latency dispatch: (num_experts, int32 ids, M)."""
    num_ranks = axis_size(axis_name, op)
    num_experts = experts(num_experts, num_ranks, op)
    dense(x, op)
    idx = topk_idx(ids, x.shape[0], num_experts, op)
    m = max_tokens(max_tokens_per_rank, x.shape[0], op)
    low_latency_fp8(x, use_fp8, op)
    return num_experts, idx, m


def combine_y(y, expected_shape, op, what):
    """y must have exactly `expected_shape` except its last (hidden) dim."""
    want = tuple(expected_shape) + ("hidden",)
    if y.ndim != len(want) or tuple(y.shape[:-1]) != tuple(expected_shape):
        raise ValueError(f"jax_ep.{op}: y must be {list(want)} ({what}), got shape {y.shape}.")
    if y.dtype not in [np.dtype(d) for d in DENSE_DTYPES]:
        raise TypeError(f"jax_ep.{op}: y has dtype {y.dtype}; supported: {_dtype_names(DENSE_DTYPES)}.")
    _hidden(y.shape[-1], y.dtype.itemsize, op, "y")


_LAYOUT_ROWS = {
    "padded": "local experts x R * max_tokens_per_rank slots",
    "ragged": "N = R * max_tokens_per_rank * min(top_k, local experts) rows, grouped by "
              "local expert",
}


def low_latency_layout(layout, op):
    if not isinstance(layout, str) or layout not in _ragged.LAYOUTS:
        raise ValueError(f"jax_ep.{op}: layout must be 'padded' (recv_x [L, R * M, H], "
                         f"DeepEP's) or 'ragged' (recv_x [N, H], rows grouped by local expert "
                         f"for jax.lax.ragged_dot), got {layout!r}.")
    return layout


def low_latency_y(y, handle, op):
    """y of a low-latency combine: in the layout of the handle's dispatch."""
    shapes = {name: _ragged.leading_shape(name, handle) for name in _ragged.LAYOUTS}
    want = shapes[handle.layout]
    if y.ndim != len(want) + 1 or tuple(y.shape[:-1]) != want:
        other = "ragged" if handle.layout == "padded" else "padded"
        text = lambda name: f"{list(shapes[name]) + ['hidden']} ({_LAYOUT_ROWS[name]})"
        raise ValueError(
            f"jax_ep.{op}: y has shape {y.shape}, but the handle comes from a dispatch with "
            f"layout={handle.layout!r}, which takes y as {text(handle.layout)}; "
            f"layout={other!r} would take {text(other)}. Pass y in the layout the dispatch "
            f"returned recv_x in.")
    combine_y(y, want, op, _LAYOUT_ROWS[handle.layout])
