"""An independent numpy oracle for the jax_ep contract (docs/design.md §2).

Everything here is written from the contract, not from the library: pure
numpy + ml_dtypes, no jax, no import of the rest of jax_ep.  Each function
takes the inputs of *all* ranks (Python lists indexed by rank) and returns the
expected outputs of all ranks (lists indexed by rank), so a test can compare
any backend against it, in one process or spread over many.

Notation: R ranks, T tokens per rank, H hidden, K top-k, E experts,
L = E // R local experts; expert ``e`` lives on rank ``e // L``.  An id is
valid iff ``0 <= id < E``; ``-1`` means "no expert"; any other id is invalid:
it is treated as ``-1`` and counted (``num_invalid_experts``, per sending
rank).

Conventions the oracle fixes (the contract leaves them to the implementer):

* Sums accumulate in float32 starting from ``0.0`` and add the terms in the
  order stated in each docstring; the result is then cast to the output dtype
  (round to nearest even).  ``0.0 + (-0.0) == +0.0``, so a single ``-0.0``
  term comes out as ``+0.0``.
* Terms of invalid / ``-1`` ids are skipped, not multiplied by zero.
* Products ``w * y`` are rounded to float32 before they are added (no fused
  multiply-add); GPU kernels that fuse may differ in the last bit.
* ``num_recv_tokens_per_expert`` counts k entries: a token that lists the
  same expert twice counts twice there (it is still sent once).
* Internode (``ranks_per_node=G``, design §2.16): ranks ``n * G .. n * G + G - 1``
  form node ``n``; normal-mode combine sums within each node in rank order
  (float32 from 0.0), rounds each node's partial to the output dtype, then
  sums the partials in node order (float32 from 0.0) and casts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import ml_dtypes
import numpy as np

__all__ = [
    "FP8_BLOCK",
    "FP8_MAX",
    "FP8_MIN_AMAX",
    "get_dispatch_layout",
    "dispatch",
    "combine",
    "dispatch_weights_grad",
    "internode_traffic",
    "fp8_quantize",
    "fp8_dequantize",
    "low_latency_dispatch",
    "low_latency_combine",
    "low_latency_dispatch_grad_x",
    "low_latency_combine_grad_y",
    "low_latency_combine_grad_w",
    "low_latency_ragged_rows",
    "count_invalid",
    "make_rank_inputs",
    "make_inputs",
]

FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_BLOCK = 128          # channels per FP8 scale
FP8_MAX = 448.0          # largest finite float8_e4m3fn
FP8_MIN_AMAX = 1e-4      # amax floor, so an all-zero block gets a finite scale

_F32 = np.dtype(np.float32)


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _num_local_experts(num_experts: int, num_ranks: int) -> int:
    if num_ranks <= 0:
        raise ValueError(f"num_ranks must be positive, got {num_ranks}")
    if num_experts <= 0 or num_experts % num_ranks:
        raise ValueError(
            f"num_experts ({num_experts}) must be a positive multiple of the "
            f"number of ranks ({num_ranks})")
    return num_experts // num_ranks


def _clean_ids(topk_idx, num_experts: int):
    """Returns (ids with every non-valid entry set to -1 [int64], valid mask,
    number of invalid entries)."""
    idx = np.asarray(topk_idx)
    if idx.ndim != 2:
        raise ValueError(f"topk_idx must be [T, K], got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"topk_idx must be integer, got {idx.dtype}")
    idx = idx.astype(np.int64)
    valid = (idx >= 0) & (idx < num_experts)
    n_invalid = int(np.count_nonzero(~valid & (idx != -1)))
    return np.where(valid, idx, -1), valid, n_invalid


def count_invalid(topk_idx, num_experts: int) -> int:
    """Number of ids in ``topk_idx`` outside ``[-1, num_experts)``."""
    return _clean_ids(topk_idx, num_experts)[2]


def _is_pair(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2


def _check_fp8_pair(q, s):
    q = np.asarray(q)
    s = np.asarray(s)
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"FP8 payload must be float8_e4m3fn, got {q.dtype}")
    if q.shape[-1] % FP8_BLOCK or s.shape != q.shape[:-1] + (q.shape[-1] // FP8_BLOCK,):
        raise ValueError(
            f"FP8 scales shape {s.shape} does not match payload {q.shape}")
    return q, s.astype(np.float32)


@dataclass
class _Ids:
    """The routing inputs of all ranks, cleaned and checked."""
    ids: list           # per source rank: int64 [T, K], non-valid -> -1
    valid: list         # per source rank: bool [T, K]
    owner: list         # per source rank: int64 [T, K], owning rank or -1
    n_invalid: list     # per source rank: int
    R: int
    T: int
    K: int
    E: int
    L: int


def _prepare_ids(topk_idxs: Sequence[Any], num_experts: int) -> _Ids:
    R = len(topk_idxs)
    L = _num_local_experts(num_experts, R)
    ids, valid, owner, n_inv = [], [], [], []
    shape = None
    for s, t_idx in enumerate(topk_idxs):
        clean, ok, n = _clean_ids(t_idx, num_experts)
        if shape is None:
            shape = clean.shape
        elif clean.shape != shape:
            raise ValueError(
                f"rank {s}: topk_idx shape {clean.shape} != rank 0's {shape}")
        ids.append(clean)
        valid.append(ok)
        owner.append(np.where(ok, clean // L, -1))
        n_inv.append(n)
    T, K = shape
    return _Ids(ids, valid, owner, n_inv, R, T, K, num_experts, L)


# --------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------

def get_dispatch_layout(topk_idx, num_experts: int, num_ranks: int):
    """One rank's layout.

    Returns ``(num_tokens_per_rank int32[R], num_tokens_per_expert int32[E],
    is_token_in_rank bool[T, R])``.  A token counts once per rank however
    many of its experts live there; ``num_tokens_per_expert`` counts (t, k)
    pairs (a duplicated expert counts twice).  Invalid ids are ignored.
    """
    L = _num_local_experts(num_experts, num_ranks)
    ids, valid, _ = _clean_ids(topk_idx, num_experts)
    T = ids.shape[0]
    owner = np.where(valid, ids // L, -1)
    is_token_in_rank = np.zeros((T, num_ranks), dtype=bool)
    for r in range(num_ranks):
        is_token_in_rank[:, r] = np.any(owner == r, axis=1)
    num_tokens_per_rank = is_token_in_rank.sum(axis=0).astype(np.int32)
    num_tokens_per_expert = np.bincount(
        ids[valid], minlength=num_experts).astype(np.int32)
    return num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank


# --------------------------------------------------------------------------
# normal mode
# --------------------------------------------------------------------------

@dataclass
class _NormalLayout:
    ids: _Ids
    capacity: int
    recv_src: list      # per receiver: int64 [n_kept], source rank of each row
    recv_tok: list      # per receiver: int64 [n_kept], source token of each row
    dropped: list       # per receiver: int
    send_rows: list     # per source: int32 [T, R], row on each receiver or -1


def _normal_layout(topk_idxs, num_experts: int, capacity) -> _NormalLayout:
    I = _prepare_ids(topk_idxs, num_experts)
    R, T = I.R, I.T
    if capacity is None:
        capacity = R * T
    capacity = int(capacity)
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    in_rank = []
    for s in range(R):
        m = np.zeros((T, R), dtype=bool)
        for r in range(R):
            m[:, r] = np.any(I.owner[s] == r, axis=1)
        in_rank.append(m)

    send_rows = [np.full((T, R), -1, dtype=np.int32) for _ in range(R)]
    recv_src, recv_tok, dropped = [], [], []
    for r in range(R):
        # rows on receiver r: by source rank ascending, then token ascending
        srcs, toks = [], []
        for s in range(R):
            t = np.nonzero(in_rank[s][:, r])[0]
            srcs.append(np.full(t.shape, s, dtype=np.int64))
            toks.append(t.astype(np.int64))
        src = np.concatenate(srcs)
        tok = np.concatenate(toks)
        kept = min(len(src), capacity)
        dropped.append(len(src) - kept)
        src, tok = src[:kept], tok[:kept]
        for row in range(kept):
            send_rows[src[row]][tok[row], r] = row
        recv_src.append(src)
        recv_tok.append(tok)
    return _NormalLayout(I, capacity, recv_src, recv_tok, dropped, send_rows)


def _stack_x(xs, T: int):
    """Stacks per-rank [T, H] arrays (or FP8 pairs) into [R, T, H]."""
    if all(_is_pair(x) for x in xs):
        qs, ss = zip(*(_check_fp8_pair(*x) for x in xs))
        q = np.stack(qs)
        s = np.stack(ss)
        if q.shape[1] != T:
            raise ValueError(f"x has {q.shape[1]} tokens, topk_idx has {T}")
        return (q, s)
    if any(_is_pair(x) for x in xs):
        raise ValueError("either every rank passes an FP8 pair or none does")
    arrs = [np.asarray(x) for x in xs]
    x = np.stack(arrs)
    if x.ndim != 3 or x.shape[1] != T:
        raise ValueError(f"x must be [T={T}, H] per rank, got {arrs[0].shape}")
    if x.dtype not in (np.dtype(np.float32), np.dtype(np.float16),
                       np.dtype(ml_dtypes.bfloat16)):
        raise TypeError(f"x dtype must be float32/float16/bfloat16, got {x.dtype}")
    return x


def dispatch(xs, topk_idxs, topk_weights, num_experts: int, capacity=None):
    """Expected normal-mode dispatch of every rank.

    ``xs[r]`` is ``[T, H]`` (float32 / bfloat16 / float16) or an FP8 pair
    ``(x_e4m3 [T, H], scales float32 [T, H // 128])``.  ``capacity`` defaults
    to ``R * T``.

    Receiver ``r`` gets one row per (source token, destination rank) pair:
    token ``t`` of source ``s`` goes to ``r`` once if any of its valid experts
    lives on ``r``.  Rows are ordered by source rank, then source token; the
    first ``capacity`` are kept, the rest dropped.

    Returns a list (per rank) of dicts:

    * ``recv_x`` ``[capacity, H]`` (or FP8 pair), zero past the kept rows;
    * ``recv_topk_idx`` int32 ``[capacity, K]``: local id ``id - r * L`` where
      the source's id is valid and lives on ``r``, else -1;
    * ``recv_topk_weights`` float32 ``[capacity, K]``: source weight where
      ``recv_topk_idx != -1``, else 0;
    * ``num_recv_tokens`` (int, kept rows), ``num_recv_tokens_per_expert``
      int32 ``[L]`` (k entries per local id over kept rows),
      ``num_dropped_tokens`` (rows dropped at this receiver),
      ``num_invalid_experts`` (invalid ids in this rank's own ``topk_idx``);
    * ``send_rows`` int32 ``[T, R]``: for this rank as a sender, the row of
      its token ``t`` on destination ``r``, or -1 if not sent or dropped.
    """
    lay = _normal_layout(topk_idxs, num_experts, capacity)
    I = lay.ids
    R, T, K, L, cap = I.R, I.T, I.K, I.L, lay.capacity
    if len(xs) != R or len(topk_weights) != R:
        raise ValueError("xs, topk_idxs and topk_weights need one entry per rank")
    x_all = _stack_x(xs, T)
    w_all = np.stack([np.asarray(w, dtype=np.float32) for w in topk_weights])
    if w_all.shape != (R, T, K):
        raise ValueError(f"topk_weights must be [T={T}, K={K}] per rank")

    out = []
    for r in range(R):
        src, tok = lay.recv_src[r], lay.recv_tok[r]
        n = len(src)
        if isinstance(x_all, tuple):
            q_all, s_all = x_all
            q = np.zeros((cap, q_all.shape[2]), dtype=FP8_DTYPE)
            sc = np.zeros((cap, s_all.shape[2]), dtype=np.float32)
            q[:n] = q_all[src, tok]
            sc[:n] = s_all[src, tok]
            recv_x = (q, sc)
        else:
            recv_x = np.zeros((cap, x_all.shape[2]), dtype=x_all.dtype)
            recv_x[:n] = x_all[src, tok]

        recv_idx = np.full((cap, K), -1, dtype=np.int32)
        recv_w = np.zeros((cap, K), dtype=np.float32)
        for row in range(n):
            s, t = src[row], tok[row]
            here = I.owner[s][t] == r
            recv_idx[row] = np.where(here, I.ids[s][t] - r * L, -1)
            recv_w[row] = np.where(here, w_all[s, t], np.float32(0))
        per_expert = np.bincount(recv_idx[:n][recv_idx[:n] >= 0],
                                 minlength=L).astype(np.int32)
        out.append(dict(
            recv_x=recv_x,
            recv_topk_idx=recv_idx,
            recv_topk_weights=recv_w,
            num_recv_tokens=n,
            num_recv_tokens_per_expert=per_expert,
            num_dropped_tokens=lay.dropped[r],
            num_invalid_experts=I.n_invalid[r],
            send_rows=lay.send_rows[r].copy(),
        ))
    return out


def _node_size(num_ranks: int, ranks_per_node):
    """G when the ranks form N = R / G > 1 nodes, else None (plain rank order)."""
    if ranks_per_node is None:
        return None
    g = int(ranks_per_node)
    if g <= 0 or num_ranks % g:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must be a positive divisor "
                         f"of the number of ranks ({num_ranks})")
    return None if g == num_ranks else g


def combine(ys, topk_idxs, num_experts: int, capacity=None, ranks_per_node=None):
    """Expected normal-mode combine.

    ``ys[r]`` is ``[capacity, H]``.  ``out[s][t]`` = the sum over destination
    ranks ``r`` in ascending order that kept token ``t`` of source ``s`` of
    ``ys[r][row of t on r]``, accumulated in float32 from 0.0 and cast to
    ``ys``' dtype.  Tokens sent nowhere (or dropped everywhere) get zeros.
    This is also the transpose of dispatch in ``x``.

    With ``ranks_per_node=G`` (N = R / G > 1 nodes) the sum is a tree: for
    each node ``n`` in order, the rows of its ranks ``n * G + g`` are summed
    in rank order in float32 from 0.0 and the node's partial is rounded to
    ``ys``' dtype; the partials are summed in node order in float32 from 0.0
    and the result cast.  With one node it is the plain sum above.
    """
    lay = _normal_layout(topk_idxs, num_experts, capacity)
    R, T = lay.ids.R, lay.ids.T
    if len(ys) != R:
        raise ValueError("ys needs one entry per rank")
    ys = [np.asarray(y) for y in ys]
    dtype = ys[0].dtype
    H = ys[0].shape[-1]
    for r, y in enumerate(ys):
        if y.shape != (lay.capacity, H) or y.dtype != dtype:
            raise ValueError(
                f"rank {r}: y is {y.shape} {y.dtype}, expected "
                f"({lay.capacity}, {H}) {dtype}")
    G = _node_size(R, ranks_per_node)
    if G is None:
        acc = np.zeros((R, T, H), dtype=np.float32)
        for r in range(R):   # rank order: the accumulation order of the contract
            src, tok = lay.recv_src[r], lay.recv_tok[r]
            # (src, tok) pairs are distinct within one receiver
            acc[src, tok] = acc[src, tok] + ys[r][:len(src)].astype(np.float32)
        return [acc[s].astype(dtype) for s in range(R)]
    out = [np.zeros((T, H), dtype=np.float32) for _ in range(R)]
    with np.errstate(over="ignore"):  # a float16 partial may round to inf, as specified
        for s in range(R):
            for t in range(T):
                for n in range(R // G):
                    partial = np.zeros(H, dtype=np.float32)
                    for r in range(n * G, (n + 1) * G):
                        row = lay.send_rows[s][t, r]
                        if row >= 0:
                            partial = partial + ys[r][row].astype(np.float32)
                    # what crosses the inter-node link: the partial in ys' dtype
                    out[s][t] = out[s][t] + partial.astype(dtype).astype(np.float32)
        return [o.astype(dtype) for o in out]


def dispatch_weights_grad(ct_recv_ws, topk_idxs, num_experts: int,
                          capacity=None, ranks_per_node=None):
    """Transpose of dispatch's map ``topk_weights -> recv_topk_weights``.

    ``dw[s][t, k] = ct_recv_ws[r][row of t on r, k]`` where ``r`` owns the
    valid expert ``topk_idx[s][t, k]`` and kept the token; else 0.
    Returns float32 ``[T, K]`` per rank.

    With ``ranks_per_node=G`` (N > 1 nodes) it is the float32 node tree of
    ``combine``: every rank that kept the token adds its entry (the owner's
    cotangent, 0.0 elsewhere) within its node in rank order from 0.0, then
    the node partials (float32, so not rounded) add in node order from 0.0.
    """
    lay = _normal_layout(topk_idxs, num_experts, capacity)
    I = lay.ids
    cts = [np.asarray(c, dtype=np.float32) for c in ct_recv_ws]
    G = _node_size(I.R, ranks_per_node)
    if G is not None:
        return _weights_grad_tree(cts, lay, G)
    out = []
    for s in range(I.R):
        dw = np.zeros((I.T, I.K), dtype=np.float32)
        for t in range(I.T):
            for k in range(I.K):
                r = I.owner[s][t, k]
                if r < 0:
                    continue
                row = lay.send_rows[s][t, r]
                if row >= 0:
                    dw[t, k] = cts[r][row, k]
        out.append(dw)
    return out


def _weights_grad_tree(cts, lay: _NormalLayout, G: int):
    I = lay.ids
    out = []
    for s in range(I.R):
        dw = np.zeros((I.T, I.K), dtype=np.float32)
        for t in range(I.T):
            for k in range(I.K):
                total = np.float32(0)
                for n in range(I.R // G):
                    partial = np.float32(0)
                    for r in range(n * G, (n + 1) * G):
                        row = lay.send_rows[s][t, r]
                        if row < 0:
                            continue
                        own = I.owner[s][t, k] == r
                        partial = np.float32(partial + (cts[r][row, k] if own else 0))
                    total = np.float32(total + partial)
                dw[t, k] = total
        out.append(dw)
    return out


def internode_traffic(topk_idxs, num_experts: int, ranks_per_node: int):
    """Rows each source rank sends over the inter-node link, per destination node.

    Returns a list (per source rank ``s`` on node ``n_s``) of dicts of int64
    ``[N]`` arrays, zero at ``n_s`` (what stays in the node never crosses):

    * ``node_rows[n]``: tokens of ``s`` with a valid expert on some rank of
      node ``n`` -- each crosses once per node and is forwarded inside it;
    * ``rank_rows[n]``: (token, rank of node ``n``) pairs with a valid expert
      of the token on that rank -- what a scheme without once-per-node
      forwarding sends to other nodes' ranks.

    Counts are before capacity drops; multiply by the row bytes for bytes.
    """
    I = _prepare_ids(topk_idxs, num_experts)
    G = int(ranks_per_node)
    if G <= 0 or I.R % G:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must be a positive divisor "
                         f"of the number of ranks ({I.R})")
    N = I.R // G
    out = []
    for s in range(I.R):
        node_rows = np.zeros(N, dtype=np.int64)
        rank_rows = np.zeros(N, dtype=np.int64)
        for n in range(N):
            if n == s // G:
                continue
            on_rank = np.stack([np.any(I.owner[s] == r, axis=1)
                                for r in range(n * G, (n + 1) * G)], axis=1)  # [T, G]
            node_rows[n] = np.count_nonzero(np.any(on_rank, axis=1))
            rank_rows[n] = np.count_nonzero(on_rank)
        out.append(dict(node_rows=node_rows, rank_rows=rank_rows))
    return out


# --------------------------------------------------------------------------
# FP8
# --------------------------------------------------------------------------

def fp8_quantize(x):
    """Per-row, per-128-channel block FP8 (e4m3fn) quantization.

    ``amax = max |x|`` over the block's non-NaN channels in float32 (a NaN
    stays NaN in its own channel and leaves the block's other channels and
    scale alone; an infinity makes the scale infinite);
    ``scale = max(amax, 1e-4) * float32(1 / 448)`` (float32; a multiply by
    the rounded reciprocal, which is what compilers make of a division by a
    constant, so kernels and XLA agree bit for bit);
    ``q = float8_e4m3fn(clip(x / scale, -448, 448))``, rounding to nearest
    even.  Returns ``(q [..., H], scale float32 [..., H // 128])`` and
    ``x ≈ q * scale``.
    """
    xf = np.asarray(x).astype(np.float32)
    H = xf.shape[-1]
    if H % FP8_BLOCK:
        raise ValueError(f"hidden size {H} is not a multiple of {FP8_BLOCK}")
    blocks = xf.reshape(xf.shape[:-1] + (H // FP8_BLOCK, FP8_BLOCK))
    amax = np.max(np.where(np.isnan(blocks), np.float32(0), np.abs(blocks)), axis=-1)
    scale = (np.maximum(amax, np.float32(FP8_MIN_AMAX)) *
             np.float32(1.0 / FP8_MAX)).astype(np.float32)
    with np.errstate(invalid="ignore"):  # inf / inf in a block with an infinity
        scaled = blocks / scale[..., None]
    q = np.clip(scaled, np.float32(-FP8_MAX), np.float32(FP8_MAX))
    q = q.astype(FP8_DTYPE).reshape(xf.shape)
    return q, scale


def fp8_dequantize(q, scales):
    """``q * scale`` per 128-channel block, in float32."""
    q, s = _check_fp8_pair(q, scales)
    H = q.shape[-1]
    blocks = q.astype(np.float32).reshape(q.shape[:-1] + (H // FP8_BLOCK, FP8_BLOCK))
    return (blocks * s[..., None]).reshape(q.shape)


# --------------------------------------------------------------------------
# low-latency mode
# --------------------------------------------------------------------------

@dataclass
class _LLLayout:
    ids: _Ids
    M: int
    layout: str         # "padded" or "ragged"
    rows: dict          # global expert e -> (src int64[n], tok int64[n])
    slots: list         # per source rank: int32 [T, K]
    first: dict         # global expert e -> its first row in its owner's ragged layout

    @property
    def N(self) -> int:
        return low_latency_ragged_rows(self.ids.R, self.M, self.ids.K, self.ids.E)

    def lead(self):
        """Leading shape of one rank's receive rows in this layout."""
        if self.layout == "ragged":
            return (self.N,)
        return (self.ids.L, self.ids.R * self.M)

    def at(self, e, row):
        """Index of row ``row`` of global expert ``e`` in its owner's array."""
        if self.layout == "ragged":
            return (self.first[e] + row,)
        return (e % self.ids.L, row)


def low_latency_ragged_rows(num_ranks: int, max_tokens_per_rank: int, top_k: int,
                            num_experts: int) -> int:
    """``N = R * M * min(K, L)``, the rows of the ragged layout: a token of any
    of the R sources (at most M each) names at most min(K, L) distinct experts
    of one rank."""
    L = _num_local_experts(num_experts, num_ranks)
    return num_ranks * int(max_tokens_per_rank) * min(int(top_k), L)


def _check_layout(layout):
    if layout not in ("padded", "ragged"):
        raise ValueError(f"layout must be 'padded' or 'ragged', got {layout!r}")


def _ll_layout(topk_idxs, num_experts: int, max_tokens_per_rank: int,
               layout: str = "padded") -> _LLLayout:
    _check_layout(layout)
    I = _prepare_ids(topk_idxs, num_experts)
    M = int(max_tokens_per_rank)
    if I.T > M:
        raise ValueError(f"{I.T} tokens per rank exceed max_tokens_per_rank={M}")
    slots = [np.full((I.T, I.K), -1, dtype=np.int32) for _ in range(I.R)]
    rows = {}
    for e in range(I.E):
        srcs, toks = [], []
        base = 0
        for s in range(I.R):
            hit = I.ids[s] == e                     # [T, K]
            t = np.nonzero(np.any(hit, axis=1))[0]  # one slot per token
            row_of_tok = np.full(I.T, -1, dtype=np.int64)
            row_of_tok[t] = base + np.arange(len(t))
            slots[s] = np.where(hit, row_of_tok[:, None], slots[s]).astype(np.int32)
            base += len(t)
            srcs.append(np.full(t.shape, s, dtype=np.int64))
            toks.append(t.astype(np.int64))
        rows[e] = (np.concatenate(srcs), np.concatenate(toks))
    # Ragged: each rank's experts one after the other, in local expert order.
    first = {}
    for r in range(I.R):
        nxt = 0
        for l in range(I.L):
            first[r * I.L + l] = nxt
            nxt += len(rows[r * I.L + l][0])
    return _LLLayout(I, M, layout, rows, slots, first)


def low_latency_dispatch(xs, topk_idxs, num_experts: int,
                         max_tokens_per_rank: int, use_fp8: bool = False,
                         layout: str = "padded"):
    """Expected low-latency dispatch of every rank.

    For receiver ``r`` and local expert ``l`` (global ``e = r * L + l``) the
    rows are the (source ``s``, token ``t``) pairs with some valid
    ``topk_idx[s][t, k] == e`` (a token listing ``e`` twice still takes one
    slot), ordered by (s, t), packed from row 0.

    Returns a list (per rank) of dicts: ``recv_x`` ``[L, R * M, H]`` in x's
    dtype (zero past the count), or with ``use_fp8`` the pair
    ``(q [L, R*M, H], scales [L, R*M, H // 128])`` = ``fp8_quantize`` of the
    source row (padding: q = 0, scale = 0); ``recv_count`` int32 ``[L]``;
    ``num_invalid_experts`` (this rank's invalid ids); ``slots`` int32
    ``[T, K]`` (this rank as a sender: the row of ``(t, topk_idx[t, k])``
    among that expert's ``R * M`` rows on its owner, -1 if not valid).

    ``layout="ragged"``: ``recv_x`` is ``[N, H]`` (pair ``([N, H], [N, H //
    128])``), ``N = low_latency_ragged_rows(...)``: local expert 0's rows,
    then expert 1's, ..., then zeros.  ``slots`` are the same (a row's place
    within its expert).
    """
    lay = _ll_layout(topk_idxs, num_experts, max_tokens_per_rank, layout)
    I = lay.ids
    R, L = I.R, I.L
    if len(xs) != R:
        raise ValueError("xs needs one entry per rank")
    x_all = _stack_x(xs, I.T)
    if isinstance(x_all, tuple):
        raise TypeError("low-latency dispatch takes unquantized x; "
                        "pass use_fp8=True to quantize")
    H = x_all.shape[2]
    if use_fp8:
        q_all, s_all = fp8_quantize(x_all)
    out = []
    lead = lay.lead()
    for r in range(R):
        count = np.zeros(L, dtype=np.int32)
        if use_fp8:
            q = np.zeros(lead + (H,), dtype=FP8_DTYPE)
            sc = np.zeros(lead + (H // FP8_BLOCK,), dtype=np.float32)
        else:
            recv = np.zeros(lead + (H,), dtype=x_all.dtype)
        for l in range(L):
            e = r * L + l
            src, tok = lay.rows[e]
            count[l] = len(src)
            for row, (s, t) in enumerate(zip(src, tok)):
                at = lay.at(e, row)
                if use_fp8:
                    q[at] = q_all[s, t]
                    sc[at] = s_all[s, t]
                else:
                    recv[at] = x_all[s, t]
        if layout == "ragged" and int(count.sum()) > lay.N:
            raise AssertionError(f"rank {r} receives {int(count.sum())} rows > N = {lay.N}")
        out.append(dict(
            recv_x=(q, sc) if use_fp8 else recv,
            recv_count=count,
            num_invalid_experts=I.n_invalid[r],
            slots=lay.slots[r].copy(),
        ))
    return out


def _stack_ll(arrs, lay: _LLLayout, what: str):
    """Per-rank receive rows in ``lay.layout`` -> ([R, *lead, H], dtype)."""
    arrs = [np.asarray(a) for a in arrs]
    if len(arrs) != lay.ids.R:
        raise ValueError(f"{what} needs one entry per rank")
    dtype = arrs[0].dtype
    lead = lay.lead()
    for r, a in enumerate(arrs):
        if a.ndim != len(lead) + 1 or a.shape[:-1] != lead or a.dtype != dtype:
            raise ValueError(f"rank {r}: {what} is {a.shape} {a.dtype}, expected "
                             f"{list(lead) + ['H']} {dtype} ({lay.layout} layout)")
    return np.stack(arrs), dtype


def _ll_row(arr_all, lay: _LLLayout, e: int, row: int):
    """Row ``row`` of global expert ``e`` from the stacked per-rank arrays."""
    return arr_all[(e // lay.ids.L,) + lay.at(e, row)]


def low_latency_combine(ys, topk_idxs, topk_weights, num_experts: int,
                        max_tokens_per_rank: int, layout: str = "padded"):
    """Expected low-latency combine.

    ``ys[r]`` is ``[L, R * M, H]`` (``[N, H]`` with ``layout="ragged"``).
    ``out[s][t]`` = sum over k = 0..K-1 in order, for valid ids only, of
    ``float32(w[s][t, k]) * float32(ys[owner][row of (t, k)])``, accumulated
    in float32 from 0.0 and cast to ``ys``' dtype.  A duplicated expert
    contributes once per k entry.
    """
    lay = _ll_layout(topk_idxs, num_experts, max_tokens_per_rank, layout)
    I = lay.ids
    y_all, dtype = _stack_ll(ys, lay, "ys")
    H = y_all.shape[-1]
    out = []
    for s in range(I.R):
        w = np.asarray(topk_weights[s], dtype=np.float32)
        acc = np.zeros((I.T, H), dtype=np.float32)
        for t in range(I.T):
            for k in range(I.K):
                if I.valid[s][t, k]:
                    y = _ll_row(y_all, lay, I.ids[s][t, k], lay.slots[s][t, k])
                    acc[t] = acc[t] + w[t, k] * y.astype(np.float32)
        out.append(acc.astype(dtype))
    return out


def low_latency_dispatch_grad_x(cts, topk_idxs, num_experts: int,
                                max_tokens_per_rank: int, layout: str = "padded"):
    """Transpose of low-latency dispatch in ``x``.

    ``cts[r]`` is ``[L, R * M, H]`` (``[N, H]`` ragged).  ``dx[s][t]`` = sum
    over the *distinct* valid experts of token ``t``, in k order of first
    occurrence, of ``cts[owner][row of (t, that expert)]``; float32
    accumulation from 0.0, cast to the cotangent dtype.  Rows no token uses
    (the padding, the ragged tail) do not enter.
    """
    lay = _ll_layout(topk_idxs, num_experts, max_tokens_per_rank, layout)
    I = lay.ids
    c_all, dtype = _stack_ll(cts, lay, "cts")
    H = c_all.shape[-1]
    out = []
    for s in range(I.R):
        ids = I.ids[s]
        acc = np.zeros((I.T, H), dtype=np.float32)
        for t in range(I.T):
            for k in range(I.K):
                if I.valid[s][t, k] and ids[t, k] not in ids[t, :k]:
                    c = _ll_row(c_all, lay, ids[t, k], lay.slots[s][t, k])
                    acc[t] = acc[t] + c.astype(np.float32)
        out.append(acc.astype(dtype))
    return out


def low_latency_combine_grad_y(ct_outs, topk_idxs, topk_weights,
                               num_experts: int, max_tokens_per_rank: int,
                               layout: str = "padded"):
    """Transpose of low-latency combine in ``y``.

    ``dy[r][row of (s, t) for e] = (sum over k with topk_idx[s][t, k] == e of
    w[s][t, k], float32 in k order from 0.0) * ct_out[s][t]``, rounded to
    the cotangent dtype; zero in rows no token uses.  Shape ``[L, R*M, H]``,
    or ``[N, H]`` with ``layout="ragged"``.
    """
    lay = _ll_layout(topk_idxs, num_experts, max_tokens_per_rank, layout)
    I = lay.ids
    cts = [np.asarray(c) for c in ct_outs]
    dtype = cts[0].dtype
    H = cts[0].shape[-1]
    ws = [np.asarray(w, dtype=np.float32) for w in topk_weights]
    out = [np.zeros(lay.lead() + (H,), dtype=np.float32) for _ in range(I.R)]
    for e, (src, tok) in lay.rows.items():
        r = e // I.L
        for row, (s, t) in enumerate(zip(src, tok)):
            wsum = np.float32(0)
            for k in range(I.K):
                if I.ids[s][t, k] == e:
                    wsum = np.float32(wsum + ws[s][t, k])
            out[r][lay.at(e, row)] = wsum * cts[s][t].astype(np.float32)
    return [o.astype(dtype) for o in out]


def low_latency_combine_grad_w(ct_outs, ys, topk_idxs, num_experts: int,
                               max_tokens_per_rank: int, layout: str = "padded"):
    """Transpose of low-latency combine in ``topk_weights``.

    ``dw[s][t, k] = dot(ct_out[s][t], ys[owner][row of (t, k)])`` in
    float32 (``ys`` in ``layout``); 0 for non-valid ids.  Returns float32
    ``[T, K]`` per rank.
    """
    lay = _ll_layout(topk_idxs, num_experts, max_tokens_per_rank, layout)
    I = lay.ids
    y_all, _ = _stack_ll(ys, lay, "ys")
    out = []
    for s in range(I.R):
        ct = np.asarray(ct_outs[s]).astype(np.float32)
        dw = np.zeros((I.T, I.K), dtype=np.float32)
        for t in range(I.T):
            for k in range(I.K):
                if I.valid[s][t, k]:
                    y = _ll_row(y_all, lay, I.ids[s][t, k], lay.slots[s][t, k])
                    dw[t, k] = np.dot(ct[t], y.astype(np.float32))
        out.append(dw)
    return out


# --------------------------------------------------------------------------
# deterministic test inputs
# --------------------------------------------------------------------------

def make_rank_inputs(seed: int, rank: int, num_tokens: int, hidden: int,
                     num_experts: int, top_k: int, *, dtype=np.float32,
                     none_prob: float = 0.0, invalid_prob: float = 0.0,
                     duplicate_prob: float = 0.0):
    """One rank's ``(x [T, H], topk_idx int32 [T, K], topk_weights f32 [T, K])``.

    Deterministic in ``(seed, rank)`` alone, so every process can regenerate
    any rank's inputs (GPU tests, which cannot use XLA collectives, check
    against the oracle this way).  Experts of a token are distinct unless
    ``duplicate_prob`` > 0; then each k > 0 entry repeats entry k - 1 with
    that probability.  ``none_prob`` entries become -1 and ``invalid_prob``
    entries become out-of-range ids (``E + j`` or ``-2 - j``).  ``x`` is
    standard normal rounded to ``dtype``; weights are uniform in [0.1, 1).
    """
    if top_k > num_experts:
        raise ValueError("top_k > num_experts")
    rng = np.random.default_rng([int(seed), int(rank)])
    x = rng.standard_normal((num_tokens, hidden), dtype=np.float32).astype(dtype)
    idx = np.argsort(rng.random((num_tokens, num_experts)), axis=1)[:, :top_k]
    idx = idx.astype(np.int32)
    if duplicate_prob > 0 and top_k > 1:
        dup = rng.random((num_tokens, top_k)) < duplicate_prob
        for k in range(1, top_k):
            idx[:, k] = np.where(dup[:, k], idx[:, k - 1], idx[:, k])
    if none_prob > 0:
        idx = np.where(rng.random(idx.shape) < none_prob, -1, idx).astype(np.int32)
    if invalid_prob > 0:
        bad = rng.integers(0, 1000, idx.shape)
        bad = np.where(bad % 2 == 0, num_experts + bad // 2, -2 - bad // 2)
        idx = np.where(rng.random(idx.shape) < invalid_prob, bad, idx).astype(np.int32)
    w = rng.uniform(0.1, 1.0, (num_tokens, top_k)).astype(np.float32)
    return x, idx, w


def make_inputs(seed: int, num_ranks: int, num_tokens: int, hidden: int,
                num_experts: int, top_k: int, **kw):
    """``make_rank_inputs`` for every rank: ``(xs, topk_idxs, topk_weights)``
    as lists indexed by rank."""
    per = [make_rank_inputs(seed, r, num_tokens, hidden, num_experts, top_k, **kw)
           for r in range(num_ranks)]
    xs, idxs, ws = (list(z) for z in zip(*per))
    return xs, idxs, ws
