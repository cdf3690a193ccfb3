"""What the Flax MoE layer runs inside `jax.shard_map`, on one device's tokens.

Pure JAX, no flax: routing with the load-balancing loss, the training /
prefill path (`jax_ep.dispatch` -> `jax_ep.moe.local_experts` ->
`jax_ep.combine`) and the decode path (`jax_ep.low_latency_dispatch` in the
ragged layout -> `jax_ep.moe.ragged_experts` -> `jax_ep.low_latency_combine`).
Every body returns (y [T, H], aux_loss f32[], dropped_rows int32[],
dropped_pairs int32[]), the last three the same on every device.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .. import moe
from .._ops import combine, dispatch, low_latency_combine, low_latency_dispatch


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static settings a body needs (hashable: it is closed over by shard_map)."""

    num_experts: int
    top_k: int
    renormalize: bool
    expert_axis: str
    token_axes: tuple[str, ...]
    capacity_factor: float | None
    backend: str | None
    max_tokens_per_rank: int | None
    decode_fp8: bool
    expert_capacity_factor: float | None = None


def capacity(num_tokens, top_k, num_ranks, factor):
    """Receive rows per device for `jax_ep.dispatch`, T tokens per device.

    None: R * T, the most a device can receive, so nothing is ever dropped.
    Otherwise ceil(factor * T * K), at least 1 and at most R * T. With the
    experts perfectly balanced a device receives at most T * K rows (R senders,
    each sending T * K / R (token, expert) pairs, one row per token and
    destination device), so factor 1.0 drops nothing at balance and the
    factor is the usual per-expert one: L experts x factor * (R * T) * K / E.
    """
    most = num_ranks * num_tokens
    if factor is None:
        return most
    return max(1, min(most, math.ceil(factor * num_tokens * top_k)))


def expert_capacity(num_tokens, top_k, num_local, factor):
    """(row, k) pairs each local expert computes, T tokens per device:
    ceil(factor * T * K / L), at least 1. At balance a device receives T * K
    pairs (its share of all R * T * K), T * K / L per local expert."""
    return max(1, math.ceil(factor * num_tokens * top_k / num_local))


def route(x, router_w, spec):
    """Top-k routing and the Switch / GShard load-balancing loss over all tokens.

    aux = E * sum_e f_e * p_e with f_e the fraction of the N * K routed
    (token, expert) pairs that chose e and p_e the mean router probability of
    e, both over the N tokens of every device (psum over the token axes), so
    it is the loss of the whole batch, 1.0 at perfect balance. f_e carries no
    gradient; p_e does.
    """
    idx, weights, probs = moe.route(x, router_w, spec.top_k, renormalize=spec.renormalize)
    chosen = jax.nn.one_hot(idx, spec.num_experts, dtype=jnp.float32).sum(axis=(0, 1))
    num_tokens = jax.lax.psum(x.shape[0], spec.token_axes)
    chosen = jax.lax.psum(chosen, spec.token_axes) / (num_tokens * spec.top_k)
    mean_prob = jax.lax.psum(probs.sum(axis=0), spec.token_axes) / num_tokens
    aux = spec.num_experts * jnp.sum(chosen * mean_prob)
    return idx, weights, aux


def train(x, router_w, w_gate, w_up, w_down, *, spec):
    """Normal mode: capacity-bounded dispatch, ragged_dot experts, combine."""
    idx, weights, aux = route(x, router_w, spec)
    num_ranks = jax.lax.axis_size(spec.expert_axis)
    cap = capacity(x.shape[0], spec.top_k, num_ranks, spec.capacity_factor)
    recv_x, recv_idx, recv_w, handle = dispatch(
        x, idx, weights, num_experts=spec.num_experts, axis_name=spec.expert_axis,
        capacity=cap, backend=spec.backend)
    if spec.expert_capacity_factor is None:
        y = moe.local_experts(recv_x, recv_idx, recv_w, w_up, w_down, w_gate)
        dropped_pairs = jnp.zeros((), jnp.int32)
    else:
        cap = expert_capacity(x.shape[0], spec.top_k, w_up.shape[0],
                              spec.expert_capacity_factor)
        y = moe.local_experts(recv_x, recv_idx, recv_w, w_up, w_down, w_gate,
                              expert_capacity=cap)
        dropped_pairs = moe.expert_capacity_drops(recv_idx, w_up.shape[0], cap)
    out = combine(y, handle, backend=spec.backend)
    dropped = jax.lax.psum(handle.num_dropped_tokens, spec.token_axes)
    return out, aux, dropped, jax.lax.psum(dropped_pairs, spec.token_axes)


def _dequantize(pair, dtype):
    """(e4m3 [..., H], scales f32 [..., H // 128]) -> [..., H] in dtype."""
    q, scales = pair
    blocks = q.astype(jnp.float32).reshape(*scales.shape, -1) * scales[..., None]
    return blocks.reshape(q.shape).astype(dtype)


def decode(x, router_w, w_gate, w_up, w_down, *, spec):
    """Low-latency mode: the received rows grouped by local expert (the ragged
    layout), the experts through ragged_dot on the real rows only."""
    idx, weights, aux = route(x, router_w, spec)
    # ragged_experts masks the rows past sum(recv_count) itself, so the
    # dispatch need not zero the tail.
    recv_x, recv_count, handle = low_latency_dispatch(
        x, idx, num_experts=spec.num_experts, axis_name=spec.expert_axis,
        max_tokens_per_rank=spec.max_tokens_per_rank or x.shape[0],
        use_fp8=spec.decode_fp8, zero_padding=False, layout="ragged", backend=spec.backend)
    if spec.decode_fp8:
        recv_x = _dequantize(recv_x, x.dtype)
    y = moe.ragged_experts(recv_x, recv_count, w_gate, w_up, w_down)
    out = low_latency_combine(y, idx, weights, handle, backend=spec.backend)
    return out, aux, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)
