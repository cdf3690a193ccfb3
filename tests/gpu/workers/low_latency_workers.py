"""Checks of the NVSHMEM low-latency kernels that run in each EP rank's process
(one GPU, hence one NVSHMEM PE, per process). Every process regenerates all
ranks' inputs from a seed and checks its own rank against the numpy oracle;
no XLA collective runs. Nothing here touches JAX at import.
"""

import functools

import numpy as np

from silent_peer import run_without_peer

T, H, K, E, M = 24, 256, 4, 16, 32
# public_api's shapes: "small" (above), and the ones test_low_latency_gpu.py
# explains next to its test (decode, many_experts, odd_hidden).
SHAPES = {"small": (T, H, K, E, M), "decode": (128, 7168, 8, 64, 128),
          "many_experts": (160, 128, 8, 4096, 160), "odd_hidden": (40, 2304, 4, 16, 48),
          "wide_top_k": (32, 256, 12, 32, 32)}


def _env():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_ep import Options
    from jax_ep.cuda import low_latency as ll

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    info = ll.setup(mesh, "ep", max_tokens_per_rank=M, hidden=H, num_experts=E, top_k=K,
                    itemsize=4, send_buffer=True, options=Options.from_env(), timeout_s=30)
    sharding = NamedSharding(mesh, P("ep"))
    me = info["rank"]

    def put(per_rank):
        g = np.concatenate([np.asarray(a) for a in per_rank])
        return jax.make_array_from_callback(g.shape, sharding, lambda i: g[i])

    def local(a):
        """This process's shard as numpy."""
        return np.asarray(a.addressable_shards[0].data)

    return n, mesh, put, local, me


def _ax():
    """The EP axis index of the enclosing shard_map (the kernels check it)."""
    import jax

    return jax.lax.axis_index("ep").astype("int32")


def _same(got, want, what):
    got = np.asarray(got)
    want = np.asarray(want)
    if got.dtype.kind not in "iub":  # floats, ml_dtypes' bf16 / e4m3 too (NaN == NaN)
        got, want = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_array_equal(got, want, err_msg=what)


def _expected_recv_src(idxs, me, n):
    """[L, R*M]: s*M + t of each row of my local experts, -1 past the count."""
    L = E // n
    out = np.full((L, n * M), -1, np.int32)
    for l in range(L):
        e = me * L + l
        rows = [s * M + t for s in range(n) for t in range(len(idxs[s]))
                if np.any(np.asarray(idxs[s])[t] == e)]
        out[l, :len(rows)] = rows
    return out


def _expected_gather(ys, idxs, slots, me, n):
    L = E // n
    ids = np.asarray(idxs[me])
    out = np.zeros((len(ids), K, H), np.float32)
    for t in range(len(ids)):
        for k in range(K):
            e = ids[t, k]
            if 0 <= e < E:
                out[t, k] = np.asarray(ys[e // L][e % L, slots[me][t, k]]).astype(np.float32)
    return out


def low_latency(seed="0"):
    """Fused and split dispatch / combine, gather, cached dispatch, every dtype, FP8,
    invalid and duplicate ids, determinism, many calls (double buffering), and the
    same with every row moved by NVSHMEM puts (force_put)."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    from jax.sharding import PartitionSpec as P

    from jax_ep.cuda import extension, low_latency as ll
    from jax_ep.testing import oracle

    n, mesh, put, local, me = _env()
    spec = P("ep")
    mod = extension.nvshmem_module()
    checked = []
    smap = functools.partial(jax.shard_map, mesh=mesh, in_specs=spec, out_specs=spec)

    @functools.cache
    def fused(use_fp8, dtype_name):
        @jax.jit
        @smap
        def f(x, idx, w):
            recv_x, count, src, slot = ll.dispatch_call(
                x, idx, axis_index=_ax(), num_experts=E, max_tokens_per_rank=M, use_fp8=use_fp8,
                num_ranks=n)
            if use_fp8:
                y = recv_x[0].astype(jnp.float32) * jnp.repeat(recv_x[1], 128, axis=-1)
                y = (y * 2.0 - 1.0).astype(jnp.bfloat16)
            else:
                y = (recv_x.astype(jnp.float32) * 2.0 - 1.0).astype(recv_x.dtype)
            out = ll.combine_call(y, idx, w, src, count, slot, axis_index=_ax(), num_ranks=n)
            gathered = ll.gather_call(y, idx, src, count, slot, axis_index=_ax(), num_ranks=n)
            parts = tuple(recv_x) if use_fp8 else (recv_x,)
            return (*[p[None] for p in parts], count[None], src[None], slot, out,
                    gathered)
        return f

    @functools.cache
    def split(dtype_name):
        @jax.jit
        @smap
        def f(x, idx, w, x2, idx2):
            # Two ops in flight: send a, send b, receive a, receive b.
            send = dict(axis_index=_ax(), num_experts=E, max_tokens_per_rank=M)
            ta = ll.dispatch_send_call(x, idx, **send)
            tb = ll.dispatch_send_call(x2, idx2, **send)
            kw = dict(hidden=H, x_dtype=x.dtype, num_experts=E, max_tokens_per_rank=M,
                      num_ranks=n)
            ra, ca, sa, _ = ll.dispatch_recv_call(ta, idx, axis_index=_ax(), **kw)
            rb, cb, sb, _ = ll.dispatch_recv_call(tb, idx2, axis_index=_ax(), **kw)
            # The combine's send is a third op: it must run after both receives
            # (XLA may order the independent halves either way, e.g. send b
            # first, and then a send before receive b would wait for it).
            ra, rb = jax.lax.optimization_barrier((ra, rb))
            ya = (ra.astype(jnp.float32) * 2.0 - 1.0).astype(ra.dtype)
            tc = ll.combine_send_call(ya, sa, ca, axis_index=_ax(), num_ranks=n)
            out = ll.combine_recv_call(tc, idx, w, axis_index=_ax(), hidden=H, y_dtype=ya.dtype,
                                           num_experts=E, max_tokens_per_rank=M)
            return ra[None], rb[None], out
        return f

    @functools.cache
    def cached(with_scale):
        @jax.jit
        @smap
        def f(x, idx, w, slot, count):
            return ll.dispatch_cached_call(x, idx, slot, count[0], w if with_scale else None,
                                           axis_index=_ax(), num_experts=E,
                                           max_tokens_per_rank=M, num_ranks=n)[None]
        return f

    def check_fused(xs, idxs, ws, use_fp8, what):
        dtype_name = np.dtype(xs[0].dtype).name
        args = (put(xs), put(idxs), put(ws))
        got = [local(o) for o in fused(use_fp8, dtype_name)(*args)]
        again = [local(o) for o in fused(use_fp8, dtype_name)(*args)]
        exp = oracle.low_latency_dispatch(xs, idxs, E, M, use_fp8=use_fp8)
        if use_fp8:
            q, sc, count, src, slot, out, gathered = got
            _same(q[0], exp[me]["recv_x"][0], f"{what} recv_x e4m3")
            _same(sc[0], exp[me]["recv_x"][1], f"{what} recv_scales")
            ys = [(oracle.fp8_dequantize(*e["recv_x"]) * 2 - 1).astype(ml_dtypes.bfloat16)
                  for e in exp]
        else:
            recv_x, count, src, slot, out, gathered = got
            _same(recv_x[0], exp[me]["recv_x"], f"{what} recv_x")
            ys = [(e["recv_x"].astype(np.float32) * 2 - 1).astype(xs[0].dtype) for e in exp]
        _same(count[0], exp[me]["recv_count"], f"{what} recv_count")
        _same(src[0], _expected_recv_src(idxs, me, n), f"{what} recv_src")
        _same(slot, exp[me]["slots"], f"{what} slot")
        exp_out = oracle.low_latency_combine(ys, idxs, ws, E, M)
        _same(out, exp_out[me], f"{what} combine")
        slots = [e["slots"] for e in exp]
        _same(gathered, _expected_gather(ys, idxs, slots, me, n), f"{what} gather")
        for i, (a, b) in enumerate(zip(got, again)):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8),
                                          err_msg=f"{what} determinism output {i}")
        checked.append(what)
        return exp

    def check_split(xs, idxs, ws, xs2, idxs2, what):
        ra, rb, out = [local(o) for o in split(np.dtype(xs[0].dtype).name)(
            put(xs), put(idxs), put(ws), put(xs2), put(idxs2))]
        ea = oracle.low_latency_dispatch(xs, idxs, E, M)
        eb = oracle.low_latency_dispatch(xs2, idxs2, E, M)
        _same(ra[0], ea[me]["recv_x"], f"{what} first in flight")
        _same(rb[0], eb[me]["recv_x"], f"{what} second in flight")
        ys = [(e["recv_x"].astype(np.float32) * 2 - 1).astype(xs[0].dtype) for e in ea]
        _same(out, oracle.low_latency_combine(ys, idxs, ws, E, M)[me], f"{what} split combine")
        checked.append(what)

    def check_cached(xs, idxs, ws, what):
        exp = oracle.low_latency_dispatch(xs, idxs, E, M)
        slots = put([e["slots"] for e in exp])
        counts = put([e["recv_count"][None] for e in exp])
        plain = local(cached(False)(put(xs), put(idxs), put(ws), slots, counts))
        _same(plain[0], exp[me]["recv_x"], f"{what} cached dispatch")
        scaled = local(cached(True)(put(xs), put(idxs), put(ws), slots, counts))
        want = oracle.low_latency_combine_grad_y(xs, idxs, ws, E, M)[me]
        _same(scaled[0], want, f"{what} cached dispatch with scales")
        checked.append(what)

    def check_refuses_a_larger_m(what):
        """A direct combine whose max_tokens_per_rank exceeds the allocation's is refused
        before launch (its tokens' arrival counters would lie past the region's)."""
        m2 = 2 * M

        @jax.jit
        @smap
        def f(y, idx, w, src, count, slot):
            return ll.combine_call(y[0], idx, w, src[0], count[0], slot, axis_index=_ax(),
                                   num_ranks=n)

        L = E // n
        args = (put([np.zeros((1, L, n * m2, H), np.float32)] * n),
                put([np.zeros((T, K), np.int32)] * n), put([np.zeros((T, K), np.float32)] * n),
                put([np.full((1, L, n * m2), -1, np.int32)] * n),
                put([np.zeros((1, L), np.int32)] * n), put([np.zeros((T, K), np.int32)] * n))
        try:
            jax.block_until_ready(f(*args))
        except Exception as err:  # noqa: BLE001 - XLA's error type
            assert "max_tokens_per_rank exceeds" in str(err), str(err)
        else:
            raise AssertionError("a combine with max_tokens_per_rank > the allocation ran")
        checked.append(what)

    s = int(seed)
    check_refuses_a_larger_m("larger M refused")
    modes = {}  # path -> [GPU-scope flags, programmatic dependent launch, streamed combine]
    for force_put in (0, 1):
        mod.nvshmem_ll_set_options(30.0, 0, force_put)
        tag = "put " if force_put else ""
        info = mod.nvshmem_ll_info()
        modes["put" if force_put else "direct"] = [info["gpu_scope"], info["pdl"],
                                                   info["stream_combine"]]
        for dtype in (ml_dtypes.bfloat16, np.float32, np.float16):
            xs, idxs, ws = oracle.make_inputs(s, n, T, H, E, K, dtype=dtype, none_prob=0.05)
            check_fused(xs, idxs, ws, False, f"{tag}{np.dtype(dtype).name}")
        xs, idxs, ws = oracle.make_inputs(s + 1, n, T, H, E, K, dtype=ml_dtypes.bfloat16,
                                          none_prob=0.15, duplicate_prob=0.3)
        idxs = [np.where((i >= 0) & (i < E), i, -1).astype(np.int32) for i in idxs]
        check_fused(xs, idxs, ws, False, f"{tag}duplicates")
        check_fused(xs, idxs, ws, True, f"{tag}fp8")
        xs_nan = [np.array(x) for x in xs]
        for r, x in enumerate(xs_nan):  # NaN stays in its channel, inf scales its block
            x[r % T, 3] = np.nan
            x[(r + 1) % T, 128:256] = np.nan
            x[(r + 2) % T, 7] = np.inf
        check_fused(xs_nan, idxs, ws, True, f"{tag}fp8 nan and inf")
        xs2, idxs2, _ = oracle.make_inputs(s + 2, n, T, H, E, K, dtype=ml_dtypes.bfloat16)
        check_split(xs, idxs, ws, xs2, idxs2, f"{tag}split")
        xf, idxf, wf = oracle.make_inputs(s + 3, n, T, H, E, K, dtype=np.float32,
                                          duplicate_prob=0.3, none_prob=0.1)
        check_cached(xf, idxf, wf, f"{tag}cached")
        for call in range(6):  # fresh routing each call: nothing stale in either buffer set
            xs, idxs, ws = oracle.make_inputs(s + 10 + call, n, T - call, H, E, K,
                                              dtype=ml_dtypes.bfloat16, none_prob=0.1 * call)
            check_fused(xs, idxs, ws, False, f"{tag}routing {call}")
    mod.nvshmem_ll_set_options(30.0, 0, 0)
    assert mod.ll_last_error() is None, mod.ll_last_error()
    ll.teardown()
    return {"ranks": n, "checked": checked, "modes": modes}


def _silent_peer_setup():
    """The timeout workers' common start: a 3 s timeout, float32 inputs
    (oracle seed 0), an `ep` mesh and its shard_map; returns
    (n, xs, idxs, ws, put, smap)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jax_ep import Options
    from jax_ep.cuda import low_latency as ll
    from jax_ep.testing import oracle

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    ll.setup(mesh, "ep", max_tokens_per_rank=M, hidden=H, num_experts=E, top_k=K,
             itemsize=4, options=Options.from_env(), timeout_s=3)  # x is float32
    xs, idxs, ws = oracle.make_inputs(0, n, T, H, E, K)
    sharding = NamedSharding(mesh, P("ep"))
    put = lambda per: jax.make_array_from_callback(
        (n * T,) + per[0].shape[1:], sharding, lambda i: np.concatenate(per)[i])
    smap = functools.partial(jax.shard_map, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
    return n, xs, idxs, ws, put, smap


def one_rank_never_calls(skipper="1", wait_s="20"):
    """Every PE but `skipper` runs ll_dispatch; they must fail with the timeout
    message (naming the PE and what it waited for) instead of hanging."""
    import jax

    from jax_ep.cuda import extension, low_latency as ll

    n, xs, idxs, _, put, smap = _silent_peer_setup()

    @jax.jit
    @smap
    def f(x, idx):
        return ll.dispatch_call(x, idx, axis_index=_ax(), num_experts=E, max_tokens_per_rank=M,
                                    num_ranks=n)[1]

    args = put(xs), put(idxs)
    return run_without_peer(f.lower(*args).compile(), args, skipper, wait_s,
                            extension.nvshmem_module().ll_last_error)


def one_rank_skips_the_combine(skipper="1", wait_s="20"):
    """Every PE runs ll_dispatch, then every PE but `skipper` runs ll_combine:
    the streamed combine's receive waits for the skipper's rows and must fail
    with the timeout message naming it."""
    import jax

    from jax_ep.cuda import extension, low_latency as ll

    n, xs, idxs, ws, put, smap = _silent_peer_setup()

    @jax.jit
    @smap
    def dispatch(x, idx):
        recv_x, count, src, slot = ll.dispatch_call(x, idx, axis_index=_ax(), num_experts=E,
                                                        max_tokens_per_rank=M, num_ranks=n)
        return recv_x[None], count[None], src[None], slot

    @jax.jit
    @smap
    def combine(y, idx, w, src, count, slot):
        return ll.combine_call(y[0], idx, w, src[0], count[0], slot, axis_index=_ax(),
                               num_ranks=n)

    idx, w = put(idxs), put(ws)
    y, count, src, slot = jax.block_until_ready(dispatch(put(xs), idx))
    info = extension.nvshmem_module().nvshmem_ll_info()
    print("streamed combine:", info["stream_combine"], flush=True)
    args = y, idx, w, src, count, slot
    return run_without_peer(combine.lower(*args).compile(), args, skipper, wait_s,
                            extension.nvshmem_module().ll_last_error)


def public_api(seed="0", shape="small", ranks_per_node="0", layout="padded"):
    """jax_ep.low_latency_dispatch / low_latency_combine on backend='cuda' (set up by
    jax_ep.initialize(low_latency=True)): outputs, FP8 and the VJPs (small shape
    only) vs the oracle, at one of SHAPES. ranks_per_node > 0: virtual nodes, the
    PEs of other nodes reached by NVSHMEM puts. layout: the dispatch's receive
    layout ("padded" [L, R*M, H] or "ragged" [N, H]) every check runs on."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep
    from jax_ep.testing import oracle

    T, H, K, E, M = SHAPES[shape]
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    G = int(ranks_per_node) or None
    jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=M, hidden=H,
                      top_k=K, dtype="float32", num_experts=E, low_latency=True, timeout_s=30,
                      ranks_per_node=G)
    unmapped = jax_ep.runtime_info()["low_latency"]["unmapped_peers"]
    spec = P("ep")
    sharding = NamedSharding(mesh, spec)
    me = jax.process_index()

    def put(per_rank):
        g = np.concatenate([np.asarray(a) for a in per_rank])
        return jax.make_array_from_callback(g.shape, sharding, lambda i: g[i])

    mine = lambda a: np.asarray(a.addressable_shards[0].data)
    L = E // n
    lead = (n * M * min(K, L),) if layout == "ragged" else (L, n * M)
    kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, layout=layout,
              backend="cuda")

    def valid_rows(count):
        """The rows of recv_x holding data, given this rank's recv_count."""
        if layout == "ragged":
            return np.arange(lead[0]) < int(np.sum(count))
        return np.arange(n * M)[None, :] < np.asarray(count)[:, None]

    s = int(seed)
    xs, idxs, ws = oracle.make_inputs(s, n, T, H, E, K, dtype=ml_dtypes.bfloat16,
                                      none_prob=0.1, invalid_prob=0.05, duplicate_prob=0.2)

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def fwd(x, idx, w):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, idx, **kw)
        y = (rx.astype(jnp.float32) * 2.0 - 1.0).astype(rx.dtype)
        return rx[None], cnt[None], jax_ep.low_latency_combine(y, idx, w, h, backend="cuda")

    rx, cnt, out = (mine(a) for a in fwd(put(xs), put(idxs), put(ws)))
    exp = oracle.low_latency_dispatch(xs, idxs, E, M, layout=layout)
    ys = [(e["recv_x"].astype(np.float32) * 2 - 1).astype(ml_dtypes.bfloat16) for e in exp]
    exp_out = oracle.low_latency_combine(ys, idxs, ws, E, M, layout=layout)
    assert rx[0].shape == lead + (H,), (rx.shape, lead)
    valid = valid_rows(exp[me]["recv_count"])
    _same(rx[0][valid], exp[me]["recv_x"][valid], "recv_x")
    assert not np.any(rx[0][~valid].astype(np.float32)), "rows past recv_count must be zero"

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def unpadded(x, idx):
        rx, cnt, _ = jax_ep.low_latency_dispatch(x, idx, zero_padding=False, **kw)
        return rx[None], cnt[None]

    urx, ucnt = (mine(a) for a in unpadded(put(xs), put(idxs)))
    _same(urx[0][valid], rx[0][valid], "zero_padding=False: the valid rows")
    _same(ucnt, cnt, "zero_padding=False: recv_count")
    _same(cnt[0], exp[me]["recv_count"], "recv_count")
    np.testing.assert_allclose(out.astype(np.float32), exp_out[me].astype(np.float32),
                               rtol=1e-2, atol=1e-2, err_msg="combine (bf16 output)")

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def fp8(x, idx):
        (q, sc), _, _ = jax_ep.low_latency_dispatch(x, idx, use_fp8=True, **kw)
        return q[None], sc[None]

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def split(x, idx, w):
        pending = jax_ep.low_latency_dispatch_send(x, idx, **kw)
        rx, cnt, h = jax_ep.low_latency_dispatch_recv(pending)
        y = (rx.astype(jnp.float32) * 2.0 - 1.0).astype(rx.dtype)
        back = jax_ep.low_latency_combine_send(y, h, backend="cuda")
        return rx[None], cnt[None], jax_ep.low_latency_combine_recv(back, idx, w)

    srx, scnt, sout = (mine(a) for a in split(put(xs), put(idxs), put(ws)))
    _same(srx[0][valid], rx[0][valid], "split recv_x == fused")
    _same(scnt, cnt, "split recv_count == fused")
    _same(sout, out, "split combine == fused")

    q, sc = (mine(a)[0] for a in fp8(put(xs), put(idxs)))
    eq, es = oracle.low_latency_dispatch(xs, idxs, E, M, use_fp8=True,
                                         layout=layout)[me]["recv_x"]
    _same(sc[valid], es[valid], "fp8 scales")
    _same(q[valid], eq[valid], "fp8 values")
    checked = ["dispatch", "padding", "combine", "split", "fp8"]
    if shape != "small":
        jax_ep.shutdown()
        return {"ranks": n, "checked": checked, "shape": [T, H, K, E, M], "unmapped": unmapped,
                "layout": layout}

    # VJPs, float32.
    xs32 = [np.asarray(x, np.float32) for x in xs]
    rng = np.random.default_rng(s)
    ct_recv = [rng.standard_normal(lead + (H,)).astype(np.float32) for _ in range(n)]
    y32 = [rng.standard_normal(lead + (H,)).astype(np.float32) for _ in range(n)]
    ct_out = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(n)]

    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def both(x, y, idx, w):
        rx, _, h = jax_ep.low_latency_dispatch(x, idx, **kw)
        return rx, jax_ep.low_latency_combine(y, idx, w, h, backend="cuda")

    @jax.jit
    def grads(x, y, idx, w, cts):
        _, vjp = jax.vjp(lambda x, y, w: both(x, y, idx, w), x, y, w)
        return vjp(cts)

    @jax.jit
    def remat_grads(x, y, idx, w, cts):  # the forward ops run again in the backward pass
        _, vjp = jax.vjp(lambda x, y, w: jax.checkpoint(both)(x, y, idx, w), x, y, w)
        return vjp(cts)

    args = (put(xs32), put(y32), put(idxs), put(ws), (put(ct_recv), put(ct_out)))
    dx, dy, dw = (mine(a) for a in grads(*args))
    for name, a, b in zip("x y w".split(), (dx, dy, dw), remat_grads(*args)):
        np.testing.assert_array_equal(a, mine(b), err_msg=f"remat grad {name}")
    np.testing.assert_allclose(
        dx, oracle.low_latency_dispatch_grad_x(ct_recv, idxs, E, M, layout=layout)[me],
        rtol=1e-5, atol=1e-5, err_msg="dx")
    np.testing.assert_allclose(
        dy, oracle.low_latency_combine_grad_y(ct_out, idxs, ws, E, M, layout=layout)[me],
        rtol=1e-5, atol=1e-5, err_msg="dy")
    np.testing.assert_allclose(
        dw, oracle.low_latency_combine_grad_w(ct_out, y32, idxs, E, M, layout=layout)[me],
        rtol=1e-4, atol=1e-4, err_msg="dw")
    jax_ep.shutdown()
    return {"ranks": n, "checked": checked + ["gradients", "remat"], "shape": [T, H, K, E, M],
            "unmapped": unmapped, "layout": layout}
