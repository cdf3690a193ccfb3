"""Checks of the CUDA backend's dispatch / combine that run in each EP rank's
process (or in place for one rank): the intranode kernels, or with
ranks_per_node the internode ones on virtual nodes. Each process regenerates every rank's inputs from a seed and checks
its own ranks' outputs against the numpy oracle; no XLA collective runs, since
processes sharing one GPU cannot use NCCL. Nothing here touches JAX at import.
"""

import functools

import numpy as np

from silent_peer import run_without_peer

T, H, K, E = 64, 256, 4, 32


def _env(ranks_per_node=None):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=T, hidden=H,
                      top_k=K, dtype="float32", timeout_s=30, ranks_per_node=ranks_per_node)
    sharding = NamedSharding(mesh, P("ep"))
    me = jax.process_index()
    mine = [r for r, d in enumerate(mesh.devices.flat) if d.process_index == me]

    def put(per_rank):
        g = np.concatenate([np.asarray(a) for a in per_rank])
        return jax.make_array_from_callback(g.shape, sharding, lambda i: g[i])

    def local(a):
        """{rank: numpy shard} for this process's ranks."""
        rows = a.shape[0] // n
        return {(s.index[0].start or 0) // rows: np.asarray(s.data) for s in a.addressable_shards}

    return n, mesh, put, local, mine


def _bits(a):
    return np.ascontiguousarray(np.asarray(a)).view(np.uint8)


def _same(got, want, what):
    """Exactly equal values (-0.0 == +0.0: the oracle starts its sums from +0.0)."""
    if isinstance(want, tuple):
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{what}[{i}]")
        return
    got = np.asarray(got)
    want = np.asarray(want, dtype=got.dtype)
    if got.dtype.kind == "f" or got.dtype.itemsize == 1 and got.dtype.kind not in "iub":
        got, want = got.astype(np.float32), want.astype(np.float32)
    np.testing.assert_array_equal(got, want, err_msg=what)


def _same_bits(a, b, what):
    np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=what)


def _hot_expert(idxs, hot=3, share=0.7, seed=0):
    """Skewed routing: most tokens name expert `hot` first (duplicates allowed)."""
    rng = np.random.default_rng(seed)
    out = []
    for idx in idxs:
        idx = idx.copy()
        idx[rng.random(idx.shape[0]) < share, 0] = hot
        out.append(idx)
    return out


def dispatch_combine(seed="0", ranks_per_node="0"):
    """Every dtype, overflow, invalid ids, duplicates, a hot expert, determinism,
    changing routing, gradients. ranks_per_node > 0: the internode kernels on
    virtual nodes of that many ranks (combine sums in the node tree)."""
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    from jax.sharding import PartitionSpec as P

    import jax_ep
    from jax_ep.testing import oracle

    G = int(ranks_per_node) or None
    n, mesh, put, local, mine = _env(G)
    internode = jax_ep.runtime_info()["internode"] is not None
    assert internode == (G is not None and G < n), (G, n, jax_ep.runtime_info())
    spec = P("ep")
    checked = []

    @functools.cache
    def compiled(fp8, capacity):
        @jax.jit
        @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
        def f(x, idx, w):
            rx, ri, rw, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                            capacity=capacity, backend="cuda")
            y = rx[0].astype(jnp.float32) * jnp.repeat(rx[1], 128, 1) if fp8 else rx
            y = (y.astype(jnp.float32) * 0.5).astype(jnp.bfloat16 if fp8 else rx.dtype)
            counts = jnp.stack([h.num_recv_tokens, h.num_dropped_tokens, h.num_invalid_experts])
            return rx, ri, rw, counts[None], h.num_recv_tokens_per_expert[None], \
                jax_ep.combine(y, h, backend="cuda")
        return f

    def run(xs, idxs, ws, capacity):
        fp8 = isinstance(xs[0], tuple)
        f = compiled(fp8, capacity)
        x_in = (put([a for a, _ in xs]), put([b for _, b in xs])) if fp8 else put(xs)
        return [local(o) if not isinstance(o, tuple) else tuple(local(p) for p in o)
                for o in f(x_in, put(idxs), put(ws))]

    def check(xs, idxs, ws, capacity, what):
        got = run(xs, idxs, ws, capacity)
        again = run(xs, idxs, ws, capacity)
        exp = oracle.dispatch(xs, idxs, ws, E, capacity)
        ys = []
        for e in exp:
            rx = e["recv_x"]
            y = oracle.fp8_dequantize(*rx) if isinstance(rx, tuple) else rx.astype(np.float32)
            ys.append((y * 0.5).astype(ml_dtypes.bfloat16 if isinstance(rx, tuple) else rx.dtype))
        exp_comb = oracle.combine(ys, idxs, E, capacity, ranks_per_node=G)
        rx, ri, rw, counts, per_exp, comb = got
        for r in mine:
            pick = lambda o: tuple(p[r] for p in o) if isinstance(o, tuple) else o[r]
            _same(pick(rx), exp[r]["recv_x"], f"{what} recv_x rank {r}")
            _same(ri[r], exp[r]["recv_topk_idx"], f"{what} recv_topk_idx rank {r}")
            _same(rw[r], exp[r]["recv_topk_weights"], f"{what} recv_topk_weights rank {r}")
            want = [exp[r]["num_recv_tokens"], exp[r]["num_dropped_tokens"],
                    exp[r]["num_invalid_experts"]]
            assert counts[r][0].tolist() == want, (what, r, counts[r][0], want)
            _same(per_exp[r][0], exp[r]["num_recv_tokens_per_expert"], f"{what} per-expert {r}")
            _same(comb[r], exp_comb[r], f"{what} combine rank {r}")
            for i, (a, b) in enumerate(zip(got, again)):
                a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
                for j, (pa, pb) in enumerate(zip(a, b)):
                    _same_bits(pa[r], pb[r], f"{what} determinism output {i}.{j} rank {r}")
        checked.append(what)

    s = int(seed)
    for name, dtype in [("bf16", ml_dtypes.bfloat16), ("f32", np.float32), ("f16", np.float16)]:
        xs, idxs, ws = oracle.make_inputs(s, n, T, H, E, K, dtype=dtype, none_prob=0.05)
        check(xs, idxs, ws, None, name)
    xs, idxs, ws = oracle.make_inputs(s + 1, n, T, H, E, K, dtype=np.float32)
    check([oracle.fp8_quantize(x) for x in xs], idxs, ws, None, "fp8 pair")
    xs, idxs, ws = oracle.make_inputs(s + 2, n, T, H, E, K, dtype=ml_dtypes.bfloat16,
                                      invalid_prob=0.1, none_prob=0.1, duplicate_prob=0.2)
    check(xs, idxs, ws, None, "invalid ids")
    check(xs, idxs, ws, max(1, (n * T) // 3), "overflow")
    check(xs, _hot_expert(idxs, seed=s), ws, None, "hot expert")
    check(xs, _hot_expert(idxs, seed=s), ws, max(1, T // 2), "hot expert, overflow")
    for call in range(3):  # same shapes, new routing: no stale state between calls
        xs, idxs, ws = oracle.make_inputs(s + 10 + call, n, T, H, E, K, dtype=ml_dtypes.bfloat16,
                                          none_prob=0.3 * call)
        check(xs, idxs, ws, None, f"routing {call}")

    # Gradients: dispatch VJP = combine (+ per-k weight gather); combine VJP = cached dispatch.
    xs, idxs, ws = oracle.make_inputs(s + 20, n, T, H, E, K, dtype=np.float32, none_prob=0.1)
    cap = max(1, (n * T) // 2)
    rng = np.random.default_rng(s)
    ct_x = [rng.standard_normal((cap, H)).astype(np.float32) for _ in range(n)]
    ct_w = [rng.standard_normal((cap, K)).astype(np.float32) for _ in range(n)]
    ct_out = [rng.standard_normal((T, H)).astype(np.float32) for _ in range(n)]

    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def fwd(x, idx, w):
        rx, _, rw, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                       capacity=cap, backend="cuda")
        return rx, rw, jax_ep.combine(rx, h, backend="cuda")

    @jax.jit
    def grads(x, idx, w, cts):
        _, vjp = jax.vjp(lambda x, w: fwd(x, idx, w), x, w)
        return vjp(cts)

    zeros = lambda shape: put([np.zeros(shape, np.float32)] * n)
    x_g, idx_g, w_g = put(xs), put(idxs), put(ws)
    dx, dw = grads(x_g, idx_g, w_g, (put(ct_x), put(ct_w), zeros((T, H))))
    exp_dx = oracle.combine(ct_x, idxs, E, cap, ranks_per_node=G)
    exp_dw = oracle.dispatch_weights_grad(ct_w, idxs, E, cap, ranks_per_node=G)
    dx2, _ = grads(x_g, idx_g, w_g, (zeros((cap, H)), zeros((cap, K)), put(ct_out)))
    exp_dx2 = oracle.combine([e["recv_x"] for e in oracle.dispatch(ct_out, idxs, ws, E, cap)],
                             idxs, E, cap, ranks_per_node=G)
    @jax.jit
    def remat_grads(x, idx, w, cts):  # the forward ops run again in the backward pass
        _, vjp = jax.vjp(lambda x, w: jax.checkpoint(fwd)(x, idx, w), x, w)
        return vjp(cts)

    cts = (put(ct_x), put(ct_w), put(ct_out))
    g_plain, g_remat = grads(x_g, idx_g, w_g, cts), remat_grads(x_g, idx_g, w_g, cts)
    dx, dw, dx2 = local(dx), local(dw), local(dx2)
    for r in mine:
        _same(dx[r], exp_dx[r], f"grad x rank {r}")
        _same(dw[r], exp_dw[r], f"grad w rank {r}")
        _same(dx2[r], exp_dx2[r], f"grad through combine rank {r}")
        for i, (a, b) in enumerate(zip(g_plain, g_remat)):
            _same_bits(local(a)[r], local(b)[r], f"remat grad {i} rank {r}")
    checked += ["gradients", "remat"]
    jax_ep.shutdown()
    return {"ranks": n, "checked": checked, "internode": internode}


def one_rank_never_calls(skipper="1", wait_s="20", ranks_per_node="0"):
    """Every rank but `skipper` calls dispatch; they must fail with the timeout
    message (naming the rank and what it waited for) instead of hanging.
    ranks_per_node > 0: the internode kernels (the skipper on another node)."""
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_ep
    from jax_ep.cuda import extension
    from jax_ep.testing import oracle

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    G = int(ranks_per_node) or None
    jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=T, hidden=H,
                      top_k=K, dtype="float32", timeout_s=3, ranks_per_node=G)
    xs, idxs, ws = oracle.make_inputs(0, n, T, H, E, K)
    sharding = jax.NamedSharding(mesh, P("ep"))
    put = lambda per: jax.make_array_from_callback(
        (n * T,) + per[0].shape[1:], sharding, lambda i: np.concatenate(per)[i])

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
    def f(x, idx, w):
        return jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", backend="cuda")[0]

    args = put(xs), put(idxs), put(ws)
    last_error = (extension.nvshmem_module().internode_last_error if G
                  else extension.cuda_module().last_error)
    return run_without_peer(f.lower(*args).compile(), args, skipper, wait_s, last_error)
