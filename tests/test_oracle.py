"""Tests of the numpy oracle itself: hand-computed tiny cases + properties.

The tiny case (R=2 ranks, T=3 tokens, K=2, E=4 so L=2; experts 0,1 live on
rank 0 and 2,3 on rank 1):

    rank 0 topk_idx          rank 1 topk_idx
    t0: [ 0,  3] -> r0, r1   t0: [ 2, 2] -> r1 (duplicate expert, sent once)
    t1: [ 1,  0] -> r0       t1: [-5, 1] -> r0 (-5 invalid)
    t2: [-1, 99] -> nowhere  t2: [ 3, 0] -> r0, r1
         (99 invalid)

Receiver 0 rows: (s0,t0) (s0,t1) (s1,t1) (s1,t2); receiver 1 rows:
(s0,t0) (s1,t0) (s1,t2).
"""

import time

import ml_dtypes
import numpy as np
import pytest

from jax_ep.testing import oracle

R, T, H, K, E = 2, 3, 128, 2, 4
BF16 = ml_dtypes.bfloat16
F8 = ml_dtypes.float8_e4m3fn

IDX = [np.array([[0, 3], [1, 0], [-1, 99]], np.int32),
       np.array([[2, 2], [-5, 1], [3, 0]], np.int32)]
W = [np.array([[0.5, 0.25], [0.125, 1.0], [2.0, 4.0]], np.float32),
     np.array([[0.75, 1.5], [3.0, 0.375], [0.0625, 8.0]], np.float32)]


def _x(dtype=np.float32):
    # x[s][t, h] = 100 s + 10 t + h % 7 (exact in every dtype used here)
    h = np.arange(H) % 7
    return [np.stack([100 * s + 10 * t + h for t in range(T)]).astype(dtype)
            for s in range(R)]


def _rows(n, seed, dtype=np.float32, shape=None):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape or (n, H)).astype(BF16).astype(dtype)


# ---------------------------------------------------------------- layout

def test_layout_hand():
    per_rank, per_expert, in_rank = oracle.get_dispatch_layout(IDX[0], E, R)
    np.testing.assert_array_equal(per_rank, [2, 1])
    np.testing.assert_array_equal(per_expert, [2, 1, 0, 1])
    np.testing.assert_array_equal(in_rank, [[1, 1], [1, 0], [0, 0]])
    assert per_rank.dtype == np.int32 and per_expert.dtype == np.int32
    assert in_rank.dtype == bool

    per_rank, per_expert, in_rank = oracle.get_dispatch_layout(IDX[1], E, R)
    np.testing.assert_array_equal(per_rank, [2, 2])
    np.testing.assert_array_equal(per_expert, [1, 1, 2, 1])   # (t, k) pairs
    np.testing.assert_array_equal(in_rank, [[0, 1], [1, 0], [1, 1]])


def test_layout_rejects_bad_expert_count():
    with pytest.raises(ValueError):
        oracle.get_dispatch_layout(IDX[0], 5, 2)


# ---------------------------------------------------------------- dispatch

RECV_IDX = [np.array([[0, -1], [1, 0], [-1, 1], [-1, 0]] + [[-1, -1]] * 2),
            np.array([[-1, 1], [0, 0], [1, -1]] + [[-1, -1]] * 3)]
RECV_W = [np.array([[0.5, 0], [0.125, 1.0], [0, 0.375], [0, 8.0]] + [[0, 0]] * 2),
          np.array([[0, 0.25], [0.75, 1.5], [0.0625, 0]] + [[0, 0]] * 3)]
SEND_ROWS = [np.array([[0, 0], [1, -1], [-1, -1]]),
             np.array([[-1, 1], [2, -1], [3, 2]])]


@pytest.mark.parametrize("dtype", [np.float32, BF16, np.float16])
def test_dispatch_hand(dtype):
    x = _x(dtype)
    out = oracle.dispatch(x, IDX, W, E)
    cap = R * T
    z = np.zeros(H, dtype)
    want_x = [np.stack([x[0][0], x[0][1], x[1][1], x[1][2], z, z]),
              np.stack([x[0][0], x[1][0], x[1][2], z, z, z])]
    for r in range(R):
        o = out[r]
        assert o["recv_x"].dtype == dtype and o["recv_x"].shape == (cap, H)
        np.testing.assert_array_equal(o["recv_x"], want_x[r])
        assert o["recv_topk_idx"].dtype == np.int32
        np.testing.assert_array_equal(o["recv_topk_idx"], RECV_IDX[r])
        assert o["recv_topk_weights"].dtype == np.float32
        np.testing.assert_array_equal(o["recv_topk_weights"], RECV_W[r])
        np.testing.assert_array_equal(o["send_rows"], SEND_ROWS[r])
        assert o["num_dropped_tokens"] == 0
        assert o["num_invalid_experts"] == 1
    assert [o["num_recv_tokens"] for o in out] == [4, 3]
    np.testing.assert_array_equal(out[0]["num_recv_tokens_per_expert"], [3, 2])
    np.testing.assert_array_equal(out[1]["num_recv_tokens_per_expert"], [2, 2])


def test_dispatch_capacity_overflow():
    x = _x()
    out = oracle.dispatch(x, IDX, W, E, capacity=3)
    # receiver 0 keeps (s0,t0) (s0,t1) (s1,t1) and drops (s1,t2)
    np.testing.assert_array_equal(out[0]["recv_x"], np.stack([x[0][0], x[0][1], x[1][1]]))
    np.testing.assert_array_equal(out[0]["recv_topk_idx"], RECV_IDX[0][:3])
    np.testing.assert_array_equal(out[0]["recv_topk_weights"], RECV_W[0][:3])
    assert out[0]["num_recv_tokens"] == 3 and out[0]["num_dropped_tokens"] == 1
    np.testing.assert_array_equal(out[0]["num_recv_tokens_per_expert"], [2, 2])
    # receiver 1 keeps all three
    np.testing.assert_array_equal(out[1]["recv_x"], np.stack([x[0][0], x[1][0], x[1][2]]))
    assert out[1]["num_recv_tokens"] == 3 and out[1]["num_dropped_tokens"] == 0
    np.testing.assert_array_equal(out[1]["send_rows"], [[-1, 1], [2, -1], [-1, 2]])
    np.testing.assert_array_equal(out[0]["send_rows"], SEND_ROWS[0])

    out = oracle.dispatch(x, IDX, W, E, capacity=2)
    assert [o["num_recv_tokens"] for o in out] == [2, 2]
    assert [o["num_dropped_tokens"] for o in out] == [2, 1]
    np.testing.assert_array_equal(out[1]["recv_topk_idx"], [[-1, 1], [0, 0]])
    np.testing.assert_array_equal(out[1]["num_recv_tokens_per_expert"], [2, 1])
    np.testing.assert_array_equal(out[1]["send_rows"], [[-1, 1], [-1, -1], [-1, -1]])

    out = oracle.dispatch(x, IDX, W, E, capacity=0)
    assert out[0]["recv_x"].shape == (0, H)
    assert [o["num_dropped_tokens"] for o in out] == [4, 3]


def test_dispatch_fp8_pair():
    x = _x()
    pairs = [oracle.fp8_quantize(xi) for xi in x]
    out = oracle.dispatch(pairs, IDX, W, E, capacity=5)
    q, s = out[1]["recv_x"]
    assert q.dtype == F8 and q.shape == (5, H)
    assert s.dtype == np.float32 and s.shape == (5, H // 128)
    for row, (src, tok) in enumerate([(0, 0), (1, 0), (1, 2)]):
        np.testing.assert_array_equal(q[row].view(np.uint8), pairs[src][0][tok].view(np.uint8))
        np.testing.assert_array_equal(s[row], pairs[src][1][tok])
    assert not q[3:].astype(np.float32).any() and not s[3:].any()


# ---------------------------------------------------------------- combine

@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_combine_hand(dtype):
    a = _rows(6, 1, dtype)
    b = _rows(6, 2, dtype)
    out = oracle.combine([a, b], IDX, E)
    f = lambda v: v.astype(np.float32)
    want0 = np.stack([f(a[0]) + f(b[0]), f(a[1]), np.zeros(H, np.float32)])
    want1 = np.stack([f(b[1]), f(a[2]), f(a[3]) + f(b[2])])
    assert out[0].dtype == dtype
    np.testing.assert_array_equal(out[0], want0.astype(dtype))
    np.testing.assert_array_equal(out[1], want1.astype(dtype))

    # capacity 3: (s1,t2) was dropped on receiver 0, so only rank 1 returns it
    out = oracle.combine([a[:3], b[:3]], IDX, E, capacity=3)
    np.testing.assert_array_equal(out[1][2], b[2])
    np.testing.assert_array_equal(out[0][0], (f(a[0]) + f(b[0])).astype(dtype))


def test_combine_rank_order_accumulation():
    # 1 + 1e-8 + ... : the rank-order f32 sum 0 + y_r0 + y_r1 is what counts
    y0 = np.full((6, H), 1.0, np.float32)
    y1 = np.full((6, H), 2.0 ** -30, np.float32)
    out = oracle.combine([y0, y1], IDX, E)
    np.testing.assert_array_equal(out[0][0], np.float32(1.0) + np.float32(2.0 ** -30))


def test_dispatch_weights_grad_hand():
    ct = [np.array([[100 * r + 10 * row + k + 1 for k in range(K)] for row in range(6)],
                   np.float32) for r in range(R)]
    dw = oracle.dispatch_weights_grad(ct, IDX, E)
    np.testing.assert_array_equal(dw[0], [[1, 102], [11, 12], [0, 0]])
    np.testing.assert_array_equal(dw[1], [[111, 112], [0, 22], [121, 32]])
    assert dw[0].dtype == np.float32
    # capacity 3: (s1,t2) dropped on receiver 0 -> its k=1 (expert 0) gets 0
    dw = oracle.dispatch_weights_grad([c[:3] for c in ct], IDX, E, capacity=3)
    np.testing.assert_array_equal(dw[1], [[111, 112], [0, 22], [121, 0]])


# ---------------------------------------------------------------- internode

def test_combine_node_tree_hand():
    # One token of rank 0 reaches all 4 ranks (one expert each): rows 1, 2^-8, 2^-8, 0.
    # Plain: 1 + 2^-8 + 2^-8 = 1 + 2^-7 (a bf16). Nodes of 2: node 0's partial
    # 1 + 2^-8 rounds (tie, to even) to 1 in bf16; + 2^-8 = 1 + 2^-8 -> 1.
    idx = [np.array([[0, 1, 2, 3]], np.int32)] + [np.full((1, 4), -1, np.int32)] * 3
    vals = [1.0, 2.0 ** -8, 2.0 ** -8, 0.0]
    ys = [np.full((4, H), v, np.float32).astype(BF16) for v in vals]
    assert oracle.combine(ys, idx, 4)[0][0, 0] == BF16(1 + 2.0 ** -7)
    assert oracle.combine(ys, idx, 4, ranks_per_node=2)[0][0, 0] == BF16(1.0)
    for g in (1, 4):  # one row per node, or one node: the plain order
        assert oracle.combine(ys, idx, 4, ranks_per_node=g)[0][0, 0] == BF16(1 + 2.0 ** -7)
    # float32: the partials are not rounded, only the order changes
    ys32 = [y.astype(np.float32) for y in ys]
    assert oracle.combine(ys32, idx, 4, ranks_per_node=2)[0][0, 0] == np.float32(1 + 2.0 ** -7)
    with pytest.raises(ValueError, match="ranks_per_node"):
        oracle.combine(ys, idx, 4, ranks_per_node=3)


def test_dispatch_weights_grad_node_tree_equals_plain():
    ct = [np.array([[100 * r + 10 * row + k + 1 for k in range(K)] for row in range(6)],
                   np.float32) for r in range(R)]
    for capacity in (None, 3):
        plain = oracle.dispatch_weights_grad(ct, IDX, E, capacity)
        tree = oracle.dispatch_weights_grad(ct, IDX, E, capacity, ranks_per_node=1)
        for p, t in zip(plain, tree):
            np.testing.assert_array_equal(p, t)


def test_internode_traffic_hand():
    # R = 4 ranks in 2 nodes of 2, E = 8 (expert e on rank e // 2). Rank 0 (node 0):
    # t0 -> ranks 0, 2; t1 -> ranks 2, 3; t2 -> rank 1; t3 (9 invalid) -> rank 3;
    # t4 -> rank 2 (two of its experts). Rank 2 (node 1) sends the same rows
    # reversed; rank 3's ids % 4 live on node 0 only (its t0 names expert 0 twice).
    idx0 = np.array([[0, 4], [4, 6], [-1, 2], [9, 7], [4, 5]], np.int32)
    idx = [idx0, np.full((5, 2), -1, np.int32), idx0[::-1].copy(), idx0 % 4]
    got = oracle.internode_traffic(idx, 8, 2)
    want = [([0, 4], [0, 5]), ([0, 0], [0, 0]), ([2, 0], [2, 0]), ([5, 0], [7, 0])]
    for t, (node_rows, rank_rows) in zip(got, want):
        np.testing.assert_array_equal(t["node_rows"], node_rows)
        np.testing.assert_array_equal(t["rank_rows"], rank_rows)


def test_internode_traffic_properties():
    xs, idxs, ws = oracle.make_inputs(3, 8, 20, 16, 32, 4, none_prob=0.1, invalid_prob=0.1,
                                      duplicate_prob=0.2)
    send_rows = [e["send_rows"] for e in oracle.dispatch(xs, idxs, ws, 32)]
    for g in (1, 2, 4):
        got = oracle.internode_traffic(idxs, 32, g)
        for s, t in enumerate(got):
            other = np.arange(8) // g != s // g
            sent = send_rows[s] >= 0  # default capacity: nothing dropped
            assert t["rank_rows"].sum() == np.count_nonzero(sent[:, other])
            assert np.all(t["node_rows"] <= t["rank_rows"])
            assert t["node_rows"].sum() == sum(
                np.count_nonzero(np.any(sent[:, (np.arange(8) // g) == n], axis=1))
                for n in range(8 // g) if n != s // g)
    assert all(t["node_rows"].sum() == 0 for t in oracle.internode_traffic(idxs, 32, 8))


# ---------------------------------------------------------------- FP8

def test_fp8_quantize_hand():
    x = np.zeros((1, 256), np.float32)
    x[0, 0] = 896.0      # amax -> scale 2
    x[0, 1] = 3.0        # 1.5, exact
    x[0, 2] = 2.125      # 1.0625: halfway 1.0 / 1.125 -> even -> 1.0
    x[0, 3] = 2.375      # 1.1875: halfway 1.125 / 1.25 -> even -> 1.25
    x[0, 4] = -896.0
    # second block all zero -> scale = 1e-4 / 448
    q, s = oracle.fp8_quantize(x)
    assert q.dtype == F8 and q.shape == (1, 256)
    assert s.dtype == np.float32 and s.shape == (1, 2)
    assert s[0, 0] == 2.0
    assert s[0, 1] == np.float32(1e-4) / np.float32(448)
    np.testing.assert_array_equal(q[0, :5].astype(np.float32), [448, 1.5, 1.0, 1.25, -448])
    assert not q[0, 5:].astype(np.float32).any()
    d = oracle.fp8_dequantize(q, s)
    np.testing.assert_array_equal(d[0, :5], [896, 3.0, 2.0, 2.5, -896])


def test_fp8_round_trip_bound():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 512)) * np.exp(rng.uniform(-8, 8, (16, 1)))).astype(np.float32)
    x[3, :128] = 0.0
    x[4, 128:256] = 1e-7          # below the amax floor
    q, s = oracle.fp8_quantize(x)
    d = oracle.fp8_dequantize(q, s)
    scale = np.repeat(s, 128, axis=-1)
    # 3 mantissa bits: half an ulp is 2^-4 relative; subnormal half-step 2^-10
    bound = np.abs(x) * (2.0 ** -4) * (1 + 1e-6) + scale * 2.0 ** -10
    assert np.all(np.abs(d - x) <= bound)
    assert np.all(np.abs(q.astype(np.float32)) <= 448)
    # bf16 input and the [..., H] batch shape
    qb, sb = oracle.fp8_quantize(x.astype(BF16).reshape(2, 8, 512))
    assert qb.shape == (2, 8, 512) and sb.shape == (2, 8, 4)


def test_fp8_rejects_bad_hidden():
    with pytest.raises(ValueError):
        oracle.fp8_quantize(np.zeros((2, 100), np.float32))


# ---------------------------------------------------------------- low latency

M = 3
SLOTS = [np.array([[0, 0], [0, 1], [-1, -1]]), np.array([[0, 0], [-1, 1], [1, 2]])]


@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_ll_dispatch_hand(dtype):
    x = _x(dtype)
    out = oracle.low_latency_dispatch(x, IDX, E, M)
    z = np.zeros(H, dtype)
    # rank 0: expert 0 <- (0,0) (0,1) (1,2); expert 1 <- (0,1) (1,1)
    # rank 1: expert 2 <- (1,0) once; expert 3 <- (0,0) (1,2)
    want = [np.stack([np.stack([x[0][0], x[0][1], x[1][2], z, z, z]),
                      np.stack([x[0][1], x[1][1], z, z, z, z])]),
            np.stack([np.stack([x[1][0], z, z, z, z, z]),
                      np.stack([x[0][0], x[1][2], z, z, z, z])])]
    counts = [[3, 2], [1, 2]]
    for r in range(R):
        assert out[r]["recv_x"].shape == (2, R * M, H) and out[r]["recv_x"].dtype == dtype
        np.testing.assert_array_equal(out[r]["recv_x"], want[r])
        np.testing.assert_array_equal(out[r]["recv_count"], counts[r])
        assert out[r]["recv_count"].dtype == np.int32
        np.testing.assert_array_equal(out[r]["slots"], SLOTS[r])
        assert out[r]["num_invalid_experts"] == 1

    out8 = oracle.low_latency_dispatch(x, IDX, E, M, use_fp8=True)
    q, s = out8[1]["recv_x"]
    assert q.dtype == F8 and q.shape == (2, R * M, H) and s.shape == (2, R * M, 1)
    q_src, s_src = oracle.fp8_quantize(x[0][0])
    np.testing.assert_array_equal(q[1, 0].view(np.uint8), q_src.view(np.uint8))
    np.testing.assert_array_equal(s[1, 0], s_src)
    assert not q[1, 2:].astype(np.float32).any() and not s[1, 2:].any()
    assert not s[0, 1:].any()


def test_ll_dispatch_rejects_too_many_tokens():
    with pytest.raises(ValueError):
        oracle.low_latency_dispatch(_x(BF16), IDX, E, 2)


def _ll_ys(seed, dtype=np.float32):
    return [_rows(0, seed + r, dtype, (2, R * M, H)) for r in range(R)]


@pytest.mark.parametrize("dtype", [np.float32, BF16])
def test_ll_combine_hand(dtype):
    y0, y1 = _ll_ys(10, dtype)
    out = oracle.low_latency_combine([y0, y1], IDX, W, E, M)
    f = lambda v: v.astype(np.float32)
    w0, w1 = W
    acc = lambda *terms: sum(terms, np.zeros(H, np.float32))
    want0 = [acc(w0[0, 0] * f(y0[0, 0]), w0[0, 1] * f(y1[1, 0])),
             acc(w0[1, 0] * f(y0[1, 0]), w0[1, 1] * f(y0[0, 1])),
             np.zeros(H, np.float32)]
    want1 = [acc(w1[0, 0] * f(y1[0, 0]), w1[0, 1] * f(y1[0, 0])),   # duplicate: both k
             acc(w1[1, 1] * f(y0[1, 1])),
             acc(w1[2, 0] * f(y1[1, 1]), w1[2, 1] * f(y0[0, 2]))]
    assert out[0].dtype == dtype
    np.testing.assert_array_equal(out[0], np.stack(want0).astype(dtype))
    np.testing.assert_array_equal(out[1], np.stack(want1).astype(dtype))


def test_ll_dispatch_grad_x_hand():
    c0, c1 = _ll_ys(20)
    dx = oracle.low_latency_dispatch_grad_x([c0, c1], IDX, E, M)
    want0 = np.stack([c0[0, 0] + c1[1, 0], c0[1, 0] + c0[0, 1], np.zeros(H)])
    want1 = np.stack([c1[0, 0], c0[1, 1], c1[1, 1] + c0[0, 2]])   # duplicate once
    np.testing.assert_array_equal(dx[0], want0.astype(np.float32))
    np.testing.assert_array_equal(dx[1], want1.astype(np.float32))


def test_ll_combine_grad_y_hand():
    g = [_rows(T, 30), _rows(T, 31)]
    dy = oracle.low_latency_combine_grad_y(g, IDX, W, E, M)
    want = [np.zeros((2, R * M, H), np.float32) for _ in range(R)]
    want[0][0, 0] = 0.5 * g[0][0]
    want[0][0, 1] = 1.0 * g[0][1]
    want[0][0, 2] = 8.0 * g[1][2]
    want[0][1, 0] = 0.125 * g[0][1]
    want[0][1, 1] = 0.375 * g[1][1]
    want[1][0, 0] = np.float32(0.75 + 1.5) * g[1][0]
    want[1][1, 0] = 0.25 * g[0][0]
    want[1][1, 1] = 0.0625 * g[1][2]
    for r in range(R):
        np.testing.assert_array_equal(dy[r], want[r])


def test_ll_combine_grad_w_hand():
    g = [_rows(T, 40), _rows(T, 41)]
    y0, y1 = _ll_ys(50)
    dw = oracle.low_latency_combine_grad_w(g, [y0, y1], IDX, E, M)
    d = lambda a, b: np.dot(a.astype(np.float32), b.astype(np.float32))
    want0 = [[d(g[0][0], y0[0, 0]), d(g[0][0], y1[1, 0])],
             [d(g[0][1], y0[1, 0]), d(g[0][1], y0[0, 1])],
             [0, 0]]
    want1 = [[d(g[1][0], y1[0, 0]), d(g[1][0], y1[0, 0])],
             [0, d(g[1][1], y0[1, 1])],
             [d(g[1][2], y1[1, 1]), d(g[1][2], y0[0, 2])]]
    np.testing.assert_allclose(dw[0], want0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dw[1], want1, rtol=1e-6, atol=1e-6)
    assert dw[0].dtype == np.float32


def test_ll_ragged_dispatch_hand():
    # N = R * M * min(K, L) = 2 * 3 * 2; each rank's experts back to back, then zeros.
    x = _x()
    out = oracle.low_latency_dispatch(x, IDX, E, M, layout="ragged")
    assert oracle.low_latency_ragged_rows(R, M, K, E) == 12
    z = np.zeros(H, np.float32)
    want = [[x[0][0], x[0][1], x[1][2], x[0][1], x[1][1]] + [z] * 7,
            [x[1][0], x[0][0], x[1][2]] + [z] * 9]
    for r in range(R):
        np.testing.assert_array_equal(out[r]["recv_x"], np.stack(want[r]))
        np.testing.assert_array_equal(out[r]["slots"], SLOTS[r])
    q, s = oracle.low_latency_dispatch(x, IDX, E, M, use_fp8=True, layout="ragged")[1]["recv_x"]
    assert q.shape == (12, H) and s.shape == (12, 1)
    q_src, s_src = oracle.fp8_quantize(x[0][0])
    np.testing.assert_array_equal(q[1].view(np.uint8), q_src.view(np.uint8))
    assert not s[3:].any()


def _ragged_of(padded, counts):
    return np.concatenate([padded[l, :c] for l, c in enumerate(counts)]
                          + [np.zeros((12 - sum(counts), H), padded.dtype)])


def test_ll_ragged_maps_are_the_padded_ones_on_the_valid_rows():
    """combine and the three transposes read and write the same rows in both layouts."""
    counts = [[3, 2], [1, 2]]
    valid = [np.arange(R * M)[None, :] < np.array(c)[:, None] for c in counts]
    ys = [np.where(v[..., None], y, 0) for y, v in zip(_ll_ys(60), valid)]
    ragged = [_ragged_of(y, c) for y, c in zip(ys, counts)]
    g = [_rows(T, 61), _rows(T, 62)]
    for r, (a, b) in enumerate(zip(oracle.low_latency_combine(ys, IDX, W, E, M),
                                   oracle.low_latency_combine(ragged, IDX, W, E, M,
                                                              layout="ragged"))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(oracle.low_latency_dispatch_grad_x(ys, IDX, E, M),
                    oracle.low_latency_dispatch_grad_x(ragged, IDX, E, M, layout="ragged")):
        np.testing.assert_array_equal(a, b)
    for a, b, c in zip(oracle.low_latency_combine_grad_y(g, IDX, W, E, M),
                       oracle.low_latency_combine_grad_y(g, IDX, W, E, M, layout="ragged"),
                       counts):
        np.testing.assert_array_equal(_ragged_of(a, c), b)
    for a, b in zip(oracle.low_latency_combine_grad_w(g, ys, IDX, E, M),
                    oracle.low_latency_combine_grad_w(g, ragged, IDX, E, M, layout="ragged")):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="ragged layout"):
        oracle.low_latency_combine(ys, IDX, W, E, M, layout="ragged")
    with pytest.raises(ValueError, match="layout must be"):
        oracle.low_latency_dispatch(_x(), IDX, E, M, layout="dense")


# ---------------------------------------------------------------- properties

def _dot(a, b):
    return sum(float(np.sum(np.asarray(p, np.float64) * np.asarray(q, np.float64)))
               for p, q in zip(a, b))


@pytest.mark.parametrize("capacity", [None, 20])
def test_dispatch_properties(capacity):
    R_, T_, H_, E_, K_ = 4, 16, 256, 16, 4
    xs, idx, ws = oracle.make_inputs(3, R_, T_, H_, E_, K_, none_prob=0.15,
                                     invalid_prob=0.1, duplicate_prob=0.2)
    xs = [x.astype(BF16).astype(np.float32) for x in xs]   # multiples stay exact
    d = oracle.dispatch(xs, idx, ws, E_, capacity)
    cap = R_ * T_ if capacity is None else capacity
    # count bookkeeping
    layouts = [oracle.get_dispatch_layout(i, E_, R_) for i in idx]
    total = sum(int(lay[0].sum()) for lay in layouts)
    assert sum(o["num_recv_tokens"] + o["num_dropped_tokens"] for o in d) == total
    for s in range(R_):
        assert d[s]["num_invalid_experts"] == oracle.count_invalid(idx[s], E_)
        in_rank = layouts[s][2]
        assert np.all((d[s]["send_rows"] >= 0) <= in_rank)
    for r in range(R_):
        n = d[r]["num_recv_tokens"]
        assert n <= cap
        assert int(d[r]["num_recv_tokens_per_expert"].sum()) == int((d[r]["recv_topk_idx"] >= 0).sum())
        assert np.all(d[r]["recv_topk_idx"][n:] == -1)
        assert not d[r]["recv_x"][n:].any()
    # combine(dispatch(x)) == x * number of ranks that kept the token
    back = oracle.combine([o["recv_x"] for o in d], idx, E_, capacity)
    for s in range(R_):
        n_dest = (d[s]["send_rows"] >= 0).sum(axis=1)
        np.testing.assert_array_equal(back[s], xs[s] * n_dest[:, None].astype(np.float32))
    # adjoints: combine is dispatch's transpose in x, dispatch_weights_grad in w
    rng = np.random.default_rng(7)
    ys = [rng.standard_normal((cap, H_)).astype(np.float32) for _ in range(R_)]
    assert np.isclose(_dot([o["recv_x"] for o in d], ys),
                      _dot(xs, oracle.combine(ys, idx, E_, capacity)), rtol=1e-5)
    cw = [rng.standard_normal((cap, K_)).astype(np.float32) for _ in range(R_)]
    assert np.isclose(_dot([o["recv_topk_weights"] for o in d], cw),
                      _dot(ws, oracle.dispatch_weights_grad(cw, idx, E_, capacity)),
                      rtol=1e-5)


def test_ll_properties():
    R_, T_, H_, E_, K_, M_ = 4, 12, 256, 16, 4, 16
    xs, idx, ws = oracle.make_inputs(5, R_, T_, H_, E_, K_, dtype=BF16, none_prob=0.2)
    L_ = E_ // R_
    d = oracle.low_latency_dispatch(xs, idx, E_, M_)
    # unit weights, distinct experts: combine(dispatch(x)) == x * valid-k count
    ones = [np.ones((T_, K_), np.float32)] * R_
    back = oracle.low_latency_combine([o["recv_x"] for o in d], idx, ones, E_, M_)
    for s in range(R_):
        n_valid = (idx[s] >= 0).sum(axis=1).astype(np.float32)
        np.testing.assert_array_equal(
            back[s], (xs[s].astype(np.float32) * n_valid[:, None]).astype(BF16))
    # counts
    for r in range(R_):
        for l in range(L_):
            e = r * L_ + l
            assert d[r]["recv_count"][l] == sum(int(np.any(i == e, axis=1).sum()) for i in idx)
    # adjoint identities of the three linear maps (f32 data, duplicates on)
    xs, idx, ws = oracle.make_inputs(6, R_, T_, H_, E_, K_, none_prob=0.1,
                                     invalid_prob=0.1, duplicate_prob=0.3)
    d = oracle.low_latency_dispatch(xs, idx, E_, M_)
    rng = np.random.default_rng(8)
    cts = [rng.standard_normal((L_, R_ * M_, H_)).astype(np.float32) for _ in range(R_)]
    assert np.isclose(_dot([o["recv_x"] for o in d], cts),
                      _dot(xs, oracle.low_latency_dispatch_grad_x(cts, idx, E_, M_)), rtol=1e-5)
    g = [rng.standard_normal((T_, H_)).astype(np.float32) for _ in range(R_)]
    ys = cts
    lhs = _dot(oracle.low_latency_combine(ys, idx, ws, E_, M_), g)
    assert np.isclose(lhs, _dot(ys, oracle.low_latency_combine_grad_y(g, idx, ws, E_, M_)),
                      rtol=1e-5)
    assert np.isclose(lhs, _dot(ws, oracle.low_latency_combine_grad_w(g, ys, idx, E_, M_)),
                      rtol=1e-5)


def test_make_inputs_deterministic_per_rank():
    a = oracle.make_rank_inputs(11, 2, 8, 128, 16, 4, dtype=BF16, invalid_prob=0.3)
    b = oracle.make_inputs(11, 4, 8, 128, 16, 4, dtype=BF16, invalid_prob=0.3)
    for u, v in zip(a, (b[0][2], b[1][2], b[2][2])):
        np.testing.assert_array_equal(u, v)
    assert a[0].dtype == BF16 and a[1].dtype == np.int32 and a[2].dtype == np.float32
    assert oracle.count_invalid(a[1], 16) > 0


def test_speed_r8_t64_h256():
    R_, T_, H_, E_, K_ = 8, 64, 256, 64, 8
    xs, idx, ws = oracle.make_inputs(0, R_, T_, H_, E_, K_, dtype=BF16,
                                     none_prob=0.1, invalid_prob=0.05, duplicate_prob=0.1)
    t0 = time.perf_counter()
    d = oracle.dispatch(xs, idx, ws, E_)
    oracle.combine([o["recv_x"] for o in d], idx, E_)
    oracle.dispatch([oracle.fp8_quantize(x) for x in xs], idx, ws, E_, capacity=100)
    ll = oracle.low_latency_dispatch(xs, idx, E_, T_, use_fp8=True)
    ll = oracle.low_latency_dispatch(xs, idx, E_, T_)
    oracle.low_latency_combine([o["recv_x"] for o in ll], idx, ws, E_, T_)
    assert time.perf_counter() - t0 < 1.0
