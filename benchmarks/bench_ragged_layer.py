"""One decode MoE layer at DeepSeek's shape: padded + batched matmul vs ragged + ragged_dot.

DeepSeek-V3's decode layer: hidden 7168, SwiGLU experts of width 2048, 256
experts, top-8, 128 tokens per rank (uniform random routing,
jax_ep.testing.oracle.make_inputs), BF16 (--fp8: FP8 dispatch, dequantized
to BF16 before the experts, inside their time). R ranks run as R processes
sharing GPU 0 under CUDA MPS, L = E / R experts each. Per layout, timed
apart and as one jitted layer:
  dispatch  jax_ep.low_latency_dispatch(zero_padding=False, layout=...);
  experts   on the dispatched rows: padded, jax_ep.moe.padded_experts (an
            einsum over [L, R*M, H] x [L, H, F], rows past recv_count masked);
            ragged, jax_ep.moe.ragged_experts (jax.lax.ragged_dot over [N, H]
            with recv_count as group_sizes, N = R*M*min(K, L));
  combine   jax_ep.low_latency_combine of the experts' output;
  layer     the three in one program.
Cells are "wall / GPU" µs: wall clock per jitted call (host dispatch
included, best of 5 runs of --iters calls, the slowest rank) and kernel time
per call from a jax.profiler trace (one process only: profiles under MPS
distort; else n/a). With one rank the reference backend runs the same ops in
the same process at the same shapes (--no-reference skips it; with several
processes XLA collectives cannot run between processes sharing one GPU).

The experts' floor: the bytes of the experts' weights (3 matrices each,
E x 3 x H x F x 2 B; the R processes share one GPU's HBM, so every rank's
weights count) over the HBM rate of a device-to-device copy (bytes read +
written per second by an elementwise pass over 1 GiB, measured alone on the
GPU before the ranks start). The bars: ragged experts / floor <= 1.5, padded
layer / ragged layer >= 3, ragged dispatch / padded dispatch <= 1.10,
ragged combine / padded combine <= 1.10 (kernel times where every operand
has one, else wall).

Memory: 8 processes hold 32 x 3 x 7168 x 2048 x 2 B = 2.8 GB of weights
each (22.5 GB in all; one rank holds all 256 experts), plus the padded
layout's [L, R*M, H] rows (470 MB per process).

    python benchmarks/bench_ragged_layer.py --ranks 1
    python benchmarks/bench_ragged_layer.py --ranks 8
    python benchmarks/bench_ragged_layer.py --ranks 8 --fp8
    python benchmarks/bench_ragged_layer.py --dry-run [--ranks 2] [--fp8]   # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _timing import (RAGGED_DOT_LOWERINGS, add_ragged_dot_option, add_run_options,
                     device_kernels, drop, gpu_options, lift, mesh_of, putter,
                     ragged_dot_lowering, run_ranks, sizes_from, time_per_call)
from bench_decode_step import cpu_devices, device_normal, run_experts

FULL = dict(hidden=7168, expert_width=2048, experts=256, top_k=8, tokens=128, iters=20)
DRY = dict(hidden=256, expert_width=64, experts=8, top_k=2, tokens=8, iters=2)
LAYOUTS = ("padded", "ragged")
OPS = ("dispatch", "experts", "combine", "layer")
COPY_BYTES = 1 << 30       # the copy that measures the HBM rate (GPU)
DRY_COPY_BYTES = 8 << 20   # --dry-run
WARM_CALLS = 10            # N processes: a fixed warm-up count (see _timing.time_per_call)


def expert_weight_bytes(num_experts, hidden, width, itemsize=2):
    """Bytes of `num_experts` SwiGLU experts: gate and up [H, F], down [F, H] each."""
    return num_experts * (2 * hidden * width + width * hidden) * itemsize


def floor_seconds(weight_bytes, copy_bytes_per_s):
    """The time to read the weights once at a copy's HBM rate (read + written bytes per s)."""
    return weight_bytes / copy_bytes_per_s


def copy_bandwidth(nbytes, iters, device=None, warm_calls=None):
    """Bytes read + written per second by an elementwise pass (negation) over
    `nbytes` of bfloat16 on `device` (default: JAX's default device)."""
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones(nbytes // 2, jnp.bfloat16), device)
    neg = jax.jit(lambda v: -v)
    return 2 * a.nbytes / time_per_call(neg, a, iters=iters, warm_calls=warm_calls)


def bar_ratios(times, floor_s):
    """[(what, ratio, bar, met, basis)] from times {layout: {op: (wall s, GPU s or None)}}.

    Each ratio uses kernel time where both of its operands have one, else wall
    (the floor counts as a kernel time)."""
    def pick(a, b):
        if a[1] and (b is None or b[1]):
            return a[1], (b[1] if b is not None else None), "GPU"
        return a[0], (b[0] if b is not None else None), "wall"

    padded, ragged = times["padded"], times["ragged"]
    out = []
    num, _, basis = pick(ragged["experts"], None)
    ratio = num / floor_s
    out.append(("ragged experts / floor", ratio, "<= 1.5", ratio <= 1.5, basis))
    for what, a, b, bar, met in (
            ("padded layer / ragged layer", padded["layer"], ragged["layer"], ">= 3",
             lambda r: r >= 3),
            ("ragged dispatch / padded dispatch", ragged["dispatch"], padded["dispatch"],
             "<= 1.10", lambda r: r <= 1.10),
            ("ragged combine / padded combine", ragged["combine"], padded["combine"],
             "<= 1.10", lambda r: r <= 1.10)):
        num, den, basis = pick(a, b)
        out.append((what, num / den, bar, met(num / den), basis))
    return out


def make_inputs(mesh, cfg, seed=0):
    """x bf16 [R*T, H], topk_idx, topk_weights: sharded over 'ep' (oracle.make_inputs)."""
    import ml_dtypes

    from jax_ep.testing import oracle

    xs, idxs, ws = oracle.make_inputs(seed, mesh.size, cfg["tokens"], cfg["hidden"],
                                      cfg["experts"], cfg["top_k"], dtype=ml_dtypes.bfloat16)
    put = putter(mesh)
    return put(xs), put(idxs), put(ws)


def make_weights(mesh, cfg, seed=0):
    """w_gate, w_up [R*L, H, F], w_down [R*L, F, H], bf16, sharded over 'ep'."""
    H, F, L = cfg["hidden"], cfg["expert_width"], cfg["experts"] // mesh.size
    return (device_normal(mesh, (L, H, F), seed=seed + 2, scale=H ** -0.5),
            device_normal(mesh, (L, H, F), seed=seed + 3, scale=H ** -0.5),
            device_normal(mesh, (L, F, H), seed=seed + 4, scale=F ** -0.5))


def measure_layout(mesh, cfg, backend, layout, inputs, weights, *, warm_calls, kernel_time):
    """{op: [wall s, GPU s or None]} for this process's rank, one layout."""
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_ep

    spec = P("ep")
    options = gpu_options(mesh.devices.flat[0].platform, RAGGED_DOT_LOWERINGS[cfg["ragged_dot"]])
    smap = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec),
                             compiler_options=options)
    kw = dict(num_experts=cfg["experts"], axis_name="ep", max_tokens_per_rank=cfg["tokens"],
              use_fp8=cfg["fp8"], zero_padding=False, layout=layout, backend=backend)
    combine = lambda y, i, w, h: jax_ep.low_latency_combine(y, i, w, h, backend=backend)

    def layer(x, i, w, g, u, d):
        recv, count, handle = jax_ep.low_latency_dispatch(x, i, **kw)
        return combine(run_experts(recv, count, g, u, d, layout), i, w, handle)

    x, idx, w = inputs
    # The dispatch alone returns all its outputs but the handle; the handle
    # leaves shard_map with its scalars as [1] pieces (lift) for the combine.
    dispatch = smap(lambda x, i: jax_ep.low_latency_dispatch(x, i, **kw)[:2])
    recv, count, handle = smap(lambda x, i: (lambda o: (o[0], o[1], lift(o[2])))(
        jax_ep.low_latency_dispatch(x, i, **kw)))(x, idx)
    experts = smap(lambda r, c, g, u, d: run_experts(r, c, g, u, d, layout))
    y = experts(recv, count, *weights)
    calls = {
        "dispatch": (dispatch, (x, idx)),
        "experts": (experts, (recv, count) + tuple(weights)),
        "combine": (smap(lambda y, i, w, h: combine(y, i, w, drop(h))), (y, idx, w, handle)),
        "layer": (smap(layer), (x, idx, w) + tuple(weights)),
    }
    out = {}
    for op in OPS:
        fn, args = calls[op]
        wall = time_per_call(fn, *args, iters=cfg["iters"], warm_calls=warm_calls)
        gpu = None
        if kernel_time:
            try:
                gpu = device_kernels(fn, *args)[1] or None
            except Exception as e:  # noqa: BLE001 - no CUPTI here: wall time only
                print(f"profile of {backend} {layout} {op} failed: {type(e).__name__}: {e}")
        out[op] = [wall, gpu]
    if layout == "ragged":
        out["lowering"] = ragged_dot_lowering(calls["experts"][0].lower(
            *calls["experts"][1]).compile().as_text())
    return out


def measure(mesh, cfg, backends, *, warm_calls, kernel_time):
    """{backend: {layout: {op: [wall, GPU]}}}; the reference before initialize."""
    import jax_ep

    inputs, weights = make_inputs(mesh, cfg), make_weights(mesh, cfg)
    out = {}
    for backend in backends:
        if backend == "cuda":
            jax_ep.initialize(mesh, axis_name="ep", backend="cuda",
                              max_tokens_per_rank=cfg["tokens"], hidden=cfg["hidden"],
                              top_k=cfg["top_k"], num_experts=cfg["experts"], dtype="bfloat16",
                              low_latency=True)
        out[backend] = {layout: measure_layout(mesh, cfg, backend, layout, inputs, weights,
                                               warm_calls=warm_calls, kernel_time=kernel_time)
                        for layout in LAYOUTS}
        if backend == "cuda":
            jax_ep.shutdown()
    return out


def worker(cfg_json):
    """One rank's process on the GPU."""
    import jax

    cfg = json.loads(cfg_json)
    alone = jax.process_count() == 1
    backends = (["reference"] if alone and cfg["reference"] else []) + ["cuda"]
    return measure(mesh_of(jax.devices()), cfg, backends, warm_calls=None if alone else WARM_CALLS,
                   kernel_time=alone)


def dry_run(cfg):
    """Everything on CPU devices in this process, the reference backend."""
    devices = cpu_devices(cfg["ranks"])
    copy_bw = copy_bandwidth(DRY_COPY_BYTES, iters=2, device=devices[0], warm_calls=1)
    times = measure(mesh_of(devices), cfg, ["reference"], warm_calls=1, kernel_time=False)
    return [times], copy_bw


def merge(results):
    """Per-rank {backend: {layout: {op: [wall, GPU]}}} -> the same with each
    time the largest over the ranks (GPU None where any rank has none)."""
    out = {}
    for backend, layouts in results[0].items():
        out[backend] = {}
        for layout, ops in layouts.items():
            out[backend][layout] = {}
            for op in OPS:
                vals = [r[backend][layout][op] for r in results]
                gpus = [v[1] for v in vals]
                out[backend][layout][op] = (max(v[0] for v in vals),
                                            max(gpus) if all(gpus) else None)
    return out


def _cell(t):
    wall, gpu = t
    return f"{wall * 1e6:9.1f} / " + (f"{gpu * 1e6:9.1f}" if gpu else f"{'n/a':>9}")


def report(cfg, results, copy_bw):
    R, E, H, F = cfg["ranks"], cfg["experts"], cfg["hidden"], cfg["expert_width"]
    times = merge(results)
    where = "CPU, dry run" if cfg["dry_run"] else (
        "one GPU" if R == 1 else f"{R} processes on one GPU (MPS)")
    print(f"one MoE layer: {cfg['tokens']} tokens per rank, hidden {H}, SwiGLU width {F}, "
          f"{E} experts (top-{cfg['top_k']}), {'FP8' if cfg['fp8'] else 'BF16'} dispatch, "
          f"BF16 combine, R = {R} ({where})")
    lowered = sorted({lay["lowering"] for res in results for b in res.values()
                      if isinstance(b, dict) for lay in b.values()
                      if isinstance(lay, dict) and "lowering" in lay})
    print(f"ragged_dot: --ragged-dot {cfg['ragged_dot']}; XLA lowered the experts' ragged_dot "
          f"as: {', '.join(lowered) or 'n/a'}")
    weight_bytes = expert_weight_bytes(E, H, F)
    floor = floor_seconds(weight_bytes, copy_bw)
    copy_mib = (DRY_COPY_BYTES if cfg["dry_run"] else COPY_BYTES) >> 20
    print(f"copy: {copy_bw / 1e9:.1f} GB/s (bytes read + written per second, elementwise pass "
          f"over {copy_mib} MiB{'' if cfg['dry_run'] else ', alone on the GPU'})")
    print(f"experts' weights: {E} x 3 x {H} x {F} x 2 B = {weight_bytes / 1e9:.3g} GB "
          f"({E // R} experts x {R} rank(s)); floor (read once at the copy's rate): "
          f"{floor * 1e6:.1f} µs")
    if "reference" in times:
        print("reference backend: the same shapes in the same process"
              + (" (CPU dry run: the only backend)" if cfg["dry_run"] else " (one rank only)"))
    elif not cfg["dry_run"]:
        print("reference backend: not run (several processes on one GPU, or --no-reference)")
    print("| R | backend | layout | dispatch µs | experts µs | combine µs | "
          "dispatch + experts + combine µs | layer µs |\n|---|---|---|---|---|---|---|---|")
    for backend, layouts in times.items():
        for layout, ops in layouts.items():
            parts = [ops[op] for op in ("dispatch", "experts", "combine")]
            total = (sum(p[0] for p in parts),
                     sum(p[1] for p in parts) if all(p[1] for p in parts) else None)
            print(f"| {R} | {backend:<9} | {layout:<6} | "
                  + " | ".join(_cell(t) for t in parts + [total, ops["layer"]]) + " |")
    best = "cuda" if "cuda" in times else "reference"
    print(f"bars ({best} backend; GPU: kernel times, wall: wall clock"
          + ("; dry run: CPU figures, the bars say nothing here" if cfg["dry_run"] else "")
          + "):")
    for what, ratio, bar, met, basis in bar_ratios(times[best], floor):
        print(f"  {what:<34} {ratio:8.2f}  (bar {bar}: {'met' if met else 'missed'}; {basis})")
    print("cells: wall / GPU µs per call; wall: host dispatch included, the slowest rank; GPU: "
          "kernel time from a jax.profiler trace (one process only)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(p, profile=False)
    p.add_argument("--hidden", type=int, help=f"H ({FULL['hidden']})")
    p.add_argument("--expert-width", type=int, help=f"F ({FULL['expert_width']})")
    p.add_argument("--experts", type=int, help=f"E ({FULL['experts']})")
    p.add_argument("--top-k", type=int, help=f"K ({FULL['top_k']})")
    p.add_argument("--tokens", type=int, help=f"tokens per rank = max_tokens_per_rank "
                   f"({FULL['tokens']})")
    p.add_argument("--iters", type=int, help=f"calls per timed run ({FULL['iters']})")
    p.add_argument("--fp8", action="store_true", help="FP8 dispatch (use_fp8=True)")
    add_ragged_dot_option(p)
    p.add_argument("--copy-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.copy_only:
        print(copy_bandwidth(COPY_BYTES, iters=20))
        return 0
    cfg = sizes_from(p, args, FULL, DRY)
    cfg.update(fp8=args.fp8, ragged_dot=args.ragged_dot)
    if min(cfg["tokens"], cfg["iters"], cfg["expert_width"], cfg["hidden"]) < 1 or \
            (cfg["fp8"] and cfg["hidden"] % 128):
        p.error("--tokens, --iters, --hidden, --expert-width must be positive (--hidden a "
                "multiple of 128 with --fp8)")
    if args.dry_run:
        results, copy_bw = dry_run(cfg)
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        # Alone on the GPU, in a child process: this one must hold no CUDA
        # context while the MPS clients run.
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--copy-only"],
                             capture_output=True, text=True, check=True, timeout=300).stdout
        copy_bw = float(out.split()[-1])
        results = run_ranks("bench_ragged_layer:worker", cfg)
    report(cfg, results, copy_bw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
