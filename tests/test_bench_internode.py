"""benchmarks/bench_internode.py on CPU: its group-limited routing, its row and
byte counts (against jax_ep.testing.oracle.internode_traffic and by hand), and
its --dry-run, which needs no GPU."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_internode as bi  # noqa: E402
from jax_ep.testing import oracle  # noqa: E402

E, K = 256, 8


@pytest.mark.parametrize("num_nodes", [1, 2, 4, 8, 64])
def test_routing_limits_the_nodes_and_gives_distinct_experts(num_nodes):
    idx, w = bi.group_limited_routing(3, 1, 64, num_nodes=num_nodes)
    assert idx.shape == w.shape == (64, K) and idx.dtype == np.int32 and w.dtype == np.float32
    assert ((idx >= 0) & (idx < E)).all()
    assert all(len(set(row)) == K for row in idx.tolist())
    nodes = idx // (E // num_nodes)
    assert max(len(set(row)) for row in nodes.tolist()) <= min(4, num_nodes)
    np.testing.assert_allclose(w.sum(1), 1, rtol=1e-5)
    assert (w > 0).all()


def test_routing_is_deterministic_and_differs_by_rank():
    a, _ = bi.group_limited_routing(0, 2, 32, num_nodes=8)
    b, _ = bi.group_limited_routing(0, 2, 32, num_nodes=8)
    c, _ = bi.group_limited_routing(0, 3, 32, num_nodes=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_routing_picks_the_best_groups():
    # Per token, in plain Python: the kept nodes are the 4 with the largest
    # sum of their two best scores, the experts the 8 best of those nodes.
    T, N = 12, 16
    idx, w = bi.group_limited_routing(5, 0, T, num_nodes=N)
    rng = np.random.default_rng([5, 0])
    scores = 1 / (1 + np.exp(-rng.standard_normal((T, E), dtype=np.float32)))
    per = E // N
    for t in range(T):
        top2 = [sum(sorted(scores[t, n * per:(n + 1) * per])[-2:]) for n in range(N)]
        kept = sorted(range(N), key=lambda n: -top2[n])[:4]
        allowed = [e for e in range(E) if e // per in kept]
        best = sorted(allowed, key=lambda e: -scores[t, e])[:K]
        assert idx[t].tolist() == best
        np.testing.assert_allclose(w[t], scores[t, best] / scores[t, best].sum(), rtol=1e-6)
    with pytest.raises(ValueError):
        bi.group_limited_routing(0, 0, 4, num_nodes=256)  # 4 groups of 1 expert < top-8


@pytest.mark.parametrize("R, G", [(8, 4), (8, 2), (8, 1), (16, 8), (4, 2)])
def test_row_counts_match_the_oracle(R, G):
    idxs, _ = bi.routing(1, R, 40, ranks_per_node=G)
    c = bi.row_counts(idxs, E, G)
    ref = oracle.internode_traffic(idxs, E, G)
    np.testing.assert_array_equal(c["node_rows"], np.stack([r["node_rows"] for r in ref]))
    np.testing.assert_array_equal(c["rank_rows"], np.stack([r["rank_rows"] for r in ref]))
    assert (c["node_rows"] <= c["rank_rows"]).all()
    # dispatch forwards and combine sends back the same rows, in reverse
    assert c["forward_rows"].sum() == c["combine_rows"].sum()
    if G == 1:  # one rank per node: nothing to forward inside a node
        assert not c["forward_rows"].any() and not c["combine_rows"].any()


def test_row_counts_by_hand():
    # R = 4, G = 2 (nodes {0, 1}, {2, 3}), E = 8: expert e on rank e // 2.
    # Rank 0's tokens: t0 -> experts 2, 4, 5 (ranks 1, 2); t1 -> 6 (rank 3);
    # t2 -> 0 (rank 0). Other ranks send nothing (-1).
    none = np.full((3, 3), -1, np.int32)
    idxs = [np.array([[2, 4, 5], [6, -1, -1], [0, -1, -1]], np.int32), none, none, none]
    c = bi.row_counts(idxs, 8, 2)
    np.testing.assert_array_equal(c["node_rows"][0], [0, 2])   # t0, t1 cross to node 1 once
    np.testing.assert_array_equal(c["rank_rows"][0], [0, 2])   # ranks 2 and 3, one row each
    # relay of rank 0 (g = 0) on node 1 is rank 2: t1 goes on to rank 3 over NVLink;
    # on node 0 rank 0 is its own relay: t0 goes on to rank 1 over NVLink.
    np.testing.assert_array_equal(c["forward_rows"], [1, 0, 1, 0])
    # combine: rank 1 (g = 1) sends t0's row to rank 0, rank 3 sends t1's to rank 2.
    np.testing.assert_array_equal(c["combine_rows"], [0, 1, 0, 1])
    assert np.array_equal(c["node_rows"][1:], np.zeros((3, 2)))


def test_bytes_once_per_node_at_most_per_rank():
    R, G, H = 8, 2, 7168
    idxs, _ = bi.routing(0, R, 64, ranks_per_node=G)
    b = bi.traffic_bytes(idxs, E, G, hidden=H)
    assert set(b) == set(bi.OPS)
    c = bi.row_counts(idxs, E, G)
    msg = {"dispatch_bf16": 16 + 2 * H + 32 + 32,        # round16(4 G) + rows rounded to 16
           "dispatch_fp8": 16 + H + 4 * H // 128 + 32 + 32, "combine_bf16": 2 * H}
    for op, row in msg.items():
        assert b[op]["inter_node"] == c["node_rows"].sum(1).max() * row
        assert b[op]["per_rank"] == c["rank_rows"].sum(1).max() * row
        assert 0 < b[op]["inter_node"] <= b[op]["per_rank"]
        assert b[op]["projected_us"] == pytest.approx(b[op]["inter_node"] / 50e9 * 1e6)
    assert b["dispatch_bf16"]["nvlink"] == c["forward_rows"].max() * msg["dispatch_bf16"]
    assert b["combine_bf16"]["nvlink"] == c["combine_rows"].max() * 2 * H


def test_dry_run_main(capsys):
    assert bi.main(["--dry-run", "--ranks", "4", "--ranks-per-node", "2", "--tokens", "16"]) == 0
    out = capsys.readouterr().out
    for op in bi.OPS:
        assert f"| 4 | 2 | 2 | {op}" in out
    assert "50 GB/s" in out and "network-bound" in out


def test_bad_node_size_is_refused():
    with pytest.raises(SystemExit):
        bi.main(["--dry-run", "--ranks", "8", "--ranks-per-node", "3", "--tokens", "8"])
