"""The public ops: argument checks, backend choice and `custom_vjp` rules.

This is the one place for the math contract of docs/design.md §2. Backends only
move rows; the autodiff rules below are written in terms of the backend's
row-moving primitives, so every backend differentiates the same way:

* dispatch is linear in x and topk_weights: its VJP combines the received
  gradients with the same handle (for the weights, a per-k gather: only the
  owner of expert k has a nonzero entry at position k, so the rank sum picks it).
* combine's VJP dispatches the output gradient, reusing the handle.
* low-latency dispatch's VJP is a low-latency combine with weight 1 on the
  first occurrence of each expert; low-latency combine's VJP dispatches the
  output gradient scaled by each slot's summed weight, and gathers rows for
  the weights' gradient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from . import _backend, _checks, _inflight, _reference, _topology, cuda
from ._handles import DispatchHandle, LowLatencyHandle


@dataclasses.dataclass(frozen=True)
class _Config:
    num_experts: int
    axis_name: object
    size: int  # capacity (normal mode) or max_tokens_per_rank (low-latency mode)
    backend: str | None
    use_fp8: bool = False
    zero_padding: bool = True  # low-latency dispatch: zero the rows past recv_count
    ranks_per_node: int | None = None  # normal mode: G when the EP axis is N > 1 nodes
    layout: str = "padded"  # low-latency dispatch: "padded" or "ragged" receive rows


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------


def get_dispatch_layout(topk_idx, *, num_experts, num_ranks, backend=None):
    """Per-rank and per-expert token counts of this rank's routing (local only).

    Args:
      topk_idx: int [T, K] global expert ids; -1 = no expert; ids outside
        [-1, E) are ignored.
      num_experts: E, divisible by num_ranks.
      num_ranks: R, the EP size.

    Returns:
      (num_tokens_per_rank int32[R], num_tokens_per_expert int32[E],
       is_token_in_rank bool[T, R]). A token counts once per rank however many
      of its experts live there.
    """
    if not isinstance(num_ranks, (int,)) or num_ranks <= 0:
        raise ValueError(f"jax_ep.get_dispatch_layout: num_ranks must be a positive int, got {num_ranks!r}.")
    num_experts = _checks.experts(num_experts, num_ranks, "get_dispatch_layout")
    idx = _checks.topk_idx(jnp.asarray(topk_idx), None, num_experts, "get_dispatch_layout")
    kw = dict(num_experts=num_experts, num_ranks=num_ranks)
    fn = _backend.select("get_dispatch_layout", backend,
                         functools.partial(_reference.get_dispatch_layout, **kw),
                         functools.partial(cuda.layout.get_dispatch_layout, **kw))
    return tuple(fn(idx))


# --------------------------------------------------------------------------
# Normal mode
# --------------------------------------------------------------------------


def _node_backend(backend, op, ranks_per_node):
    """The backend for an op under a node grouping (N > 1 nodes): the CUDA internode
    kernels where initialize set them up; else "auto" takes the reference (the
    intranode kernels would sum in plain rank order) and "cuda" refuses."""
    if ranks_per_node is None or cuda.internode.ready():
        return backend
    if (backend if backend is not None else _backend.default_backend()) == "cuda":
        raise NotImplementedError(
            f"jax_ep.{op}: backend='cuda' runs the node tree of initialize(ranks_per_node="
            f"{ranks_per_node}) only with the internode kernels, which are not set up in this "
            f"process ({cuda.internode.SETUP_HINT}); use backend='reference' or 'auto'.")
    return "reference"


def _dispatch_rows(cfg):
    """The chosen backend's cached dispatch: ([T, ...] parts, handle) -> [capacity, ...]."""
    return _backend.select("dispatch", cfg.backend, _reference.dispatch_rows,
                           cuda.normal.dispatch_rows)


def _combine_rows(cfg):
    """The chosen backend's combine: ([capacity, ...] parts, handle) -> [T, ...]."""
    return _backend.select("combine", cfg.backend, _reference.combine_rows,
                           cuda.normal.combine_rows)


def dispatch(x, topk_idx, topk_weights, *, num_experts, axis_name, capacity=None,
             backend=None):
    """Send each token to the ranks holding its top-k experts (inside shard_map).

    Args:
      x: [T, H] bfloat16 / float16 / float32, or an FP8 pair
        (x_e4m3 float8_e4m3fn [T, H], scales float32 [T, H // 128]).
      topk_idx: int [T, K] global expert ids, -1 = none; ids outside [-1, E)
        are treated as -1 and counted in `handle.num_invalid_experts`.
      topk_weights: float [T, K] (computed in float32).
      num_experts: E; expert e lives on rank e // (E // R).
      axis_name: the EP mesh axis of the enclosing shard_map.
      capacity: static rows of the receive buffer; default R * T (never overflows).
      backend: "reference", "cuda", "auto" or None (the default set by initialize).

    Returns:
      recv_x [capacity, H] (same dtype, or FP8 pair), recv_topk_idx int32
      [capacity, K] (local expert ids or -1), recv_topk_weights float32
      [capacity, K] (0 where the id is -1), handle (DispatchHandle).
      Rows are ordered by source rank, then source token; rows past
      handle.num_recv_tokens are zero / -1 / 0; rows past capacity are dropped
      (counted in handle.num_dropped_tokens) and contribute zero in combine.
      Under initialize(ranks_per_node=G) with R / G > 1 nodes the handle
      records G, and its combine (this op's VJP too) follows the node tree.
    """
    op = "dispatch"
    num_ranks = _checks.axis_size(axis_name, op)
    num_experts = _checks.experts(num_experts, num_ranks, op)
    parts, is_fp8 = _checks.dispatch_x(x, op)
    num_tokens = parts[0].shape[0]
    idx = _checks.topk_idx(topk_idx, num_tokens, num_experts, op)
    w = _checks.topk_weights(topk_weights, idx.shape, op)
    cap = _checks.capacity(capacity, num_ranks, num_tokens, op)
    ranks_per_node = _topology.ranks_per_node(num_ranks, op)
    cfg = _Config(num_experts, axis_name, cap, _node_backend(backend, op, ranks_per_node),
                  ranks_per_node=ranks_per_node)
    recv_parts, recv_idx, recv_w, handle = _dispatch(tuple(parts), idx, w, cfg)
    recv_x = tuple(recv_parts) if is_fp8 else recv_parts[0]
    return recv_x, recv_idx, recv_w, handle


def _dispatch_impl(parts, idx, w, cfg):
    kw = dict(num_experts=cfg.num_experts, axis_name=cfg.axis_name, capacity=cfg.size)
    fn = _backend.select("dispatch", cfg.backend,
                         functools.partial(_reference.dispatch, **kw,
                                           ranks_per_node=cfg.ranks_per_node),
                         functools.partial(cuda.normal.dispatch, **kw))
    return fn(list(parts), idx, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _dispatch(parts, idx, w, cfg):
    recv_parts, recv_idx, recv_w, handle = _dispatch_impl(parts, idx, w, cfg)
    return tuple(recv_parts), recv_idx, recv_w, handle


def _dispatch_fwd(parts, idx, w, cfg):
    recv_parts, recv_idx, recv_w, handle = _dispatch_impl(parts, idx, w, cfg)
    return (tuple(recv_parts), recv_idx, recv_w, handle), (handle, recv_idx)


def _dispatch_bwd(cfg, residuals, cotangents):
    handle, recv_idx = residuals
    ct_parts, _, ct_w, _ = cotangents
    ct_w = jnp.where(recv_idx >= 0, ct_w, 0).astype(jnp.float32)
    *dx, dw = _combine_rows(cfg)(list(ct_parts) + [ct_w], handle)
    return tuple(dx), None, dw


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def combine(y, handle, *, backend=None):
    """Sum each token's expert outputs back on its source rank (inside shard_map).

    Args:
      y: [capacity, H] bfloat16 / float16 / float32, rows as returned by dispatch.
      handle: the DispatchHandle from the matching dispatch.

    Returns:
      [T, H] in y's dtype: out[t] = sum over the ranks r that received t of
      y_r[row of t on r], accumulated in float32 in rank order (unweighted:
      weight and reduce local experts before combine). When the handle
      records several nodes (handle.ranks_per_node), the rows are summed in
      float32 within each node in rank order, each node's partial is rounded
      to y's dtype, and the partials are summed in float32 in node order
      (docs/design.md §2.16).
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"jax_ep.combine: handle must be the DispatchHandle returned by "
                        f"jax_ep.dispatch, got {type(handle).__name__}.")
    _checks.axis_size(handle.axis_name, "combine")
    _checks.combine_y(y, (handle.capacity,), "combine", "capacity rows of the dispatch")
    cfg = _Config(handle.num_experts, handle.axis_name, handle.capacity,
                  _node_backend(backend, "combine", handle.ranks_per_node))
    return _combine(y, handle, cfg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _combine(y, handle, cfg):
    return _combine_rows(cfg)([y], handle)[0]


def _combine_fwd(y, handle, cfg):
    return _combine(y, handle, cfg), handle


def _combine_bwd(cfg, handle, ct):
    return _dispatch_rows(cfg)([ct], handle)[0], None


_combine.defvjp(_combine_fwd, _combine_bwd)


# --------------------------------------------------------------------------
# Low-latency mode
# --------------------------------------------------------------------------


def low_latency_dispatch(x, topk_idx, *, num_experts, axis_name, max_tokens_per_rank,
                         use_fp8=False, zero_padding=True, layout="padded", backend=None):
    """Decode-style dispatch into static per-expert slots (inside shard_map).

    Args:
      x: [T, H] bfloat16 / float16 / float32, T <= max_tokens_per_rank.
      topk_idx: int [T, K] global expert ids (-1 = none; bad ids are counted).
      max_tokens_per_rank: M, static; every local expert gets R * M rows.
      use_fp8: cast to float8_e4m3fn with one float32 scale per 128 channels
        (scale = max(amax, 1e-4) * float32(1/448), q = x / scale). Not differentiable.
      zero_padding: zero the rows past recv_count (default). False leaves them
        unspecified, as DeepEP does: recv_x is L * R * M rows (E * M * H
        elements, 470 MB in bf16 at DeepEP's decode setting), and zeroing it
        costs more than the dispatch itself on the cuda backend. Only pass
        False when nothing reads those rows: no reductions over all of recv_x,
        and no gradients through weights applied to them (0 * NaN = NaN).
        The reference backend always zeroes.
      layout: "padded" (default, DeepEP's) or "ragged" (below); the handle
        records it and low_latency_combine takes y in it.

    Returns:
      recv_x, recv_count int32[L], handle (LowLatencyHandle).

      layout="padded": recv_x [L, R * M, H] (or the pair (e4m3 [L, R*M, H],
      scales [L, R*M, H // 128])). For local expert l, rows [0, recv_count[l])
      are the tokens routed to it, ordered by (source rank, source token); a
      token naming an expert twice occupies one row. Other rows are zero (see
      zero_padding).

      layout="ragged": recv_x [N, H] (or the pair ([N, H], [N, H // 128])),
      N = R * M * min(K, L): exactly the valid rows of the padded layout,
      concatenated in local expert order, so recv_count doubles as the
      group_sizes of jax.lax.ragged_dot(recv_x, w [L, H, F], recv_count).
      N never overflows: a source token sends one row per distinct expert it
      names on this rank, at most min(K, L) (K ids, L experts here), and each
      of the R sources has at most M tokens. Rows past sum(recv_count) are
      zero (unspecified with zero_padding=False).
    """
    num_experts, idx, m = _checks.low_latency_dispatch_args(
        x, topk_idx, num_experts, axis_name, max_tokens_per_rank, use_fp8,
        "low_latency_dispatch")
    layout = _checks.low_latency_layout(layout, "low_latency_dispatch")
    cfg = _Config(num_experts, axis_name, m, backend, bool(use_fp8), bool(zero_padding),
                  layout=layout)
    _count_in_flight("low_latency_dispatch", backend)
    recv_parts, recv_count, handle = _ll_dispatch(x, idx, cfg)
    recv_x = tuple(recv_parts) if use_fp8 else recv_parts[0]
    return recv_x, recv_count, handle


def _ll(cfg, name):
    """The chosen backend's low-latency primitive `name` (same signature in both)."""
    op = "low_latency_dispatch" if "dispatch" in name else "low_latency_combine"
    return _backend.select(op, cfg.backend, getattr(_reference, name),
                           getattr(cuda.low_latency, name))


def _count_in_flight(op, backend):
    """A CUDA low-latency op takes a buffer set: count it in the caller's trace
    (before custom_vjp, whose body is traced apart)."""
    if _backend.resolve(backend, op) == "cuda":
        _inflight.issue(op)


def _ll_dispatch_impl(x, idx, cfg):
    dispatch = functools.partial(
        _ll(cfg, "low_latency_dispatch"), num_experts=cfg.num_experts,
        axis_name=cfg.axis_name, max_tokens_per_rank=cfg.size, use_fp8=cfg.use_fp8,
        zero_padding=cfg.zero_padding, layout=cfg.layout)
    recv, count, handle = dispatch(x, idx)
    return tuple(recv), count, handle


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ll_dispatch(x, idx, cfg):
    return _ll_dispatch_impl(x, idx, cfg)


def _ll_dispatch_fwd(x, idx, cfg):
    out = _ll_dispatch_impl(x, idx, cfg)
    return out, out[2]


def _first_expert_weights(handle):
    """1.0 on the first k naming each expert of a token, 0 elsewhere."""
    rows = handle.num_ranks * handle.max_tokens_per_rank * (handle.num_experts // handle.num_ranks)
    key = jnp.where(handle.owner >= 0, handle.owner * rows + handle.slot, -1)
    return _reference.first_occurrence(key).astype(jnp.float32)


def _ll_dispatch_bwd(cfg, handle, cotangents):
    if cfg.use_fp8:
        raise TypeError("jax_ep.low_latency_dispatch: use_fp8=True is not differentiable "
                        "(the FP8 cast has no useful gradient); dispatch in bf16 for training.")
    ct_recv = cotangents[0][0]
    dx = _ll(cfg, "low_latency_combine")(ct_recv, _first_expert_weights(handle), handle)
    return dx, None


_ll_dispatch.defvjp(_ll_dispatch_fwd, _ll_dispatch_bwd)


def low_latency_combine(y, topk_idx, topk_weights, handle, *, backend=None):
    """Weighted return of expert outputs from their slots (inside shard_map).

    Args:
      y: bfloat16 / float16 / float32 expert outputs in the layout of the
        dispatch (handle.layout), rows as it returned them: [L, R * M, H]
        padded, [N, H] ragged (rows past recv_count, or past sum(recv_count),
        are not read).
      topk_idx, topk_weights: this rank's [T, K] routing, as passed to dispatch.
      handle: the LowLatencyHandle from that dispatch.

    Returns:
      [T, H] in y's dtype: sum over k (in order) of w[t, k] * y[slot of (t, k)],
      accumulated in float32; invalid ids contribute nothing.
    """
    op = "low_latency_combine"
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"jax_ep.{op}: handle must be the LowLatencyHandle returned by "
                        f"jax_ep.low_latency_dispatch, got {type(handle).__name__}.")
    _checks.axis_size(handle.axis_name, op)
    _checks.low_latency_y(y, handle, op)
    idx = _checks.topk_idx(topk_idx, handle.slot.shape[0], handle.num_experts, op)
    if idx.shape != handle.slot.shape:
        raise ValueError(f"jax_ep.{op}: topk_idx has shape {idx.shape} but the dispatch "
                         f"used {handle.slot.shape}; pass the same routing to both.")
    w = _checks.topk_weights(topk_weights, idx.shape, op)
    cfg = _Config(handle.num_experts, handle.axis_name, handle.max_tokens_per_rank, backend)
    _count_in_flight(op, backend)
    return _ll_combine(y, w, handle, cfg)


def _ll_combine_impl(y, w, handle, cfg):
    return _ll(cfg, "low_latency_combine")(y, w, handle)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ll_combine(y, w, handle, cfg):
    return _ll_combine_impl(y, w, handle, cfg)


def _ll_combine_fwd(y, w, handle, cfg):
    return _ll_combine_impl(y, w, handle, cfg), (y, w, handle)


def _ll_combine_bwd(cfg, residuals, ct):
    y, w, handle = residuals
    rows = _ll(cfg, "low_latency_gather_rows")(y, handle).astype(jnp.float32)  # [T, K, H]
    dw = jnp.einsum("th,tkh->tk", ct.astype(jnp.float32), rows,
                    precision=jax.lax.Precision.HIGHEST)
    dy = _ll(cfg, "low_latency_dispatch_rows")([ct], handle, w)[0]
    return dy.astype(y.dtype), dw, None


_ll_combine.defvjp(_ll_combine_fwd, _ll_combine_bwd)
