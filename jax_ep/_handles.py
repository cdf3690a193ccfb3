"""Handle pytrees returned by dispatch and consumed by combine (and the VJPs).

A handle is a pytree of device arrays plus static metadata: no Python ints that
depend on data, so nothing forces a host sync. Every backend fills the same
fields, so a handle made by one backend can be combined by any other; that is
why a handle does not record which backend made it.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What `combine` and the backward passes need to reverse a `dispatch`.

    Public fields (all int32 device arrays, per rank):
      num_recv_tokens: [] rows of `recv_x` that hold data (<= capacity).
      num_recv_tokens_per_expert: [L] received (token, local expert) pairs.
      num_dropped_tokens: [] rows this rank dropped because capacity was full.
      num_invalid_experts: [] ids in this rank's `topk_idx` outside [-1, E).

    Internal fields:
      token_slot: [T, R] position of local token t among the tokens this rank
        sends to rank r (0, 1, ... in token order), or -1 when t is not sent
        to r or its row was dropped there.
      rank_counts: [R, R] tokens rank s sends to rank r (before dropping),
        identical on every rank. The row of (s, j) on r is
        sum(rank_counts[:s, r]) + j.
    """

    num_recv_tokens: jax.Array
    num_recv_tokens_per_expert: jax.Array
    num_dropped_tokens: jax.Array
    num_invalid_experts: jax.Array
    token_slot: jax.Array
    rank_counts: jax.Array
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    capacity: int = dataclasses.field(metadata=dict(static=True))
    axis_name: object = dataclasses.field(metadata=dict(static=True))

    @property
    def num_ranks(self) -> int:
        return self.rank_counts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_slot.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
    """What `low_latency_combine` and the backward passes need.

    Public fields:
      recv_count: int32[L] valid rows per local expert in `recv_x`.
      num_invalid_experts: int32[] ids in this rank's `topk_idx` outside [-1, E).

    Internal fields (all int32):
      owner: [T, K] rank that holds expert topk_idx[t, k], -1 for an invalid id.
      slot: [T, K] row of (token t, expert topk_idx[t, k]) in the owner's
        receive buffer viewed as [L * R * M] (local expert * R * M + position),
        -1 for an invalid id.
      recv_row: [R, T, K] the same rows seen from the receiver: for source
        rank s, token t and position k, the row when that expert lives on this
        rank, else -1 (the reference backend's combine needs it; the CUDA
        backend leaves it -1, so a low-latency handle is combined by the
        backend that made it).
      recv_src: [L, R * M] source of each receive row, s * M + t, or -1.
    """

    recv_count: jax.Array
    num_invalid_experts: jax.Array
    owner: jax.Array
    slot: jax.Array
    recv_row: jax.Array
    recv_src: jax.Array
    num_experts: int = dataclasses.field(metadata=dict(static=True))
    max_tokens_per_rank: int = dataclasses.field(metadata=dict(static=True))
    axis_name: object = dataclasses.field(metadata=dict(static=True))

    @property
    def num_ranks(self) -> int:
        return self.recv_row.shape[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowLatencyPending:
    """A low-latency op between its send and receive halves (see `_overlap`).

    `arrays` holds the backend's in-flight state (device arrays and handles);
    `meta` is static, hashable information the receive half needs.
    """

    arrays: tuple
    kind: str = dataclasses.field(metadata=dict(static=True))
    backend: str = dataclasses.field(metadata=dict(static=True))
    meta: tuple = dataclasses.field(metadata=dict(static=True))
