"""Checks of jax_ep inside XLA's CUDA graphs (command buffers) and on its own
stream, run in each EP rank's process (tests/gpu/test_graphs_gpu.py).

`graphed` jits S steps of dispatch -> expert stand-in -> combine as one
`lax.scan`, compiled with command buffers forced on for custom calls. XLA
records the scan body's graph once and replays it for the other steps with
the same buffer addresses and new routing in them, so every replay must give
the numpy oracle's result for its own step: any per-call state the host kept
would freeze at the recorded value and fail from the second step (or the
third: the buffer sets alternate). The handlers' host-run count proves the
replays skipped the host: ungraphed, every op of every step runs it;
graphed, only the recordings do. Nothing here touches JAX at import.

`overlap` runs two micro-batches with `Options(comm_stream=1)` and reads a
profile: the communication kernels of one must run while the other's expert
matmuls do, and the results must equal the run without the option, bit for bit.
"""

import numpy as np

T, H, K, E = 32, 256, 4, 32
M = T  # low-latency max_tokens_per_rank

GRAPHS_ON = {"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL",
             "xla_gpu_graph_min_graph_size": 1}
GRAPHS_OFF = {"xla_gpu_enable_command_buffer": ""}

# The communication calls of one step, per mode (their handlers count host runs).
OPS_PER_STEP = {"intranode": 2, "internode": 2, "low_latency": 2, "low_latency_ragged": 2,
                "low_latency_split": 4}


def _same(got, want, what, exact=True):
    got = np.asarray(got, np.float32)
    want = np.asarray(want, np.float32)
    if exact:
        np.testing.assert_array_equal(got, want, err_msg=what)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=what)


def _setup(mode, n, backend):
    import jax

    import jax_ep

    mesh = jax.make_mesh((n,), ("ep",))
    common = dict(backend=backend, max_tokens_per_rank=T, hidden=H, top_k=K, dtype="float32",
                  timeout_s=30, num_experts=E)
    if mode == "internode":
        jax_ep.initialize(mesh, axis_name="ep", ranks_per_node=max(1, n // 2), **common)
    elif mode.startswith("low_latency"):
        jax_ep.initialize(mesh, axis_name="ep", low_latency=True, **common)
    else:
        jax_ep.initialize(mesh, axis_name="ep", **common)
    return mesh


def _step_fn(mode, n, backend):
    """One step on one rank: (x [T, H], idx, w) -> (out [T, H], counts int32 [E // n])."""
    import jax.numpy as jnp

    import jax_ep

    L = E // n
    if mode in ("intranode", "internode"):
        def step(x, idx, w):
            rx, _, _, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                          capacity=n * T, backend=backend)
            out = jax_ep.combine(rx * 0.5, h, backend=backend)
            return out, h.num_recv_tokens_per_expert[:L].astype(jnp.int32)
        return step

    layout = "ragged" if mode == "low_latency_ragged" else "padded"
    kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, layout=layout,
              backend=backend)
    if mode == "low_latency_split":
        def step(x, idx, w):
            rx, cnt, h = jax_ep.low_latency_dispatch_recv(
                jax_ep.low_latency_dispatch_send(x, idx, **kw))
            back = jax_ep.low_latency_combine_send(rx * 0.5, h, backend=backend)
            return jax_ep.low_latency_combine_recv(back, idx, w), cnt
        return step

    def step(x, idx, w):
        rx, cnt, h = jax_ep.low_latency_dispatch(x, idx, **kw)
        return jax_ep.low_latency_combine(rx * 0.5, idx, w, h, backend=backend), cnt
    return step


def _expected(mode, n, xs, idxs, ws):
    """The oracle's (out, per-expert counts) of every rank for one step."""
    from jax_ep.testing import oracle

    if mode in ("intranode", "internode"):
        exp = oracle.dispatch(xs, idxs, ws, E, n * T)
        ys = [e["recv_x"].astype(np.float32) * 0.5 for e in exp]
        G = max(1, n // 2) if mode == "internode" else None
        outs = oracle.combine(ys, idxs, E, n * T, ranks_per_node=G)
        return outs, [e["num_recv_tokens_per_expert"] for e in exp]
    layout = "ragged" if mode == "low_latency_ragged" else "padded"
    exp = oracle.low_latency_dispatch(xs, idxs, E, M, layout=layout)
    ys = [e["recv_x"].astype(np.float32) * 0.5 for e in exp]
    outs = oracle.low_latency_combine(ys, idxs, ws, E, M, layout=layout)
    return outs, [e["recv_count"] for e in exp]


def _next_step(x, idx, w, num_experts, xp):
    """The next step's inputs, derived from this step's so that a donated
    call keeps its buffers: tokens reversed, every valid expert id mapped by
    e -> (5 e + 3) mod E (a bijection: duplicates stay duplicates, -1 and
    invalid ids stay), the k order of the weights reversed. `xp` is jnp or np."""
    valid = (idx >= 0) & (idx < num_experts)
    moved = xp.where(valid, (idx * 5 + 3) % num_experts, idx).astype(idx.dtype)
    return x[::-1], moved[::-1], w[::-1, ::-1]


def graphed(mode="intranode", seed="0", steps="8", backend="cuda"):
    """S calls of one compiled step, graphed and not, each on the previous
    call's donated buffers with new contents (other routing): every call vs
    the oracle; the graphed run's host runs vs the ungraphed one's (a replay
    runs no handler host code, and XLA replays only while the buffers stay
    where they were recorded, hence the donation); graphed == ungraphed to
    the bit, gradients too. backend="reference" runs the same checks on CPU
    devices (no graphs there: a check of this worker itself)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep
    from jax_ep.cuda import extension
    from jax_ep.testing import oracle

    S, s0 = int(steps), int(seed)
    n = jax.device_count()
    mesh = _setup(mode, n, backend)
    spec = P("ep")
    sharding = NamedSharding(mesh, spec)
    me = jax.process_index()
    mine = [r for r, d in enumerate(mesh.devices.flat) if d.process_index == me]
    step = _step_fn(mode, n, backend)
    first = oracle.make_inputs(s0, n, T, H, E, K, none_prob=0.1, invalid_prob=0.05,
                               duplicate_prob=0.2)
    per_step = [first]
    for _ in range(S - 1):
        per_step.append(tuple(list(z) for z in zip(*[
            _next_step(per_step[-1][0][r], per_step[-1][1][r], per_step[-1][2][r], E, np)
            for r in range(n)])))

    def put(per_rank):
        g = np.concatenate([np.asarray(a) for a in per_rank])
        return jax.make_array_from_callback(g.shape, sharding, lambda i: g[i])

    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def body(x, idx, w):
        out, cnt = step(x, idx, w)
        return (out, cnt.reshape(1, -1)) + _next_step(x, idx, w, E, jnp)

    on_gpu = jax.default_backend() == "gpu"
    options_on, options_off = (GRAPHS_ON, GRAPHS_OFF) if on_gpu else (None, None)

    def local(a):
        rows = a.shape[0] // n
        return {(s.index[0].start or 0) // rows: np.asarray(s.data) for s in a.addressable_shards}

    def run(options):
        """S calls; [(out, counts) per call as {rank: array}], host runs per call."""
        fn = jax.jit(body, donate_argnums=(0, 1, 2), compiler_options=options)
        state = tuple(put(a) for a in per_step[0])
        got, runs = [], []
        for _ in range(S):
            before = extension.handler_host_runs()
            out, cnt, *state = fn(*state)
            got.append((local(out), local(cnt)))  # copied out, so the buffers are free again
            runs.append(extension.handler_host_runs() - before)
            del out, cnt
        return got, runs

    got_off, runs_off = run(options_off)
    got_on, runs_on = run(options_on)
    exact = mode in ("intranode", "internode")
    for s in range(S):
        xs, idxs, ws = per_step[s]
        outs, counts = _expected(mode, n, xs, idxs, ws)
        for name, got in (("ungraphed", got_off), ("graphed", got_on)):
            o, c = got[s]
            for r in mine:
                _same(o[r], outs[r], f"{mode} {name} call {s} rank {r}", exact=exact)
                _same(c[r].reshape(-1), counts[r], f"{mode} {name} counts call {s} rank {r}")
        for r in mine:  # graphs change nothing, to the bit
            np.testing.assert_array_equal(got_on[s][0][r].view(np.uint32),
                                          got_off[s][0][r].view(np.uint32))
    result = {"ranks": n, "mode": mode, "steps": S, "ops_per_step": OPS_PER_STEP[mode],
              "host_runs": {"ungraphed": sum(runs_off), "graphed": sum(runs_on),
                            "graphed_per_call": runs_on}}
    if mode == "low_latency_split":  # the split forms are not differentiable
        jax_ep.shutdown()
        return result

    @jax.shard_map(mesh=mesh, in_specs=spec, out_specs=spec)
    def loss_grad(x, idx, w):
        return jax.grad(lambda x: jnp.sum(step(x, idx, w)[0] ** 2))(x)

    args = tuple(put(a) for a in per_step[0])
    g_on = jax.jit(loss_grad, compiler_options=options_on)(*args)
    g_off = jax.jit(loss_grad, compiler_options=options_off)(*args)
    for r in mine:
        np.testing.assert_array_equal(np.asarray(local(g_on)[r]).view(np.uint32),
                                      np.asarray(local(g_off)[r]).view(np.uint32),
                                      err_msg=f"{mode} gradient graphed vs not, rank {r}")
    jax_ep.shutdown()
    return result


def overlap():
    """Two micro-batches, comm on stream 1: the profile's overlap of jax_ep
    kernels with matmul kernels, and bitwise equality with the serial run."""
    import collections
    import functools
    import glob
    import tempfile

    import jax
    import jax.numpy as jnp
    from jax.profiler import ProfileData
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep

    n = jax.device_count()
    Tm, Hm, Fm, Em = 2048, 2048, 4096, 8 * n
    mesh = jax.make_mesh((n,), ("ep",))
    spec = P("ep")
    sharding = NamedSharding(mesh, spec)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * n * Tm, Hm), np.float32).astype(jnp.bfloat16)
    idx = np.argsort(rng.random((2 * n * Tm, Em)), axis=1)[:, :2].astype(np.int32)
    w = rng.uniform(0.1, 1, (2 * n * Tm, 2)).astype(np.float32)
    wi = (rng.standard_normal((Hm, Fm), np.float32) * 0.02).astype(jnp.bfloat16)
    wo = (rng.standard_normal((Fm, Hm), np.float32) * 0.02).astype(jnp.bfloat16)
    put = lambda a: jax.device_put(a, sharding)
    rep = NamedSharding(mesh, P())
    args = (put(x), put(idx), put(w), jax.device_put(wi, rep), jax.device_put(wo, rep))

    def build():
        @functools.partial(jax.jit, compiler_options=jax_ep.COMM_STREAM_COMPILER_OPTIONS)
        @jax.shard_map(mesh=mesh, in_specs=(spec, spec, spec, P(), P()), out_specs=spec)
        def two_micro_batches(x, idx, w, wi, wo):
            outs = []
            for mb in range(2):  # independent: mb 1's matmuls may overlap mb 0's combine
                sl = slice(mb * Tm, (mb + 1) * Tm)
                rx, _, _, h = jax_ep.dispatch(x[sl], idx[sl], w[sl], num_experts=Em,
                                              axis_name="ep", capacity=n * Tm,
                                              backend="cuda")
                y = jax.nn.gelu(rx @ wi) @ wo
                outs.append(jax_ep.combine(y.astype(rx.dtype), h, backend="cuda"))
            return jnp.concatenate(outs)
        return two_micro_batches

    def init(options):
        jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=Tm,
                          hidden=Hm, top_k=2, dtype="bfloat16", timeout_s=60, options=options)

    init(jax_ep.Options())
    serial = np.asarray(build()(*args).addressable_shards[0].data)
    jax_ep.shutdown()
    init(jax_ep.Options(comm_stream=1))
    fn = build()
    streamed = np.asarray(fn(*args).addressable_shards[0].data)
    np.testing.assert_array_equal(streamed.view(np.uint16), serial.view(np.uint16),
                                  err_msg="comm_stream changed the result")

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(3):
                out = fn(*args)
            jax.block_until_ready(out)
        paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(paths[0])
        spans = collections.defaultdict(list)  # (kind, stream) -> [(start, end)]
        for plane in data.planes:
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                for ev in line.events:
                    name = ev.name.lower()
                    is_comm = "jax_ep::" in name and any(
                        k in name for k in ("notify", "dispatch", "combine"))
                    kind = ("comm" if is_comm else
                            "gemm" if any(k in name for k in ("gemm", "nvjet", "cutlass", "sm90"))
                            else None)
                    if kind:
                        spans[kind, line.name].append((ev.start_ns, ev.start_ns + ev.duration_ns))
    jax_ep.shutdown()
    comm = [(s, e, line) for (k, line), v in spans.items() if k == "comm" for s, e in v]
    gemm = [(s, e, line) for (k, line), v in spans.items() if k == "gemm" for s, e in v]
    overlap_ns = sum(max(0, min(e1, e2) - max(s1, s2))
                     for s1, e1, l1 in comm for s2, e2, l2 in gemm if l1 != l2)
    return {"ranks": n, "overlap_us": overlap_ns / 1e3,
            "comm_streams": sorted({line for _, _, line in comm}),
            "gemm_streams": sorted({line for _, _, line in gemm}),
            "comm_kernels": len(comm), "gemm_kernels": len(gemm)}


def stale_graph(mode="low_latency"):
    """An ahead-of-time compiled, graphed function run again after shutdown and a
    new initialize, on the same arrays. Safe outcomes only: XLA replays the old
    graph and its first kernel stops with jax_ep's message (the buffers it
    points at are freed), or XLA records the graph again (the handlers' host
    code runs) and the result is the oracle's. Returns which one happened."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jax_ep
    from jax_ep.cuda import extension
    from jax_ep.testing import oracle

    n = jax.device_count()
    mesh = _setup(mode, n, "cuda")
    spec = P("ep")
    sharding = NamedSharding(mesh, spec)
    step = _step_fn(mode, n, "cuda")
    xs, idxs, ws = oracle.make_inputs(7, n, T, H, E, K)
    put = lambda a: jax.device_put(np.concatenate(a), sharding)
    args = (put(xs), put(idxs), put(ws))
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=spec, out_specs=spec),
                 compiler_options=GRAPHS_ON).lower(*args).compile()
    for _ in range(3):  # recorded, then replayed at steady addresses
        jax.block_until_ready(fn(*args))
    jax_ep.shutdown()
    _setup(mode, n, "cuda")
    before = extension.handler_host_runs()
    try:
        out, _ = jax.block_until_ready(fn(*args))
    except jax.errors.JaxRuntimeError as e:
        return {"outcome": "stopped", "message": str(e),
                "host_runs": extension.handler_host_runs() - before}
    want, _ = _expected(mode, n, xs, idxs, ws)
    got = np.asarray(out.addressable_shards[0].data)
    _same(got, want[0], f"{mode} after re-initialize", exact=mode == "intranode")
    jax_ep.shutdown()
    return {"outcome": "recorded again", "host_runs": extension.handler_host_runs() - before}
