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

    Node grouping (docs/design.md §2.16): `ranks_per_node` (static) is G when
    the dispatch ran with N = R / G > 1 nodes (rank r = n * G + g), else None;
    combine then sums in the node tree. The three fields below are None
    unless the handle was made with N > 1 nodes (all int32, pre-drop:
    capacity does not change them). This rank is me = (n_me, g_me).
      node_slot: [T, N] position of local token t among this rank's tokens sent
        to node n, in token order (0, 1, ...), or -1 when t is not sent to
        node n. A token is sent to node n when any of its valid experts lives
        on a rank of node n.
      relay_pos: [N, T, G] this rank relays, for each source node n, the tokens
        that source rank s = n * G + g_me sends to node n_me. Row j of
        relay_pos[n] is the j-th such token (token order); relay_pos[n, j, g']
        = that token's pre-drop slot on rank n_me * G + g' (the source's
        routing slot column for that rank, i.e. its position among the tokens
        s sends to that rank), or -1 when the token has no expert on that
        rank. Rows j >= relay_rows[n] are all -1.
      relay_rows: [N] how many tokens source rank n * G + g_me sends to node n_me.
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
    ranks_per_node: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    node_slot: jax.Array | None = None
    relay_pos: jax.Array | None = None
    relay_rows: jax.Array | None = None

    @property
    def num_ranks(self) -> int:
        return self.rank_counts.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.token_slot.shape[0]

    @property
    def num_nodes(self) -> int:
        """N: 1 unless the dispatch grouped the ranks into several nodes."""
        return 1 if self.ranks_per_node is None else self.num_ranks // self.ranks_per_node


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

    The internal rows are those of the padded layout whatever `layout` is; a
    ragged row is the padded row (l, p) moved to start[l] + p, with start the
    exclusive prefix sum of recv_count (`_ragged`).

    Static: `layout` is the receive layout of the dispatch, "padded"
    ([L, R * M, H]) or "ragged" ([N, H], rows grouped by local expert), which
    low_latency_combine's y must follow (docs/design.md §2.6).
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
    layout: str = dataclasses.field(default="padded", metadata=dict(static=True))

    @property
    def num_ranks(self) -> int:
        return self.recv_row.shape[0]

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def rows_per_expert(self) -> int:
        """R * M: the padded layout's rows per local expert."""
        return self.num_ranks * self.max_tokens_per_rank

    @property
    def ragged_rows(self) -> int:
        """N = R * M * min(K, L): the ragged layout's static row count. No rank
        receives more: a source token sends one row per distinct expert it names
        on that rank, at most min(K, L) (K ids, L experts there), and each of
        the R sources has at most M tokens."""
        return self.rows_per_expert * min(self.slot.shape[1], self.num_local_experts)


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
