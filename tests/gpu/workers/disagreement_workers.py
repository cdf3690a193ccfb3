"""Ranks whose calls disagree, in each process of a 2-process GPU job: the
kernels must stop every rank with a message naming both calls (or the mesh
order), before any row moves, instead of garbage or a timeout.

Every process compiles every program (multi-process compilation waits for
all of them), then each runs the one its kind gives it. Nothing here touches
JAX at import.
"""

import time

import numpy as np

T, H, K, E, M = 32, 256, 4, 16, 32


def _put(mesh, per_rank):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    g = np.concatenate([np.asarray(a) for a in per_rank])
    return jax.make_array_from_callback(g.shape, NamedSharding(mesh, P("ep")), lambda i: g[i])


def _run_and_report(compiled_by_process, args_by_process, last_error):
    """Process p runs its program; returns what it saw (message, raised, seconds)."""
    import jax

    me = jax.process_index()
    start = time.time()
    try:
        jax.block_until_ready(compiled_by_process[me](*args_by_process[me]))
        raised = None
    except Exception as err:  # noqa: BLE001 - XLA's error type
        raised = str(err)
    message = last_error()
    print("jax_ep message:", message, flush=True)
    print("the call raised:", (raised or "")[:1500], flush=True)
    print("message in the exception:", bool(message) and raised is not None and message in raised,
          flush=True)
    return {"raised": raised is not None, "message": message, "seconds": time.time() - start}


def intranode(kind):
    """kind "op": process 1 runs combine while process 0 runs dispatch; "capacity":
    their dispatches differ in capacity; "order": both call under a mesh whose
    device order is the reverse of initialize's."""
    import jax
    from jax.sharding import Mesh, PartitionSpec as P

    import jax_ep
    from jax_ep.cuda import extension
    from jax_ep.testing import oracle

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=T, hidden=H,
                      top_k=K, dtype="float32", timeout_s=20)
    xs, idxs, ws = oracle.make_inputs(0, n, T, H, E, K)

    def dispatch_program(call_mesh, capacity=None):
        @jax.jit
        @jax.shard_map(mesh=call_mesh, in_specs=P("ep"), out_specs=P("ep"))
        def f(x, idx, w):
            return jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep", capacity=capacity,
                                   backend="cuda")[0]
        return f

    args = tuple(_put(mesh, a) for a in (xs, idxs, ws))
    if kind == "order":
        reversed_mesh = Mesh(np.asarray(mesh.devices)[::-1], ("ep",))
        rargs = tuple(_put(reversed_mesh, a) for a in (xs, idxs, ws))
        f = dispatch_program(reversed_mesh).lower(*rargs).compile()
        return _run_and_report([f, f], [rargs, rargs], extension.cuda_module().last_error)
    if kind == "capacity":
        a = dispatch_program(mesh, n * T).lower(*args).compile()
        b = dispatch_program(mesh, n * T - 8).lower(*args).compile()
        return _run_and_report([a, b], [args, args], extension.cuda_module().last_error)

    # "op": both programs dispatch (op #1 agrees), then 0 dispatches again, 1 combines
    def two_ops(second_is_combine):
        @jax.jit
        @jax.shard_map(mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
        def f(x, idx, w):
            recv_x, _, _, h = jax_ep.dispatch(x, idx, w, num_experts=E, axis_name="ep",
                                              backend="cuda")
            if second_is_combine:
                return jax_ep.combine(recv_x, h, backend="cuda")
            # both results used (XLA drops custom calls whose results nobody reads) and
            # the second call's input differs (XLA merges identical calls into one)
            return recv_x[:T] + jax_ep.dispatch(x + 1.0, idx, w, num_experts=E,
                                                axis_name="ep", backend="cuda")[0][:T]
        return f.lower(*args).compile()

    programs = [two_ops(False), two_ops(True)]
    return _run_and_report(programs, [args, args], extension.cuda_module().last_error)


def low_latency(kind):
    """kind "shape": process 1's dispatch has top-2 where process 0's has top-4;
    "order": both call under a mesh of the reverse device order."""
    import jax
    from jax.sharding import Mesh, PartitionSpec as P

    import jax_ep
    from jax_ep.cuda import extension
    from jax_ep.testing import oracle

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=M, hidden=H,
                      top_k=K, num_experts=E, dtype="float32", low_latency=True, timeout_s=20)
    last_error = extension.nvshmem_module().ll_last_error

    def program(call_mesh):
        @jax.jit
        @jax.shard_map(mesh=call_mesh, in_specs=P("ep"), out_specs=P("ep"))
        def f(x, idx):
            return jax_ep.low_latency_dispatch(x, idx, num_experts=E, axis_name="ep",
                                               max_tokens_per_rank=M, backend="cuda")[1]
        return f

    xs, idxs, _ = oracle.make_inputs(1, n, T, H, E, K)
    if kind == "order":
        reversed_mesh = Mesh(np.asarray(mesh.devices)[::-1], ("ep",))
        args = (_put(reversed_mesh, xs), _put(reversed_mesh, idxs))
        f = program(reversed_mesh).lower(*args).compile()
        return _run_and_report([f, f], [args, args], last_error)
    args4 = (_put(mesh, xs), _put(mesh, idxs))
    args2 = (_put(mesh, xs), _put(mesh, [i[:, :2] for i in idxs]))
    a = program(mesh).lower(*args4).compile()
    b = program(mesh).lower(*args2).compile()
    return _run_and_report([a, b], [args4, args2], last_error)
