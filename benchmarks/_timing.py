"""What the benchmarks share: wall-clock timing of jitted calls, per-rank
inputs on a mesh, and handles that cross a shard_map boundary."""

from __future__ import annotations

import time

import numpy as np

from jax_ep.moe import CUDA_COMPILER_OPTIONS


def time_per_call(fn, *args, iters, warm_s=0.5, repeats=5, warm_calls=None):
    """Seconds per call: best of `repeats` runs of `iters` back-to-back calls.

    Warms up for `warm_s` seconds first: an idle GPU needs that long to reach
    its clocks (a 3-call warm-up measured a copy at a fifth of its speed).
    Processes that run collective ops must make the same number of calls:
    they pass `warm_calls` instead (a timed warm-up would end after different
    counts, and the extra calls of one rank would wait for peers forever).
    """
    import jax

    if warm_calls is not None:
        for _ in range(warm_calls):
            out = fn(*args)
        jax.block_until_ready(out)
    start = time.perf_counter()
    while warm_calls is None and time.perf_counter() - start < warm_s:
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def mesh_of(devices):
    import jax

    return jax.sharding.Mesh(np.asarray(devices), ("ep",))


def putter(mesh):
    """put(list of per-rank numpy arrays) -> a global array sharded over 'ep'."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    sharding = NamedSharding(mesh, P("ep"))

    def put(per_rank):
        g = np.concatenate([np.asarray(a) for a in per_rank])
        return jax.make_array_from_callback(g.shape, sharding, lambda i: g[i])

    return put


def lift(handle):
    """Scalars of a handle become [1] pieces so it can leave shard_map."""
    import jax

    return jax.tree.map(lambda a: a[None] if a.ndim == 0 else a, handle)


def drop(handle):
    """Undo `lift` inside the next shard_map."""
    import jax

    return jax.tree.map(lambda a: a[0] if a.shape == (1,) else a, handle)


def device_kernels(fn, *args, calls=20):
    """Per-call GPU kernel times of `fn`, from a jax.profiler trace.

    Returns (rows, busy_s): rows are (kernel name, seconds per call, launches
    per call) sorted by time, busy_s the summed kernel time per call. Empty
    when the trace has no GPU plane (no GPU, or no CUPTI).
    """
    import collections
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(paths[0]) if paths else None
        total = collections.defaultdict(float)
        count = collections.Counter()
        for plane in (data.planes if data else []):
            if not plane.name.startswith("/device:GPU"):
                continue
            for line in plane.lines:
                if "stream" not in line.name.lower():
                    continue
                for ev in line.events:
                    total[ev.name] += ev.duration_ns * 1e-9
                    count[ev.name] += 1
    rows = sorted(((name, sec / calls, count[name] / calls) for name, sec in total.items()),
                  key=lambda r: -r[1])
    return rows, sum(r[1] for r in rows)


def print_kernels(title, fn, *args, calls=20, top=12):
    """Prints `device_kernels` as a small table (the `top` slowest kernels)."""
    rows, busy = device_kernels(fn, *args, calls=calls)
    if not rows:
        print(f"{title}: no GPU kernels in the profile (no GPU plane)")
        return
    print(f"{title}: {busy * 1e6:.1f} µs of kernels per call, {len(rows)} kinds")
    for name, sec, n in rows[:top]:
        print(f"    {sec * 1e6:8.1f} µs  x{n:4.1f}  {name[:90]}")


def launch_ranks(target, n, args, *, gpu_per_rank=False):
    """`target` in n processes: process i on GPU i, or all sharing GPU 0 under MPS."""
    import os

    from jax_ep.testing import launch, mps_daemon

    here = os.path.dirname(os.path.abspath(__file__))
    kw = dict(timeout=560, env={"PYTHONPATH": here}, args=tuple(str(a) for a in args))
    if gpu_per_rank:
        return launch(target, n, platform="gpu-per-process", **kw)
    with mps_daemon():
        return launch(target, n, platform="gpu", **kw)


def add_run_options(parser, *, profile=True):
    """The options every MoE benchmark takes besides its sizes: --ranks, --no-profile
    (with `profile`), --no-reference and --dry-run."""
    parser.add_argument("--ranks", type=int, default=1, help="processes sharing GPU 0 (MPS)")
    if profile:
        parser.add_argument("--no-profile", action="store_true", help="wall times only")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference backend's run (one rank)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU devices in this process, the reference backend, tiny sizes")


def sizes_from(parser, args, full, dry):
    """The run's config: each size from its flag, else the full (or --dry-run)
    default, plus ranks / dry_run / reference / profile; rejects --ranks not
    dividing the experts and a top-k outside [1, experts]."""
    sizes = dry if args.dry_run else full
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in sizes.items()}
    cfg.update(ranks=args.ranks, dry_run=args.dry_run, reference=not args.no_reference,
               profile=not getattr(args, "no_profile", False))
    if args.ranks < 1 or cfg["experts"] % args.ranks:
        parser.error(f"--ranks ({args.ranks}) must divide --experts ({cfg['experts']})")
    if not 0 < cfg["top_k"] <= cfg["experts"]:
        parser.error(f"--top-k must be in [1, {cfg['experts']}]")
    return cfg


def run_ranks(target, cfg):
    """The benchmark's `target` worker in cfg["ranks"] processes sharing GPU 0,
    each given cfg as JSON; their results."""
    import json
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # room for the peers
    return [r.result for r in launch_ranks(target, cfg["ranks"], (json.dumps(cfg),))]


# How XLA lowers jax.lax.ragged_dot on CUDA (jax_ep.moe.CUDA_COMPILER_OPTIONS
# says why): the benchmarks compile with cuDNN's grouped GEMM by default.
RAGGED_DOT_LOWERINGS = {
    "cudnn": CUDA_COMPILER_OPTIONS,
    "xla": {key: False for key in CUDA_COMPILER_OPTIONS},
}


def add_ragged_dot_option(parser):
    parser.add_argument("--ragged-dot", choices=sorted(RAGGED_DOT_LOWERINGS), default="cudnn",
                        help="how XLA lowers jax.lax.ragged_dot on the GPU: cuDNN's grouped "
                             "GEMM, or XLA's default masked dense dot")


def gpu_options(platform, *parts):
    """jax.jit's compiler_options: the dicts in `parts` merged on a GPU, None
    elsewhere (they are XLA:GPU's options)."""
    if platform != "gpu":
        return None
    merged = {}
    for part in parts:
        merged.update(part or {})
    return merged or None


def ragged_dot_lowering(compiled_text):
    """What XLA made of the program's ragged dots, from its compiled HLO text:
    "cuDNN" when cuDNN fusions are there, "dense" when none is, or "none" for
    a program without one."""
    if "cudnn" in compiled_text.lower():
        return "cuDNN"
    return "dense (masked)" if "dot" in compiled_text else "none"
