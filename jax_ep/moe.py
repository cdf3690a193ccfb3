"""A reference MoE feed-forward layer built on the public API.

router top-k -> `jax_ep.dispatch` -> local experts (rows sorted by local expert,
`jax.lax.ragged_dot`, weighted sum over k) -> `jax_ep.combine`; for decoding,
the experts on a low-latency layout: `padded_experts` (batched matmul over
`[L, R*M, H]`) or `ragged_experts` (`jax.lax.ragged_dot` over
`low_latency_dispatch(layout="ragged")`'s rows, computing only the real ones).

Call `moe_ffn` inside `jax.shard_map` with tokens sharded over the EP axis and
the expert weights sharded over it on their leading (expert) dimension.

On CUDA, XLA lowers `jax.lax.ragged_dot` to a masked dense dot over every
expert unless told otherwise: jit with `compiler_options=CUDA_COMPILER_OPTIONS`
(cuDNN's grouped GEMM) so the experts compute only their rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._ops import combine, dispatch
from ._routing import exclusive_cumsum

# jax.jit compiler options for the functions that use these helpers on CUDA:
# ragged_dot through cuDNN's grouped GEMM instead of XLA's default masked dense
# dot over every group (L times the work for L local experts).
CUDA_COMPILER_OPTIONS = {"xla_gpu_experimental_use_ragged_dot_fusion": True}


def route(x, router_w, top_k, *, renormalize=True):
    """Softmax router: (topk_idx int32 [T, K], topk_weights f32 [T, K], probs [T, E]).

    renormalize: divide the top-k probabilities by their sum (they add up to
    1); False keeps the raw softmax probabilities (Switch / GShard style).
    """
    logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, idx = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return idx.astype(jnp.int32), weights, probs


def _expert_ffn(matmul, x, w_in, w_out, w_gate):
    """gelu(x @ w_in) @ w_out, or with w_gate the SwiGLU; matmul(x, w) is the
    per-expert product of the caller's layout."""
    h = matmul(x, w_in)
    h = jax.nn.gelu(h) if w_gate is None else jax.nn.silu(matmul(x, w_gate)) * h
    return matmul(h.astype(w_out.dtype), w_out)


def local_experts(recv_x, recv_idx, recv_w, w_in, w_out, w_gate=None, *,
                  expert_capacity=None):
    """Run the L local experts on the received rows and reduce over k.

    recv_x [N, H], recv_idx [N, K] local ids (-1 = none), recv_w [N, K];
    w_in [L, H, F], w_out [L, F, H]. Each expert is gelu(x @ w_in) @ w_out, or
    with w_gate [L, H, F] the SwiGLU (silu(x @ w_gate) * (x @ w_in)) @ w_out.
    Returns [N, H]: sum_k w * expert_k(row).

    expert_capacity: None works on N * K row slots, enough for every (row, k)
    pair; most are empty when rows name few local experts (at 8 ranks and
    top-8, about 7 in 8). An int C works on L * C slots: each expert takes its
    first C pairs in row order, a pair past them contributes nothing
    (`expert_capacity_drops` counts them). A capacity of factor * N_pairs / L,
    N_pairs the pairs expected per rank, is the usual choice.
    """
    if expert_capacity is not None:
        return _capped_local_experts(recv_x, recv_idx, recv_w, w_in, w_out, w_gate,
                                     int(expert_capacity))
    n, k = recv_idx.shape
    num_local = w_in.shape[0]
    expert = jnp.where(recv_idx >= 0, recv_idx, num_local).reshape(-1)  # -1 sorts last
    order = jnp.argsort(expert, stable=True)
    rows = jnp.take(recv_x, order // k, axis=0)
    group_sizes = jnp.bincount(expert, length=num_local + 1)[:num_local].astype(jnp.int32)
    matmul = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes)
    out = _expert_ffn(matmul, rows, w_in, w_out, w_gate)  # padding rows -> 0
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    per_k = unsorted.reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("nk,nkh->nh", recv_w, per_k).astype(recv_x.dtype)


def _pair_slots(recv_idx, num_local, capacity):
    """For each (row, k) pair (flattened n * K + k), its slot among the L * C
    capped slots (experts one after the other, each its first C pairs in row
    order), or L * C when it has no expert or is past its expert's capacity;
    and the slots filled per expert."""
    expert = jnp.where(recv_idx >= 0, recv_idx, num_local).reshape(-1)
    order = jnp.argsort(expert, stable=True)
    sorted_expert = expert[order]
    counts = jnp.bincount(expert, length=num_local + 1)[:num_local].astype(jnp.int32)
    start = exclusive_cumsum(counts)
    clamped = jnp.minimum(sorted_expert, num_local - 1)
    pos = jnp.arange(expert.shape[0], dtype=jnp.int32) - start[clamped]
    kept = (sorted_expert < num_local) & (pos < capacity)
    filled = jnp.minimum(counts, capacity)
    slot_sorted = jnp.where(kept, exclusive_cumsum(filled)[clamped] + pos, num_local * capacity)
    slot = jnp.zeros_like(slot_sorted).at[order].set(slot_sorted, unique_indices=True)
    return slot, filled


def expert_capacity_drops(recv_idx, num_local, capacity):
    """int32 []: the (row, k) pairs `local_experts(..., expert_capacity=capacity)`
    leaves out (pairs past their expert's first `capacity`)."""
    expert = jnp.where(recv_idx >= 0, recv_idx, num_local).reshape(-1)
    counts = jnp.bincount(expert, length=num_local + 1)[:num_local]
    return jnp.sum(jnp.maximum(counts - capacity, 0)).astype(jnp.int32)


def _capped_local_experts(recv_x, recv_idx, recv_w, w_in, w_out, w_gate, capacity):
    n, k = recv_idx.shape
    num_local = w_in.shape[0]
    slots = num_local * capacity
    slot, filled = _pair_slots(recv_idx, num_local, capacity)
    # The row of each slot (n for an empty one, which reads as zeros): kept
    # slots are distinct, the rest fall out of bounds and are dropped.
    src = jnp.full((slots,), n, jnp.int32).at[slot].set(
        jnp.arange(n * k, dtype=jnp.int32) // k, mode="drop")
    rows = jnp.take(recv_x, src, axis=0, mode="fill", fill_value=0)
    matmul = functools.partial(jax.lax.ragged_dot, group_sizes=filled)
    out = _expert_ffn(matmul, rows, w_in, w_out, w_gate)  # empty slots -> 0
    pair_slot = slot.reshape(n, k)
    acc = jnp.zeros((n, out.shape[-1]), jnp.float32)
    for j in range(k):  # k order, in fp32: deterministic, [N, H] at a time
        part = jnp.take(out, pair_slot[:, j], axis=0, mode="fill", fill_value=0)
        acc = acc + recv_w[:, j, None].astype(jnp.float32) * part.astype(jnp.float32)
    return acc.astype(recv_x.dtype)


def padded_experts(recv_x, recv_count, w_in, w_out, w_gate=None):
    """Run the L local experts on the low-latency layout: one batched matmul.

    recv_x [L, S, H] (S = R * M slots per local expert, as
    `jax_ep.low_latency_dispatch` returns them), recv_count int32 [L]; weights
    as in `local_experts`. Rows past recv_count[l] are masked to zero before
    the matmul, so they may hold anything (zero_padding=False) and come out
    zero. Returns [L, S, H] in recv_x's dtype, ready for low_latency_combine.
    """
    valid = jnp.arange(recv_x.shape[1])[None, :] < recv_count[:, None]
    x = jnp.where(valid[..., None], recv_x, jnp.zeros((), recv_x.dtype))
    out = _expert_ffn(functools.partial(jnp.einsum, "lsi,lio->lso"), x, w_in, w_out, w_gate)
    return out.astype(recv_x.dtype)


def ragged_experts(recv_x, group_sizes, w_gate, w_up, w_down):
    """SwiGLU experts on the ragged low-latency layout, through `jax.lax.ragged_dot`.

    recv_x [N, H] rows grouped by local expert, group_sizes int32 [L] (the
    recv_x and recv_count of `jax_ep.low_latency_dispatch(..., layout="ragged")`);
    w_gate, w_up [L, H, F] and w_down [L, F, H], this EP rank's experts.
    Row i of expert l becomes (silu(x @ w_gate[l]) * (x @ w_up[l])) @ w_down[l].
    Rows past sum(group_sizes) are masked to zero first, so they may hold
    anything (zero_padding=False), and come out zero. Returns [N, H] in
    recv_x's dtype, ready for low_latency_combine.
    """
    valid = jnp.arange(recv_x.shape[0]) < jnp.sum(group_sizes)
    x = jnp.where(valid[:, None], recv_x, jnp.zeros((), recv_x.dtype))
    matmul = functools.partial(jax.lax.ragged_dot, group_sizes=group_sizes)
    out = _expert_ffn(matmul, x, w_up, w_down, w_gate)
    return jnp.where(valid[:, None], out, jnp.zeros((), out.dtype)).astype(recv_x.dtype)


def moe_ffn(x, router_w, w_in, w_out, *, top_k, num_experts, axis_name, capacity=None):
    """MoE FFN over the EP axis: x [T, H] -> ([T, H], aux) with aux a dict of
    load-balancing loss and the handle's counters."""
    idx, weights, probs = route(x, router_w, top_k)
    recv_x, recv_idx, recv_w, handle = dispatch(
        x, idx, weights, num_experts=num_experts, axis_name=axis_name, capacity=capacity)
    y = local_experts(recv_x, recv_idx, recv_w, w_in, w_out)
    out = combine(y, handle)
    # Switch-style load balancing: fraction of routed slots x mean router prob.
    frac = jnp.mean(jax.nn.one_hot(idx, num_experts).sum(1), axis=0) / top_k
    balance = num_experts * jnp.sum(frac * jnp.mean(probs, axis=0))
    aux = dict(balance_loss=balance, dropped=handle.num_dropped_tokens,
               received=handle.num_recv_tokens)
    return out, aux
