"""The pure-JAX backend: capacity-padded `lax.all_to_all` plus index arithmetic.

Runs everywhere (it is what CPU runs) and is the baseline every benchmark
reports. Every function here is called inside `shard_map` on local shards and
implements docs/design.md §2 exactly; argument checking lives in `_checks`.

Data paths are written as gathers with precomputed indices (never scatters
with colliding indices), so results are bitwise deterministic, and no Python
loop runs over tokens.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from . import _ragged
from ._handles import LowLatencyHandle
from ._routing import (bincount, exclusive_cumsum, handle_from_counts, localize, route,
                       token_in_rank, valid_ids)

# Above this many ranks the rank-ordered sums run as a loop instead of unrolled.
_UNROLL_RANKS = 32


def get_dispatch_layout(topk_idx, *, num_experts, num_ranks):
    idx, _ = valid_ids(topk_idx, num_experts)
    is_token_in_rank = token_in_rank(idx, num_ranks, num_experts // num_ranks)
    num_tokens_per_rank = jnp.sum(is_token_in_rank, axis=0, dtype=jnp.int32)
    num_tokens_per_expert = bincount(idx, num_experts)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


def _rank_ordered_sum(num_ranks, term, unroll=None):
    """sum_r term(r) in float32, accumulated in rank order (bitwise stable)."""
    if unroll is None:
        unroll = num_ranks <= _UNROLL_RANKS
    if unroll:
        acc = term(0)
        for r in range(1, num_ranks):
            acc = acc + term(r)
        return acc
    return lax.fori_loop(1, num_ranks, lambda r, acc: acc + term(r), term(0))


def _node_tree_sum(num_ranks, ranks_per_node, term, dtype):
    """docs/design.md §2.16: float32 within each node in rank order, each node's
    partial rounded to `dtype`, then float32 over the nodes in node order."""
    unroll = num_ranks <= _UNROLL_RANKS

    def node(n):
        partial = _rank_ordered_sum(
            ranks_per_node, lambda g: term(n * ranks_per_node + g), unroll)
        # The barrier keeps XLA from folding the f32 -> dtype -> f32 pair away
        # (allowed excess precision does that on GPU): the rounding is the contract.
        return lax.optimization_barrier(partial.astype(dtype)).astype(jnp.float32)

    return _rank_ordered_sum(num_ranks // ranks_per_node, node, unroll)


# --------------------------------------------------------------------------
# Normal mode: dispatch / combine
# --------------------------------------------------------------------------


def make_dispatch_handle(topk_idx, *, num_experts, axis_name, capacity, ranks_per_node=None):
    """Routing + count exchange (an all_gather): everything but moving rows."""
    routing = route(topk_idx, num_experts, lax.axis_size(axis_name))
    rank_counts = lax.all_gather(routing.sent, axis_name)  # [R src, R dst]
    handle = handle_from_counts(routing, rank_counts, num_experts=num_experts,
                                axis_name=axis_name, capacity=capacity,
                                ranks_per_node=ranks_per_node)
    return routing, handle


def _receive_rows(handle):
    """For each output row: (flat index into the [R * T] receive buffer, valid)."""
    me = lax.axis_index(handle.axis_name)
    num_tokens = handle.num_tokens
    counts_in = handle.rank_counts[:, me]
    starts = exclusive_cumsum(counts_in)
    rows = jnp.arange(handle.capacity, dtype=jnp.int32)
    src = jnp.searchsorted(starts, rows, side="right").astype(jnp.int32) - 1
    flat = src * num_tokens + (rows - starts[src])
    return flat, rows < handle.num_recv_tokens


def _send_token_index(handle):
    """[R, T] local token index for slot j towards rank r; T marks empty slots."""
    num_tokens, num_ranks = handle.token_slot.shape
    ranks = jnp.broadcast_to(jnp.arange(num_ranks, dtype=jnp.int32)[None, :],
                             handle.token_slot.shape)
    tokens = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None],
                              handle.token_slot.shape)
    slot = jnp.where(handle.token_slot >= 0, handle.token_slot, num_tokens)
    return (
        jnp.full((num_ranks, num_tokens), num_tokens, jnp.int32)
        .at[ranks, slot]
        .set(tokens, mode="drop", unique_indices=True)
    )


def dispatch_rows(parts, handle):
    """Move per-token arrays [T, ...] to the receivers' [capacity, ...] rows."""
    send_index = _send_token_index(handle)
    flat, valid = _receive_rows(handle)
    out = []
    for part in parts:
        send = jnp.take(part, send_index, axis=0, mode="fill", fill_value=0)
        recv = lax.all_to_all(send, handle.axis_name, 0, 0, tiled=True)  # [R src, T, ...]
        recv = recv.reshape((-1,) + part.shape[1:])
        rows = jnp.take(recv, jnp.where(valid, flat, recv.shape[0]), axis=0,
                        mode="fill", fill_value=0)
        out.append(rows)
    return out


def combine_rows(parts, handle):
    """Sum each token's rows [capacity, ...] back over ranks, in rank order (or in
    the node tree when the handle has several nodes)."""
    me = lax.axis_index(handle.axis_name)
    num_tokens, num_ranks = handle.token_slot.shape
    counts_in = handle.rank_counts[:, me]
    starts = exclusive_cumsum(counts_in)
    j = jnp.arange(num_tokens, dtype=jnp.int32)
    rows = starts[:, None] + j[None, :]  # [R src, T]
    valid = (j[None, :] < counts_in[:, None]) & (rows < handle.capacity)
    back_index = jnp.where(valid, rows, handle.capacity).reshape(-1)

    slot = handle.token_slot
    out = []
    for part in parts:
        back = jnp.take(part, back_index, axis=0, mode="fill", fill_value=0)
        mine = lax.all_to_all(back, handle.axis_name, 0, 0, tiled=True)
        mine = mine.reshape((num_ranks, num_tokens) + part.shape[1:])

        def term(r, mine=mine):
            s = lax.dynamic_index_in_dim(slot, r, axis=1, keepdims=False)
            rows_r = lax.dynamic_index_in_dim(mine, r, axis=0, keepdims=False)
            picked = jnp.take(rows_r, jnp.where(s >= 0, s, num_tokens), axis=0,
                              mode="fill", fill_value=0)
            return picked.astype(jnp.float32)

        if handle.num_nodes > 1:
            acc = _node_tree_sum(num_ranks, handle.ranks_per_node, term, part.dtype)
        else:
            acc = _rank_ordered_sum(num_ranks, term)
        out.append(acc.astype(part.dtype))
    return out


def dispatch(x_parts, topk_idx, topk_weights, *, num_experts, axis_name, capacity,
             ranks_per_node=None):
    routing, handle = make_dispatch_handle(topk_idx, num_experts=num_experts,
                                           axis_name=axis_name, capacity=capacity,
                                           ranks_per_node=ranks_per_node)
    *recv_parts, recv_idx, recv_w = dispatch_rows(
        list(x_parts) + [routing.idx, topk_weights], handle)
    recv_idx, recv_w, handle = localize(recv_idx, recv_w, handle)
    return recv_parts, recv_idx, recv_w, handle


# --------------------------------------------------------------------------
# Low-latency mode
# --------------------------------------------------------------------------


def fp8_quantize(x):
    """Per-row, per-128-channel e4m3 cast: returns (q [..., H], scales [..., H/128])."""
    blocks = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // 128, 128))
    # NaN does not enter amax (as fmaxf in the kernels): it stays in its own channel
    amax = jnp.max(jnp.where(jnp.isnan(blocks), 0.0, jnp.abs(blocks)), axis=-1)
    scale = jnp.maximum(amax, 1e-4) * jnp.float32(1.0 / 448.0)
    q = jnp.clip(blocks / scale[..., None], -448.0, 448.0).astype(jnp.float8_e4m3fn)
    return q.reshape(x.shape), scale


def make_low_latency_handle(topk_idx, *, num_experts, axis_name, max_tokens_per_rank,
                            layout="padded"):
    """Rows of every (token, expert) pair, from an exchange of per-expert counts
    (padded rows whatever the layout; `_ragged` converts)."""
    num_ranks = lax.axis_size(axis_name)
    me = lax.axis_index(axis_name)
    local_experts = num_experts // num_ranks
    rows_per_expert = num_ranks * max_tokens_per_rank
    idx, num_invalid = valid_ids(topk_idx, num_experts)

    # has[t, e]: token t goes to expert e (once, however often e is listed).
    has = jnp.any(idx[:, :, None] == jnp.arange(num_experts)[None, None, :], axis=1)
    counts = lax.all_gather(jnp.sum(has, axis=0, dtype=jnp.int32), axis_name)  # [R, E]
    before_me = exclusive_cumsum(counts, axis=0)[me]  # [E]
    position = before_me[None, :] + jnp.cumsum(has, axis=0, dtype=jnp.int32) - 1  # [T, E]
    safe_idx = jnp.maximum(idx, 0)
    within = jnp.take_along_axis(position, safe_idx, axis=1)
    slot = jnp.where(idx >= 0, (safe_idx % local_experts) * rows_per_expert + within, -1)
    owner = jnp.where(idx >= 0, idx // local_experts, -1)

    # The receiver's view: every source's rows for the experts that live here.
    all_slot = lax.all_gather(slot, axis_name)  # [R, T, K]
    all_owner = lax.all_gather(owner, axis_name)
    recv_row = jnp.where(all_owner == me, all_slot, -1)

    # Source (s * M + t) of every receive row; a token naming an expert twice
    # writes the same value twice, which is harmless.
    target = jnp.where(recv_row >= 0, recv_row, local_experts * rows_per_expert)
    num_tokens = idx.shape[0]
    source = (jnp.arange(num_ranks, dtype=jnp.int32)[:, None, None] * max_tokens_per_rank
              + jnp.arange(num_tokens, dtype=jnp.int32)[None, :, None])
    recv_src = jnp.full((local_experts * rows_per_expert,), -1, jnp.int32).at[target].set(
        jnp.broadcast_to(source, target.shape), mode="drop")

    totals = jnp.sum(counts, axis=0, dtype=jnp.int32)
    recv_count = lax.dynamic_slice_in_dim(totals, me * local_experts, local_experts)
    return LowLatencyHandle(
        recv_count=recv_count,
        num_invalid_experts=num_invalid,
        owner=owner.astype(jnp.int32),
        slot=slot.astype(jnp.int32),
        recv_row=recv_row.astype(jnp.int32),
        recv_src=recv_src.reshape(local_experts, rows_per_expert),
        num_experts=num_experts,
        max_tokens_per_rank=max_tokens_per_rank,
        axis_name=axis_name,
        layout=layout,
    )


def first_occurrence(rows):
    """[..., K] bool: row is valid and no earlier k names the same row."""
    k = rows.shape[-1]
    same = rows[..., :, None] == rows[..., None, :]  # [..., K, K']
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # k' < k
    return (rows >= 0) & ~jnp.any(same & earlier, axis=-1)


def _ragged_order(handle):
    """[L * R * M] values per padded row -> the same per output row of the
    handle's layout (fill for the ragged tail)."""
    if handle.layout == "padded":
        return lambda per_row, fill: per_row
    index = _ragged.padded_row_of_ragged(handle.recv_count, handle.ragged_rows,
                                         handle.rows_per_expert)
    return lambda per_row, fill: jnp.take(per_row, index, axis=0, mode="fill",
                                          fill_value=fill)


def low_latency_dispatch_rows(parts, handle, row_weights=None):
    """[T, ...] per token -> the receive rows in the handle's layout: [L, R * M, ...]
    per local expert slot, or [N, ...] ragged (tail zero).

    With `row_weights` [T, K], each received row is scaled by the sum of the
    weights of the k that name its expert (the transpose of a weighted combine).
    """
    num_ranks, num_tokens, _ = handle.recv_row.shape
    m = handle.max_tokens_per_rank
    rows = handle.num_local_experts * handle.rows_per_expert
    reorder = _ragged_order(handle)
    lead = _ragged.leading_shape(handle.layout, handle)
    src = reorder(handle.recv_src.reshape(-1), -1)
    # Index into the all-gathered [R * T] tokens; R * T marks an empty row.
    flat_src = jnp.where(src >= 0, (src // m) * num_tokens + src % m, num_ranks * num_tokens)

    row_scale = None
    if row_weights is not None:
        w = lax.all_gather(row_weights.astype(jnp.float32), handle.axis_name)  # [R, T, K]
        same = handle.recv_row[..., :, None] == handle.recv_row[..., None, :]
        w_sum = jnp.sum(jnp.where(same, w[..., None, :], 0.0), axis=-1)
        target = jnp.where(first_occurrence(handle.recv_row), handle.recv_row, rows)
        row_scale = jnp.zeros((rows,), jnp.float32).at[target].set(
            w_sum, mode="drop", unique_indices=True)
        row_scale = reorder(row_scale, 0)

    out = []
    for part in parts:
        gathered = lax.all_gather(part, handle.axis_name)  # [R, T, ...]
        gathered = gathered.reshape((num_ranks * num_tokens,) + part.shape[1:])
        got = jnp.take(gathered, flat_src, axis=0, mode="fill", fill_value=0)
        if row_scale is not None:
            scale = row_scale.reshape(row_scale.shape + (1,) * (part.ndim - 1))
            got = (got.astype(jnp.float32) * scale).astype(part.dtype)
        out.append(got.reshape(lead + part.shape[1:]))
    return out


def low_latency_gather_rows(y, handle):
    """Expert outputs in the handle's layout ([L, R * M, H] or [N, H]) -> [T, K, H]:
    each (t, k)'s row, 0 if invalid."""
    if handle.layout == "ragged":
        flat = y
        recv_row = _ragged.ragged_of_flat(handle.recv_row, handle.recv_count,
                                          handle.rows_per_expert)
    else:
        flat = y.reshape((-1,) + y.shape[2:])
        recv_row = handle.recv_row
    back = jnp.take(flat, jnp.where(recv_row >= 0, recv_row, flat.shape[0]),
                    axis=0, mode="fill", fill_value=0)  # [R src, T, K, H]
    mine = lax.all_to_all(back, handle.axis_name, 0, 0, tiled=True)  # [R owner, T, K, H]
    owner = jnp.maximum(handle.owner, 0)[None, :, :, None]
    picked = jnp.take_along_axis(mine, owner, axis=0)[0]
    return jnp.where((handle.owner >= 0)[:, :, None], picked, 0)


def low_latency_dispatch(x, topk_idx, *, num_experts, axis_name, max_tokens_per_rank,
                         use_fp8, zero_padding=True, layout="padded"):
    del zero_padding  # rows past the count are always zero here
    handle = make_low_latency_handle(topk_idx, num_experts=num_experts, axis_name=axis_name,
                                     max_tokens_per_rank=max_tokens_per_rank, layout=layout)
    parts = list(fp8_quantize(x)) if use_fp8 else [x]
    recv = low_latency_dispatch_rows(parts, handle)
    return recv, handle.recv_count, handle


def low_latency_combine(y, topk_weights, handle):
    """sum_k w[t, k] * y[row of (t, k)], float32, in k order (y in the handle's layout)."""
    rows = low_latency_gather_rows(y, handle).astype(jnp.float32)
    w = topk_weights.astype(jnp.float32)
    acc = w[:, 0, None] * rows[:, 0]
    for k in range(1, w.shape[1]):
        acc = acc + w[:, k, None] * rows[:, k]
    return acc.astype(y.dtype)
