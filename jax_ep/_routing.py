"""Backend-neutral index arithmetic of dispatch: routing, handles, local ids.

Every backend routes the same way and builds the same handle from the same
count matrix, so a handle from one backend can drive another. Backends only
differ in how counts and rows travel (XLA collectives or FFI kernels).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from ._handles import DispatchHandle


def valid_ids(topk_idx, num_experts):
    """Ids in [0, E) stay, everything else becomes -1; also count bad ids."""
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    invalid = jnp.sum((~valid) & (topk_idx != -1), dtype=jnp.int32)
    return jnp.where(valid, topk_idx, -1), invalid


def bincount(ids, length):
    """Counts of ids in [0, length); -1 entries are ignored."""
    ids = jnp.where(ids >= 0, ids, length).reshape(-1)
    return jnp.bincount(ids, length=length + 1)[:length].astype(jnp.int32)


def token_in_rank(idx, num_ranks, experts_per_rank):
    """[T, R] bool: some valid expert of token t lives on rank r."""
    dest = jnp.where(idx >= 0, idx // experts_per_rank, -1)
    return jnp.any(dest[:, :, None] == jnp.arange(num_ranks)[None, None, :], axis=1)


def exclusive_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis) - a


@dataclasses.dataclass(frozen=True)
class Routing:
    """This rank's side of a dispatch, before any communication."""
    idx: object          # int32 [T, K] ids with invalid ones set to -1
    num_invalid: object  # int32 []
    slot: object         # int32 [T, R] position among the tokens sent to r, -1 if not sent
    sent: object         # int32 [R] tokens sent to each rank


def route(topk_idx, num_experts, num_ranks):
    idx, num_invalid = valid_ids(topk_idx, num_experts)
    is_in = token_in_rank(idx, num_ranks, num_experts // num_ranks)
    slot = jnp.where(is_in, jnp.cumsum(is_in, axis=0, dtype=jnp.int32) - 1, -1)
    sent = jnp.sum(is_in, axis=0, dtype=jnp.int32)
    return Routing(idx, num_invalid, slot, sent)


def handle_from_counts(routing, rank_counts, *, num_experts, axis_name, capacity,
                       ranks_per_node=None):
    """The DispatchHandle once the [R, R] count matrix is known everywhere.

    With `ranks_per_node` G giving N = R / G > 1 nodes, also the node fields
    (`node_fields`, which exchanges them with an all_gather)."""
    num_ranks = rank_counts.shape[0]
    me = lax.axis_index(axis_name)
    my_offset = exclusive_cumsum(rank_counts, axis=0)[me]  # my first row on each r
    kept = (routing.slot >= 0) & (my_offset[None, :] + routing.slot < capacity)
    total = jnp.sum(rank_counts[:, me])
    num_recv = jnp.minimum(total, capacity).astype(jnp.int32)
    nodes = {}
    if ranks_per_node is not None and ranks_per_node != num_ranks:
        nodes = dict(zip(("node_slot", "relay_pos", "relay_rows"),
                         node_fields(routing, ranks_per_node, axis_name)),
                     ranks_per_node=ranks_per_node)
    return DispatchHandle(
        num_recv_tokens=num_recv,
        num_recv_tokens_per_expert=jnp.zeros((num_experts // num_ranks,), jnp.int32),
        num_dropped_tokens=(total - num_recv).astype(jnp.int32),
        num_invalid_experts=routing.num_invalid,
        token_slot=jnp.where(kept, routing.slot, -1),
        rank_counts=rank_counts,
        num_experts=num_experts,
        capacity=capacity,
        axis_name=axis_name,
        **nodes,
    )


def node_fields(routing, ranks_per_node, axis_name):
    """(node_slot [T, N], relay_pos [N, T, G], relay_rows [N]) of DispatchHandle.

    Each source lists, per destination node, the tokens it sends there in token
    order with their pre-drop slots on that node's ranks; an all_gather brings
    every rank the lists of the sources with its local index.
    """
    num_tokens, num_ranks = routing.slot.shape
    g_size = ranks_per_node
    n_size = num_ranks // g_size
    me = lax.axis_index(axis_name)
    slot = routing.slot.reshape(num_tokens, n_size, g_size)
    in_node = jnp.any(slot >= 0, axis=2)  # [T, N]
    node_slot = jnp.where(in_node, jnp.cumsum(in_node, axis=0, dtype=jnp.int32) - 1, -1)
    sent = jnp.sum(in_node, axis=0, dtype=jnp.int32)  # [N]
    # Row j towards node n is the j-th token in that node (a stable sort puts
    # them first, in token order); rows past sent[n] are -1.
    token_of_row = jnp.argsort(~in_node, axis=0, stable=True)  # [T rows, N]
    lists = jnp.take_along_axis(slot, token_of_row[:, :, None], axis=0)  # [T rows, N, G]
    filled = jnp.arange(num_tokens)[:, None] < sent[None, :]
    lists = jnp.where(filled[:, :, None], lists, -1).transpose(1, 0, 2)  # [N, T, G]

    all_lists = lax.all_gather(lists, axis_name)  # [R src, N dst, T, G]
    all_sent = lax.all_gather(sent, axis_name)  # [R src, N dst]
    sources = jnp.arange(n_size) * g_size + me % g_size  # n * G + g_me
    relay_pos = all_lists[sources, me // g_size]
    relay_rows = all_sent[sources, me // g_size]
    return node_slot.astype(jnp.int32), relay_pos.astype(jnp.int32), relay_rows


def localize(recv_idx, recv_w, handle):
    """Received global ids -> local ids (or -1), weights zeroed where -1; fills
    num_recv_tokens_per_expert."""
    num_ranks = handle.num_ranks
    local_experts = handle.num_experts // num_ranks
    me = lax.axis_index(handle.axis_name)
    local = recv_idx - me * local_experts
    filled = (jnp.arange(handle.capacity) < handle.num_recv_tokens)[:, None]
    is_local = filled & (recv_idx >= 0) & (local >= 0) & (local < local_experts)
    recv_idx = jnp.where(is_local, local, -1).astype(jnp.int32)
    recv_w = jnp.where(is_local, recv_w, 0).astype(jnp.float32)
    handle = dataclasses.replace(
        handle, num_recv_tokens_per_expert=bincount(recv_idx, local_experts))
    return recv_idx, recv_w, handle
