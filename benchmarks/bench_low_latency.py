"""Benchmark of the low-latency (decode) ops in DeepEP's setting (docs/design.md §7).

128 tokens per rank, hidden 7168, top-8 of 256 experts; FP8 dispatch, BF16
combine (BF16 dispatch too). Dispatch runs with zero_padding=False, like
DeepEP (rows past each expert's count unwritten); "dispatch_fp8_zero_padded"
is the default, which also zeroes the rest of the [L, R*M, H] output.
Reports µs per op (the slowest rank) for N ranks as N processes sharing GPU 0
under CUDA MPS, one NVSHMEM PE each: wall clock per jitted call, per call in
a chain of CHAIN dependent calls inside one program (no host work between
them; cuda only), and kernel time from a profile (one process only). With
one rank the reference backend runs in the same process for comparison (XLA
collectives cannot run between processes sharing one GPU).

    python benchmarks/bench_low_latency.py --ranks 1
    python benchmarks/bench_low_latency.py --ranks 8
    python benchmarks/bench_low_latency.py --ranks 1 --profile   # kernels per op
    python benchmarks/bench_low_latency.py --ranks 1 --graphs    # each jitted op one CUDA graph

--graphs compiles every jitted call with XLA's command buffers forced on for
custom calls (GRAPHS_ON), so the whole call replays as one CUDA graph: the
bar is a graphed dispatch's wall time within 1.3x of its kernel time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from _timing import (device_kernels, drop, lift, mesh_of, print_kernels, putter,
                     time_per_call)

H, K, E, M = 7168, 8, 256, 128
CHAIN = 20  # calls per program in the chained timing
GRAPHS_ON = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
             "xla_gpu_graph_min_graph_size": 1}


def measure(backend, iters, tokens=M, seed=0, profile=False, warm_calls=2000,
            kernel_time=False, with_chain=True, graphs=False):
    """{op: (seconds per call, GPU kernel seconds per call or None, seconds
    per call in a chain or None)} for this process's rank. Kernel times come
    from a profile, with kernel_time only: under MPS the profiled run of
    several processes is much slower than the timed one (a kernel also spins
    while it waits for its peers). Chains run for cuda with with_chain."""
    import jax
    import ml_dtypes
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jax_ep
    from jax_ep.testing import oracle

    mesh = mesh_of(jax.devices())
    n = jax.device_count()
    spec = P("ep")
    xs, idxs, ws = oracle.make_inputs(seed, n, tokens, H, E, K, dtype=ml_dtypes.bfloat16)
    put = putter(mesh)
    x, idx, w = put(xs), put(idxs), put(ws)
    options = GRAPHS_ON if graphs else None
    smap = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec),
                             compiler_options=options)
    kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, backend=backend)

    # DeepEP leaves the rows past each expert's count unwritten: zero_padding=False
    # is the comparable setting; the default (zeroed, E * M * H elements) is shown too.
    fast = dict(kw, zero_padding=False)
    # Each op returns all its outputs but the handle (the reference backend's
    # unused outputs would otherwise not be computed at all).
    ops = {
        "dispatch_fp8": lambda x, i: jax_ep.low_latency_dispatch(x, i, use_fp8=True, **fast)[:2],
        "dispatch_bf16": lambda x, i: jax_ep.low_latency_dispatch(x, i, **fast)[:2],
        "dispatch_fp8_zero_padded": lambda x, i: jax_ep.low_latency_dispatch(
            x, i, use_fp8=True, **kw)[:2],
        "combine_bf16": lambda y, i, ww, h: jax_ep.low_latency_combine(y, i, ww, drop(h),
                                                                       backend=backend),
    }
    with_handle = smap(lambda x, i: (lambda o: (o[0], lift(o[2])))(
        jax_ep.low_latency_dispatch(x, i, **kw)))
    y, handle = with_handle(x, idx)

    # A program argument no output element equals (NaN), for `chained`.
    never = put([np.full(1, np.nan, np.float32)] * n)

    # Every rank makes the same number of calls (see time_per_call).
    def timed(f, chain, *args):
        sec = time_per_call(f, *args, iters=iters, warm_calls=warm_calls)
        in_chain = None
        if chain is not None:
            in_chain = time_per_call(chain, *args, never, iters=max(1, iters // CHAIN),
                                     warm_calls=max(1, warm_calls // CHAIN)) / CHAIN
        gpu = None
        if kernel_time:  # DeepEP reports kernel times
            try:
                gpu = device_kernels(f, *args)[1] or None
            except Exception:  # noqa: BLE001 - no CUPTI here: wall time only
                pass
        return sec, gpu, in_chain

    results = {}
    for name, op in ops.items():
        args = (y, idx, w, handle) if name.startswith("combine") else (x, idx)
        single = smap(op)
        if profile and name != "dispatch_fp8_zero_padded":
            print_kernels(f"{backend} {name}", single, *args)
        # Chained timing for cuda only: the reference's earlier calls in a
        # chain would be cut down to the one element the next call depends on.
        # The dependency enters through an argument the custom call reads:
        # topk_idx for dispatch, topk_weights for combine (whose ids come from
        # the handle; a chain through topk_idx let XLA merge the combines).
        through = 2 if name.startswith("combine") else 1
        chain = smap(chained(op, CHAIN, through)) if backend == "cuda" and with_chain else None
        results[name] = timed(single, chain, *args)
    return results


def chained(op, calls, through):
    """`calls` calls of op in one program: argument `through` of each call
    depends on the previous call's first output element, compared with
    `never` (a program argument, NaN), which XLA cannot fold away, so the
    calls run in order and cannot be merged; no host work between calls, one
    tiny elementwise kernel per call. Custom calls run whole, so the time is
    the op's."""
    import jax
    import jax.numpy as jnp

    def run(*args):
        *args, never = args
        for _ in range(calls):
            out = op(*args)
            probe = jax.tree.leaves(out)[0].reshape(-1)[0].astype(jnp.float32)
            args[through] = jnp.where(probe == never[0], -1, args[through])
        return out

    return run


def worker(iters="200", with_reference="0", profile="0", chain="1", options="{}", graphs="0"):
    """One rank's process: its timings (and the reference's, when asked);
    rank 0 also returns the kernel profile text when `profile` is "1".
    `options`: JSON of jax_ep.Options fields to set (the rest from the environment)."""
    import contextlib
    import dataclasses
    import io
    import json

    import jax

    import jax_ep

    out = {}
    text = io.StringIO()
    profile = profile == "1" and jax.process_index() == 0
    with contextlib.redirect_stdout(text):
        alone = jax.process_count() == 1
        if with_reference == "1":
            out["reference"] = measure("reference", int(iters), profile=profile,
                                       kernel_time=alone, graphs=graphs == "1")
        jax_ep.initialize(mesh_of(jax.devices()), axis_name="ep", backend="cuda",
                          max_tokens_per_rank=M, hidden=H, top_k=K, num_experts=E,
                          dtype="bfloat16", low_latency=True,
                          options=dataclasses.replace(jax_ep.Options.from_env(),
                                                      **json.loads(options)))
        out["cuda"] = measure("cuda", int(iters), profile=profile, kernel_time=alone,
                              with_chain=chain == "1", graphs=graphs == "1")
        jax_ep.shutdown()
    out["profile"] = text.getvalue()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=1, help="processes sharing GPU 0 (MPS)")
    p.add_argument("--gpu-per-rank", action="store_true",
                   help="process i on GPU i instead (a host with --ranks GPUs; NVLink peers)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--no-chain", action="store_true", help="skip the chained timing")
    p.add_argument("--timeout", type=float, default=560,
                   help="seconds before the workers are stopped (their output tails are shown)")
    p.add_argument("--profile", action="store_true",
                   help="also print rank 0's GPU kernels per op and their times")
    p.add_argument("--no-stream", action="store_true",
                   help="Options(streamed_combine=False): the plain fused combine")
    p.add_argument("--no-pdl", action="store_true",
                   help="Options(dependent_launch=False): plain kernel launches")
    p.add_argument("--system-scope", action="store_true",
                   help="Options(system_scope=True): system-scope flags and fences")
    p.add_argument("--force-put", action="store_true",
                   help="Options(force_put=True): every row by NVSHMEM puts")
    p.add_argument("--graphs", action="store_true",
                   help="compile with XLA's command buffers forced on (each call one CUDA graph)")
    args = p.parse_args(argv)
    from jax_ep.testing import launch, mps_daemon

    options = {}  # only what the flags change; the rest comes from Options.from_env()
    if args.no_stream:
        options["streamed_combine"] = False
    if args.no_pdl:
        options["dependent_launch"] = False
    if args.system_scope:
        options["system_scope"] = True
    if args.force_put:
        options["force_put"] = True

    here = os.path.dirname(os.path.abspath(__file__))
    with mps_daemon():
        platform = "gpu-per-process" if args.gpu_per_rank else "gpu"
        results = launch("bench_low_latency:worker", args.ranks, platform=platform,
                         timeout=args.timeout,
                         env={"PYTHONPATH": here},
                         args=(str(args.iters), "1" if args.ranks == 1 else "0",
                               "1" if args.profile else "0", "0" if args.no_chain else "1",
                               json.dumps(options), "1" if args.graphs else "0"))
    if options:
        print("options:", options)
    if args.graphs:
        print("graphs: every jitted call compiled with", GRAPHS_ON)
    print(results[0].result["profile"], end="")
    print(f"wall: µs per jitted call (host dispatch included); chained: µs per call in a "
          f"program of {CHAIN} dependent calls (no host work between calls); GPU: kernel time per call from "
          f"a profile (one process only); the slowest rank counts.")
    print("| R | op | jax_ep wall | jax_ep chained | jax_ep GPU | reference wall | "
          "reference GPU | speedup |\n|---|---|---|---|---|---|---|---|")
    us = lambda v: f"{v * 1e6:.1f}" if v else "n/a"
    for op in results[0].result["cuda"]:
        sec, gpu, chain = (_slowest([r.result["cuda"][op][i] for r in results])
                           for i in range(3))
        ref, ref_gpu, _ = results[0].result.get("reference", {}).get(op, (None, None, None))
        speedup = ", ".join(f"{what} {a / b:.1f}x" for what, a, b in
                            (("wall", ref, sec), ("GPU", ref_gpu, gpu)) if a and b)
        print(f"| {args.ranks} | {op} | {us(sec)} | {us(chain)} | {us(gpu)} | {us(ref)} | "
              f"{us(ref_gpu)} | {speedup} |")


def _slowest(values):
    """The largest of the ranks' values, None when any rank has none."""
    return max(values) if all(values) else None

if __name__ == "__main__":
    sys.exit(main())
