"""A reference MoE feed-forward layer built on the public API.

router top-k -> `jax_ep.dispatch` -> local experts (rows sorted by local expert,
`jax.lax.ragged_dot`, weighted sum over k) -> `jax_ep.combine`.

Call `moe_ffn` inside `jax.shard_map` with tokens sharded over the EP axis and
the expert weights sharded over it on their leading (expert) dimension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._ops import combine, dispatch


def route(x, router_w, top_k):
    """Softmax router: (topk_idx int32 [T, K], topk_weights f32 [T, K], probs [T, E])."""
    logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    weights, idx = jax.lax.top_k(probs, top_k)
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return idx.astype(jnp.int32), weights, probs


def local_experts(recv_x, recv_idx, recv_w, w_in, w_out):
    """Run the L local experts on the received rows and reduce over k.

    recv_x [N, H], recv_idx [N, K] local ids (-1 = none), recv_w [N, K];
    w_in [L, H, F], w_out [L, F, H]. Returns [N, H]: sum_k w * expert_k(row).
    """
    n, k = recv_idx.shape
    num_local = w_in.shape[0]
    expert = jnp.where(recv_idx >= 0, recv_idx, num_local).reshape(-1)  # -1 sorts last
    order = jnp.argsort(expert, stable=True)
    rows = jnp.take(recv_x, order // k, axis=0)
    group_sizes = jnp.bincount(expert, length=num_local + 1)[:num_local].astype(jnp.int32)
    h = jax.nn.gelu(jax.lax.ragged_dot(rows, w_in, group_sizes))
    out = jax.lax.ragged_dot(h.astype(w_out.dtype), w_out, group_sizes)  # padding rows -> 0
    unsorted = jnp.zeros_like(out).at[order].set(out, unique_indices=True)
    per_k = unsorted.reshape(n, k, -1).astype(jnp.float32)
    return jnp.einsum("nk,nkh->nh", recv_w, per_k).astype(recv_x.dtype)


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
