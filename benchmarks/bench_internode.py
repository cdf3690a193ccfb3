"""Benchmark of internode dispatch / combine next to the intranode kernels (design §2.16, §7).

DeepEP's internode setting: 4096 tokens per rank, hidden 7168, top-8 of 256
experts under DeepSeek-V3's group-limited routing (the experts form N groups,
one per node; each token picks at most min(4, N) nodes by the sum of each
node's two best expert scores, then its top-8 experts inside them). FP8 and
BF16 dispatch, BF16 combine. R ranks run as R processes sharing GPU 0 under
CUDA MPS; each process times every op with the intranode kernels
(initialize without ranks_per_node), shuts down, then times it again with the
internode kernels (initialize with ranks_per_node=G: N = R / G virtual nodes
of G consecutive ranks), on the same routing. Times are wall clock per
jitted call (host dispatch included), best of 5 runs, slowest rank; there is
no chained timing (neither bench_intranode nor _timing has a helper for it).

Per op the table gives R, G, N, the two times and their ratio (the bar: the
internode kernels within 1.5x of the intranode ones on one GPU), and, counted
exactly from the routing, per rank (max over ranks): the bytes that cross
between nodes with once-per-node forwarding (dispatch: tokens x message
bytes, the message being round16(4 G) bytes of slots plus each payload row
rounded to 16 bytes; combine: one bf16 partial per (token, node)), what a
scheme sending to every destination rank would move instead, the bytes of
the NVLink leg inside the destination node, and the time a network-bound
model gives: inter-node bytes at 50 GB/s per GPU (a 400 Gb/s NIC).

    python benchmarks/bench_internode.py --ranks 8 --ranks-per-node 4 [--iters 20] [--tokens 4096]
    python benchmarks/bench_internode.py --ranks 8 --ranks-per-node 4 --gpu-per-rank  # 8 GPUs
    python benchmarks/bench_internode.py --dry-run --ranks 16 --ranks-per-node 8   # bytes only, CPU

What one GPU can and cannot show: with virtual nodes the inter-node legs are
NVSHMEM puts over P2P inside one GPU's memory, so the times are HBM-bound
figures (the cost of the extra hop and of the protocol next to the intranode
kernels), not network ones; a cluster's time follows from the byte counts,
which are exact, at the NIC's bandwidth.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import numpy as np

from _timing import launch_ranks, mesh_of
from bench_intranode import E, H, K, T, _init, measure

GROUPS = 4        # DeepSeek-V3: each token's experts lie in at most 4 groups (here: nodes)
NIC_BYTES_PER_S = 50e9  # CX7 400 Gb/s per GPU
BAR = 1.5         # internode time / intranode time allowed on one GPU
MODEL = ("projected µs: network-bound model, time = max inter-node bytes per rank / 50 GB/s "
         "(400 Gb/s NIC per GPU), ignoring NVLink and latency")
OPS = ("dispatch_bf16", "dispatch_fp8", "combine_bf16")


def group_limited_routing(seed, rank, tokens, *, num_nodes, num_experts=E, top_k=K,
                          max_groups=GROUPS):
    """One rank's (topk_idx int32 [T, K], weights float32 [T, K]), deterministic in (seed, rank).

    DeepSeek-V3's group-limited routing with one expert group per node (node
    n holds experts [n E/N, (n + 1) E/N)): sigmoid scores of standard normal
    logits; each group scores the sum of its two best experts; a token keeps
    its min(max_groups, N) best groups and takes its top_k experts among
    theirs, best first (K distinct experts); weights are the chosen scores
    normalised to sum 1.
    """
    N = int(num_nodes)
    if N <= 0 or num_experts % N:
        raise ValueError(f"num_nodes ({num_nodes}) must divide num_experts ({num_experts})")
    per, M = num_experts // N, min(max_groups, N)
    if M * per < top_k:
        raise ValueError(f"{M} groups of {per} experts cannot give top_k={top_k}")
    rng = np.random.default_rng([int(seed), int(rank)])
    scores = 1 / (1 + np.exp(-rng.standard_normal((tokens, num_experts), dtype=np.float32)))
    group_score = np.sort(scores.reshape(tokens, N, per), axis=2)[:, :, -2:].sum(2)
    groups = np.argsort(-group_score, axis=1, kind="stable")[:, :M]
    keep = np.zeros((tokens, N), bool)
    np.put_along_axis(keep, groups, True, axis=1)
    masked = np.where(np.repeat(keep, per, axis=1), scores, -np.inf)
    idx = np.argsort(-masked, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(scores, idx, axis=1)
    return idx.astype(np.int32), (w / w.sum(1, keepdims=True)).astype(np.float32)


def routing(seed, num_ranks, tokens, *, ranks_per_node):
    """Every rank's group-limited routing: (topk_idx list, weights list), one
    group per node of `ranks_per_node` ranks (bench_intranode's routing= form)."""
    per = [group_limited_routing(seed, r, tokens, num_nodes=num_ranks // ranks_per_node)
           for r in range(num_ranks)]
    return [p[0] for p in per], [p[1] for p in per]


def row_counts(topk_idxs, num_experts, ranks_per_node):
    """Rows of the internode scheme, per rank, from every rank's topk_idx (valid ids only).

    Returns int64 arrays (R ranks, N nodes of G ranks; rank r is local index
    r % G of node r // G; expert e lives on rank e // (E / R)):
      node_rows [R, N]: tokens of source rank s with an expert on node n,
        crossing once to n (0 for s's own node: oracle.internode_traffic's);
      rank_rows [R, N]: (token, rank of node n) pairs with an expert of the
        token on that rank (0 for s's own node: oracle.internode_traffic's);
      forward_rows [R]: rows relay (n', g) writes over NVLink in dispatch:
        tokens of the sources (n, g) of every node n (own node included: a
        source is its own relay there), once per rank (n', g') with g' != g
        holding one of the token's experts;
      combine_rows [R]: the reverse, rows rank (n', g') writes over NVLink to
        the relays of its node in combine: its received rows from sources
        (n, g) with g != g'.
    """
    R, G = len(topk_idxs), int(ranks_per_node)
    N, L = R // G, num_experts // R
    counts = np.zeros((R, R), np.int64)  # [s, r]: tokens of s with an expert on rank r
    node_rows = np.zeros((R, N), np.int64)
    for s, idx in enumerate(topk_idxs):
        idx = np.asarray(idx)
        owner = np.where((idx >= 0) & (idx < num_experts), idx // L, R)  # R: nowhere
        on_rank = np.zeros((idx.shape[0], R + 1), bool)
        on_rank[np.arange(idx.shape[0])[:, None], owner] = True
        counts[s] = on_rank[:, :R].sum(0)
        node_rows[s] = on_rank[:, :R].reshape(-1, N, G).any(2).sum(0)
    own = (np.arange(R), np.arange(R) // G)
    rank_rows = counts.reshape(R, N, G).sum(2)
    node_rows[own] = rank_rows[own] = 0
    local = np.arange(R) % G
    cross = counts * (local[:, None] != local[None, :])  # rows between different local indices
    # relay (n', g) forwards for the sources s with s % G == g: [g_s, n'] -> rank n' G + g_s
    forward = cross.reshape(R, N, G).sum(2).reshape(N, G, N).sum(0).T.reshape(R)
    return dict(node_rows=node_rows, rank_rows=rank_rows, forward_rows=forward,
                combine_rows=cross.sum(0))


def _round16(nbytes):
    return -(-int(nbytes) // 16) * 16


def traffic_bytes(topk_idxs, num_experts, ranks_per_node, hidden=H, top_k=K):
    """{op: dict(inter_node, per_rank, nvlink, projected_us)}: max over ranks of
    the bytes a rank's tokens move between nodes with once-per-node forwarding
    (node_rows x message bytes; combine: x round16(2 H), the bf16 partials),
    without it (rank_rows x the same row bytes), on the NVLink leg
    (forward_rows / combine_rows x the same row bytes), and inter_node at
    NIC_BYTES_PER_S in µs. node_rows and rank_rows are checked against
    oracle.internode_traffic."""
    from jax_ep.cuda.internode import message_bytes  # the kernels' own message formula
    from jax_ep.testing import oracle

    G = int(ranks_per_node)
    c = row_counts(topk_idxs, num_experts, G)
    ref = oracle.internode_traffic(topk_idxs, num_experts, G)
    for key in ("node_rows", "rank_rows"):
        if not np.array_equal(c[key], np.stack([r[key] for r in ref])):
            raise AssertionError(f"{key} disagrees with oracle.internode_traffic")
    meta = [4 * top_k, 4 * top_k]  # int32 ids, float32 weights
    rows = {"dispatch_bf16": message_bytes(G, [2 * hidden] + meta),
            "dispatch_fp8": message_bytes(G, [hidden, 4 * (hidden // 128)] + meta),
            "combine_bf16": _round16(2 * hidden)}
    out = {}
    for op, row in rows.items():
        nvlink = c["combine_rows"] if op.startswith("combine") else c["forward_rows"]
        inter = int(c["node_rows"].sum(1).max()) * row
        out[op] = dict(inter_node=inter, per_rank=int(c["rank_rows"].sum(1).max()) * row,
                       nvlink=int(nvlink.max()) * row, projected_us=inter / NIC_BYTES_PER_S * 1e6)
    return out


def worker(iters="20", tokens=str(T), ranks_per_node="4", seed="0", num_blocks="0"):
    """One process: seconds per call {mode: {op: s}}, intranode then internode."""
    import jax

    import jax_ep

    G, tokens = int(ranks_per_node), int(tokens)
    mesh, n = mesh_of(jax.devices()), jax.device_count()
    route = functools.partial(routing, ranks_per_node=G)
    out = {}
    for mode, g in (("intranode", None), ("internode", G)):
        _init(mesh, tokens, backend="cuda", ranks_per_node=g, num_blocks=int(num_blocks))
        info = jax_ep.runtime_info()
        other = "internode" if g is None else "intranode"
        if info[mode] is None or info[other] is not None:
            raise RuntimeError(f"the {mode} kernels are not the ones set up: {info}")
        # A fixed warm-up count: every process must make the same number of calls.
        res = measure("cuda", n, mesh, tokens, int(iters), seed=int(seed), warm_calls=100,
                      routing=route)
        jax_ep.shutdown()
        out[mode] = {op: v[0] for op, v in res.items()}
    return out


def _us(sec):
    return f"{sec * 1e6:10.1f}" if sec else f"{'—':>10}"


def print_table(R, G, nbytes, times=None):
    """The table: one row per op; times {mode: {op: seconds}} (None: dry run)."""
    print(f"| R | G | N | op | intranode µs | internode µs | inter/intra | inter-node B/rank, "
          f"once per node | inter-node B/rank, to each rank (no forwarding) | NVLink-leg B/rank "
          f"| projected µs @ 50 GB/s |\n|{'---|' * 11}")
    for op in OPS:
        intra, inter = ((times["intranode"][op], times["internode"][op]) if times
                        else (None, None))
        ratio = f"{inter / intra:10.2f}x" if times else f"{'—':>11}"
        b = nbytes[op]
        print(f"| {R} | {G} | {R // G} | {op:<13} | {_us(intra)} | {_us(inter)} | {ratio} | "
              f"{b['inter_node']:12d} | {b['per_rank']:12d} | {b['nvlink']:12d} | "
              f"{b['projected_us']:9.1f} |")
    if times:
        over = [op for op in OPS if times["internode"][op] > BAR * times["intranode"][op]]
        print(f"bar (internode within {BAR}x of intranode on one GPU): "
              f"{'met by every op' if not over else 'missed by ' + ', '.join(over)}")
    print("times: wall µs per jitted call (host dispatch included), the slowest rank; "
          "B/rank: bytes, max over ranks, exact")
    print(MODEL)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8, help="processes sharing GPU 0 (MPS)")
    p.add_argument("--ranks-per-node", type=int, default=4, help="G: ranks per virtual node")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tokens", type=int, default=T)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-per-rank", action="store_true",
                   help="process i on GPU i (NVLink inside a node, NVSHMEM puts across)")
    p.add_argument("--num-blocks", type=int, default=0, help="the SM knob (0 = automatic)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: print the byte columns from the routing only")
    args = p.parse_args(argv)
    R, G = args.ranks, args.ranks_per_node
    if not (0 < G < R and R % G == 0 and E % R == 0):
        p.error(f"--ranks-per-node ({G}) must divide --ranks ({R}) into 2 or more nodes, "
                f"and --ranks must divide {E}")
    idxs, _ = routing(args.seed, R, args.tokens, ranks_per_node=G)
    nbytes = traffic_bytes(idxs, E, G)
    if args.dry_run:
        print(f"dry run: {args.tokens} tokens per rank, group-limited routing, no timing")
        print_table(R, G, nbytes)
        return 0
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    results = launch_ranks("bench_internode:worker", R,
                           (args.iters, args.tokens, G, args.seed, args.num_blocks),
                           gpu_per_rank=args.gpu_per_rank)
    times = {mode: {op: max(r.result[mode][op] for r in results) for op in OPS}
             for mode in ("intranode", "internode")}
    where = "a GPU each" if args.gpu_per_rank else "one GPU (MPS)"
    print(f"{R} processes on {where}, {args.tokens} tokens per rank, "
          f"{R // G} virtual nodes of {G}, num_blocks={args.num_blocks or 'auto'}")
    print_table(R, G, nbytes, times)
    return 0


if __name__ == "__main__":
    sys.exit(main())
