"""Decode-step benchmark: N MoE layers of router -> low-latency dispatch -> experts -> combine.

One decode step is --layers layers, unrolled in one jitted program. Each
layer: RMS norm of the running activations x [T, H] (bf16), the router (a
per-layer [H, E] matmul, softmax, top-K: the routing differs from layer to
layer), `jax_ep.low_latency_dispatch` (zero_padding=False, as DeepEP), the
local experts' SwiGLU (--layout ragged, the default: `jax.lax.ragged_dot` on
the ragged rows, `jax_ep.moe.ragged_experts`; --layout padded: a batched
matmul over [L, R*M, H], `jax_ep.moe.padded_experts`), `low_latency_combine`
and the residual add. The routers are per layer; all layers share one set of
expert weights (L = E / R experts per rank, [L, H, F] gate and up, [L, F, H]
down): that saves memory, not time, since the GPU's share of one layer's
experts (E x 3 x H x F x 2 B over all ranks = 805 MB at the defaults, 403 MB
at --hidden 1024; 1/R of it per process) is far larger than its L2 cache,
so every layer reads its weights from HBM again.

Variants, each jitted twice, with XLA command buffers (CUDA graphs) on
(`xla_gpu_enable_command_buffer` = FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,
`xla_gpu_graph_min_graph_size` = 1) and off (`xla_gpu_enable_command_buffer`
empty); the options are passed only when the mesh is on GPUs:
  jax_ep (cuda)       the step above on the CUDA kernels;
  jax_ep (reference)  the same step on jax_ep's reference backend (one rank
                      only: XLA collectives cannot run between processes
                      sharing one GPU; at --dry-run the only jax_ep variant);
  no-comm             the same step with dispatch / combine replaced by a
                      local stand-in of the same shapes (`local_dispatch`,
                      `local_combine`): this rank's own tokens, grouped by
                      local expert (expert id mod L) into the dispatch's
                      layout by one gather, and summed back with the
                      weights. jax_ep - no-comm is what EP costs the step.
                      The stand-in writes every row of its [L, R*M, H] /
                      [N, H] output; the kernels with zero_padding=False
                      write only the valid rows.

Table, one row per variant and graphs on / off (N processes: the slowest
rank): µs per step and per layer (wall clock per jitted call, host dispatch
included, best of 5 runs of --iters calls), the kernel µs per step and
kernel launches per step from a jax.profiler trace, and the time of
jax_ep's own kernels in it (names containing "jax_ep" or "LLKernelEntry")
with their share. The XLA fusions around the kernels (routing, the ragged
layout's index arithmetic) are not in that share: the rows "jax_ep - no-comm" give
the whole cost. With N processes on one GPU (MPS) the profiles overlap and
the low-latency kernels spin while they wait for their peers: their kernel
times are upper bounds. Then the bars: graphed / ungraphed step with jax_ep,
and wall / kernel time of the graphed step with jax_ep. --no-profile skips
the traces, --no-reference the reference's step.

    python benchmarks/bench_decode_step.py --ranks 1
    python benchmarks/bench_decode_step.py --ranks 8
    python benchmarks/bench_decode_step.py --ranks 1 --hidden 1024
    python benchmarks/bench_decode_step.py --ranks 8 --hidden 1024
    python benchmarks/bench_decode_step.py --ranks 8 --layout padded
    python benchmarks/bench_decode_step.py --dry-run [--ranks 2]   # CPU, reference, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import sys

from _timing import (RAGGED_DOT_LOWERINGS, add_ragged_dot_option, add_run_options,
                     device_kernels, gpu_options, mesh_of, ragged_dot_lowering, run_ranks,
                     sizes_from, time_per_call)

# Full-size defaults; --dry-run replaces every size not given on the command line.
FULL = dict(layers=32, hidden=2048, experts=64, top_k=8, tokens=128, expert_width=1024,
            iters=50)
DRY = dict(layers=2, hidden=128, experts=8, top_k=2, tokens=8, expert_width=64, iters=2)
GRAPHS_ON = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
             "xla_gpu_graph_min_graph_size": 1}
GRAPHS_OFF = {"xla_gpu_enable_command_buffer": ""}
JAX_EP_KERNELS = ("jax_ep", "LLKernelEntry")  # substrings of jax_ep's kernel names
WARM_CALLS = 100  # N processes: a fixed warm-up count (see _timing.time_per_call)
PROFILE_CALLS = 10


def compiler_options(graphs, platform, ragged_dot="cudnn"):
    """jax.jit's compiler_options for command buffers on (graphs=True) or off
    and the ragged_dot lowering; None off GPUs (the options are XLA:GPU's)."""
    return gpu_options(platform, GRAPHS_ON if graphs else GRAPHS_OFF,
                       RAGGED_DOT_LOWERINGS[ragged_dot])


def jax_ep_kernel_seconds(rows):
    """Summed seconds of the kernels of `_timing.device_kernels` rows that are jax_ep's."""
    return sum(sec for name, sec, _ in rows if any(s in name for s in JAX_EP_KERNELS))


# --- the no-communication stand-in -------------------------------------------

def local_dispatch(x, topk_idx, *, num_local, rows_per_expert, layout, ragged_rows):
    """low_latency_dispatch's shapes without communication (one rank, no collectives).

    Local expert of (t, k): topk_idx[t, k] mod L (ids < 0: none). Each local
    expert gets the tokens naming it (once per token however often it is
    named), in token order: in the padded layout at rows (l, 0 ..) of [L,
    R*M, H], in the ragged one one expert after the other in [ragged_rows,
    H]; other rows are zero. Returns (recv_x, recv_count int32 [L], rows
    int32 [T, K]: the flat row of each (t, k) in recv_x, -1 for none). With
    one rank this is exactly low_latency_dispatch.
    """
    import jax.numpy as jnp

    tokens, _ = topk_idx.shape
    expert = jnp.where(topk_idx >= 0, topk_idx % num_local, num_local)  # L: none
    has = jnp.any(expert[:, :, None] == jnp.arange(num_local)[None, None, :], axis=1)
    count = jnp.sum(has, axis=0, dtype=jnp.int32)                      # [L]
    position = jnp.cumsum(has, axis=0, dtype=jnp.int32) - 1            # [T, L]
    safe = jnp.minimum(expert, num_local - 1)
    within = jnp.take_along_axis(position, safe, axis=1)               # [T, K]
    if layout == "ragged":
        total = ragged_rows
        rows = (jnp.cumsum(count) - count)[safe] + within
    else:
        total = num_local * rows_per_expert
        rows = safe * rows_per_expert + within
    rows = jnp.where(expert < num_local, rows, -1).astype(jnp.int32)
    token = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[:, None], rows.shape)
    # Source token of every output row (`tokens`: none); a token naming one
    # expert twice writes the same value twice.
    source = jnp.full((total,), tokens, jnp.int32).at[jnp.where(rows >= 0, rows, total)].set(
        token, mode="drop")
    recv = jnp.take(x, source, axis=0, mode="fill", fill_value=0)
    if layout == "padded":
        recv = recv.reshape((num_local, rows_per_expert) + x.shape[1:])
    return recv, count, rows


def local_combine(y, rows, topk_weights):
    """low_latency_combine's math on local rows: sum over k in order of
    w[t, k] * y[rows[t, k]] in float32 (rows < 0 add nothing), in y's dtype."""
    import jax.numpy as jnp

    flat = y.reshape((-1, y.shape[-1]))
    got = jnp.take(flat, jnp.where(rows >= 0, rows, flat.shape[0]), axis=0, mode="fill",
                   fill_value=0).astype(jnp.float32)                    # [T, K, H]
    w = topk_weights.astype(jnp.float32)
    acc = w[:, 0, None] * got[:, 0]
    for k in range(1, w.shape[1]):
        acc = acc + w[:, k, None] * got[:, k]
    return acc.astype(y.dtype)


# --- the step -------------------------------------------------------------

def dequantize(q, scales):
    """An FP8 pair (e4m3 [..., H], float32 scales [..., H // 128]) -> bfloat16."""
    import jax.numpy as jnp

    blocks = q.astype(jnp.float32).reshape(q.shape[:-1] + (q.shape[-1] // 128, 128))
    return (blocks * scales[..., None]).reshape(q.shape).astype(jnp.bfloat16)


def run_experts(recv, count, w_gate, w_up, w_down, layout):
    """The local experts' SwiGLU on dispatched rows (an FP8 pair is dequantized first)."""
    from jax_ep import moe

    if isinstance(recv, tuple):
        recv = dequantize(*recv)
    if layout == "ragged":
        return moe.ragged_experts(recv, count, w_gate, w_up, w_down)
    return moe.padded_experts(recv, count, w_up, w_down, w_gate)


def _rms_norm(x):
    import jax
    import jax.numpy as jnp

    v = x.astype(jnp.float32)
    return (v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + 1e-6)).astype(x.dtype)


def make_step(variant, *, backend, layers, num_experts, top_k, max_tokens, layout):
    """step(x [T, H], routers [layers, H, E], w_gate, w_up [L, H, F], w_down
    [L, F, H]) -> x after `layers` layers, for inside shard_map over 'ep'.
    variant: "jax_ep" (with `backend`) or "no-comm"."""
    import jax

    import jax_ep
    from jax_ep import moe

    def moe_layer(h, idx, w, w_gate, w_up, w_down):
        if variant == "jax_ep":
            recv, count, handle = jax_ep.low_latency_dispatch(
                h, idx, num_experts=num_experts, axis_name="ep", max_tokens_per_rank=max_tokens,
                zero_padding=False, layout=layout, backend=backend)
            y = run_experts(recv, count, w_gate, w_up, w_down, layout)
            return jax_ep.low_latency_combine(y, idx, w, handle, backend=backend)
        ranks = jax.lax.axis_size("ep")
        num_local = num_experts // ranks
        recv, count, rows = local_dispatch(
            h, idx, num_local=num_local, rows_per_expert=ranks * max_tokens, layout=layout,
            ragged_rows=ranks * max_tokens * min(top_k, num_local))
        y = run_experts(recv, count, w_gate, w_up, w_down, layout)
        return local_combine(y, rows, w)

    def step(x, routers, w_gate, w_up, w_down):
        for layer in range(layers):
            h = _rms_norm(x)
            idx, w, _ = moe.route(h, routers[layer], top_k)
            x = x + moe_layer(h, idx, w, w_gate, w_up, w_down).astype(x.dtype)
        return x

    return step


def device_normal(mesh, local_shape, *, seed, scale=1.0, sharded=True):
    """A bfloat16 standard normal array (times `scale`) made on the devices of
    `mesh`: [R * shape[0], ...] sharded over 'ep', a different draw per rank;
    or with sharded=False `local_shape` replicated (the same draw everywhere)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    def draw():
        key = jax.random.key(seed)
        if sharded:
            key = jax.random.fold_in(key, jax.lax.axis_index("ep"))
        return jax.random.normal(key, local_shape, jnp.bfloat16) * jnp.bfloat16(scale)

    spec = P("ep") if sharded else P()
    return jax.jit(jax.shard_map(draw, mesh=mesh, in_specs=(), out_specs=spec))()


def make_arrays(mesh, cfg, seed=0):
    """(x, routers, w_gate, w_up, w_down) on `mesh`: x [R*T, H] and the experts
    sharded over 'ep', the routers [layers, H, E] replicated."""
    H, F, E = cfg["hidden"], cfg["expert_width"], cfg["experts"]
    L = E // mesh.size
    x = device_normal(mesh, (cfg["tokens"], H), seed=seed)
    routers = device_normal(mesh, (cfg["layers"], H, E), seed=seed + 1, scale=H ** -0.5,
                            sharded=False)
    w_gate = device_normal(mesh, (L, H, F), seed=seed + 2, scale=H ** -0.5)
    w_up = device_normal(mesh, (L, H, F), seed=seed + 3, scale=H ** -0.5)
    w_down = device_normal(mesh, (L, F, H), seed=seed + 4, scale=F ** -0.5)
    return x, routers, w_gate, w_up, w_down


def measure(mesh, cfg, variants, *, warm_calls, profile):
    """[{variant, graphs, sec, kernel_sec, jax_ep_sec, launches}] for this process.

    variants: (label, "jax_ep" or "no-comm", backend) triples; kernel times
    only with `profile` (None where the trace has no GPU plane)."""
    import jax
    from jax.sharding import PartitionSpec as P

    platform = mesh.devices.flat[0].platform
    args = make_arrays(mesh, cfg)
    specs = (P("ep"), P(), P("ep"), P("ep"), P("ep"))
    out = []
    for label, kind, backend in variants:
        step = make_step(kind, backend=backend, layers=cfg["layers"], num_experts=cfg["experts"],
                         top_k=cfg["top_k"], max_tokens=cfg["tokens"], layout=cfg["layout"])
        body = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=P("ep"))
        for graphs in (True, False):
            fn = jax.jit(body, compiler_options=compiler_options(graphs, platform,
                                                                 cfg["ragged_dot"]))
            sec = time_per_call(fn, *args, iters=cfg["iters"], warm_calls=warm_calls)
            row = dict(variant=label, graphs="on" if graphs else "off", sec=sec,
                       kernel_sec=None, jax_ep_sec=None, launches=None,
                       ragged_dot=ragged_dot_lowering(fn.lower(*args).compile().as_text()))
            if profile:
                try:
                    kernels, busy = device_kernels(fn, *args, calls=PROFILE_CALLS)
                except Exception as e:  # noqa: BLE001 - no CUPTI here: wall time only
                    print(f"profile of {label} failed: {type(e).__name__}: {e}")
                    kernels, busy = [], 0.0
                if kernels:
                    row.update(kernel_sec=busy, jax_ep_sec=jax_ep_kernel_seconds(kernels),
                               launches=sum(r[2] for r in kernels))
            out.append(row)
    return out


def graph_safety():
    """Whether every low-latency FFI handler declares command-buffer
    compatibility ("yes", "no: <targets>"), or "unknown" where this build has
    no low-latency ops. XLA keeps a custom call without it out of its graphs."""
    from jax_ep.cuda import extension

    ll = {k: v for k, v in extension.handler_traits().items() if k.startswith("jax_ep_ll")}
    if not ll:
        return "unknown"
    missing = sorted(k for k, v in ll.items() if v < 0 or not v & extension.GRAPH_SAFE_TRAIT)
    return "yes" if not missing else "no: " + ", ".join(missing)


def worker(cfg_json):
    """One rank's process on the GPU: its rows (and the reference's with one rank)."""
    import jax

    import jax_ep

    cfg = json.loads(cfg_json)
    mesh = mesh_of(jax.devices())
    alone = jax.process_count() == 1
    warm = None if alone else WARM_CALLS
    rows = []
    if alone and cfg["reference"]:
        rows += measure(mesh, cfg, [("jax_ep (reference)", "jax_ep", "reference")],
                        warm_calls=warm, profile=cfg["profile"])
    rows += measure(mesh, cfg, [("no-comm", "no-comm", None)], warm_calls=warm,
                    profile=cfg["profile"])
    jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=cfg["tokens"],
                      hidden=cfg["hidden"], top_k=cfg["top_k"], num_experts=cfg["experts"],
                      dtype="bfloat16", low_latency=True)
    rows += measure(mesh, cfg, [("jax_ep (cuda)", "jax_ep", "cuda")], warm_calls=warm,
                    profile=cfg["profile"])
    jax_ep.shutdown()
    return dict(rows=rows, graph_safe=graph_safety())


def cpu_devices(n):
    """n CPU devices for --dry-run (asks JAX for more virtual ones when it still can)."""
    import jax

    if n > 1 and jax.config.jax_num_cpu_devices < n:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # the CPU backend is up already: use what it has
            pass
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise SystemExit(f"--dry-run --ranks {n}: only {len(devices)} CPU devices")
    return devices[:n]


def dry_run(cfg):
    """The whole benchmark on CPU devices in this process, reference backend."""
    mesh = mesh_of(cpu_devices(cfg["ranks"]))
    variants = [("jax_ep (reference)", "jax_ep", "reference"), ("no-comm", "no-comm", None)]
    rows = measure(mesh, cfg, variants, warm_calls=1, profile=False)
    return dict(rows=rows, graph_safe="n/a (CPU)")


# --- report -----------------------------------------------------------------

def _us(sec):
    return f"{sec * 1e6:10.1f}" if sec else f"{'n/a':>10}"


def merge(results):
    """Per-rank results -> rows keyed (variant, graphs): the largest value of
    each time over the ranks (None where any rank has none)."""
    merged = {}
    for row in results[0]["rows"]:
        key = (row["variant"], row["graphs"])
        peers = [next(r for r in res["rows"] if (r["variant"], r["graphs"]) == key)
                 for res in results]
        merged[key] = {f: (max(p[f] for p in peers) if all(p[f] is not None for p in peers)
                           else None)
                       for f in ("sec", "kernel_sec", "jax_ep_sec", "launches")}
    return merged


def report(cfg, results):
    """Prints the table, the jax_ep - no-comm cost and the bars."""
    R, layers = cfg["ranks"], cfg["layers"]
    rows = merge(results)
    where = "CPU, dry run" if cfg["dry_run"] else (
        "one GPU" if R == 1 else f"{R} processes on one GPU (MPS)")
    print(f"decode step: {layers} layers, {cfg['tokens']} tokens per rank, hidden "
          f"{cfg['hidden']}, {cfg['experts']} experts (top-{cfg['top_k']}), SwiGLU width "
          f"{cfg['expert_width']}, {cfg['layout']} layout, R = {R} ({where}); one set of "
          f"expert weights shared by all layers, a router per layer")
    lowered = sorted({r.get("ragged_dot", "?") for res in results for r in res["rows"]})
    print(f"ragged_dot: --ragged-dot {cfg['ragged_dot']}; XLA lowered the experts' "
          f"ragged_dot as: {', '.join(lowered)}")
    print(f"jax_ep low-latency handlers declare CUDA-graph compatibility: "
          f"{results[0]['graph_safe']}")
    print("| R | variant | graphs | µs / step | µs / layer | kernel µs / step | kernels / step "
          "| jax_ep kernel µs / step (share) |\n|---|---|---|---|---|---|---|---|")
    for (variant, graphs), v in rows.items():
        launches = f"{v['launches']:8.1f}" if v["launches"] else f"{'n/a':>8}"
        share = (f"{v['jax_ep_sec'] * 1e6:8.1f} ({100 * v['jax_ep_sec'] / v['kernel_sec']:4.1f}%)"
                 if v["kernel_sec"] else "n/a")
        print(f"| {R} | {variant:<18} | {graphs:<3} | {_us(v['sec'])} | "
              f"{_us(v['sec'] / layers)} | {_us(v['kernel_sec'])} | {launches} | {share} |")
    ep = "jax_ep (cuda)" if ("jax_ep (cuda)", "on") in rows else "jax_ep (reference)"
    for graphs in ("on", "off"):
        a, b = rows[(ep, graphs)], rows[("no-comm", graphs)]
        kernel = (f", kernels {(a['kernel_sec'] - b['kernel_sec']) / layers * 1e6:.1f} µs"
                  if a["kernel_sec"] and b["kernel_sec"] else "")
        print(f"{ep} - no-comm, graphs {graphs}: {(a['sec'] - b['sec']) / layers * 1e6:.1f} µs "
              f"per layer (wall){kernel}")
    on, off = rows[(ep, "on")], rows[(ep, "off")]
    print(f"bar: graphed / ungraphed step with {ep}: {on['sec'] / off['sec']:.2f}x "
          f"({on['sec'] * 1e6:.1f} / {off['sec'] * 1e6:.1f} µs)")
    if on["kernel_sec"]:
        print(f"bar: wall / kernel time of the graphed step with {ep}: "
              f"{on['sec'] / on['kernel_sec']:.2f}x ({on['sec'] * 1e6:.1f} / "
              f"{on['kernel_sec'] * 1e6:.1f} µs)")
    else:
        print(f"bar: wall / kernel time of the graphed step with {ep}: n/a (no kernel profile)")
    print("times: wall per jitted call, host dispatch included; kernel: summed kernel time "
          "per step from a jax.profiler trace; with several ranks each column is its largest "
          "value over the ranks"
          + (" (under MPS the processes' kernels overlap and the low-latency kernels spin "
             "while they wait for peers: upper bounds)" if R > 1 and not cfg["dry_run"] else ""))
    if cfg["dry_run"]:
        print("dry run: graphs on / off compile the same CPU program twice (the command-buffer "
              "options are XLA:GPU's and are not passed); no kernel times")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(p)
    p.add_argument("--layers", type=int, help=f"MoE layers per step ({FULL['layers']})")
    p.add_argument("--hidden", type=int, help=f"H ({FULL['hidden']})")
    p.add_argument("--experts", type=int, help=f"E ({FULL['experts']})")
    p.add_argument("--top-k", type=int, help=f"K ({FULL['top_k']})")
    p.add_argument("--tokens", type=int, help=f"tokens per rank = max_tokens_per_rank "
                   f"({FULL['tokens']})")
    p.add_argument("--expert-width", type=int,
                   help=f"F, the SwiGLU's width ({FULL['expert_width']})")
    p.add_argument("--iters", type=int, help=f"calls per timed run ({FULL['iters']})")
    p.add_argument("--layout", choices=("ragged", "padded"), default="ragged")
    add_ragged_dot_option(p)
    args = p.parse_args(argv)
    cfg = sizes_from(p, args, FULL, DRY)
    cfg.update(layout=args.layout, ragged_dot=args.ragged_dot)
    if min(cfg["layers"], cfg["tokens"], cfg["iters"], cfg["expert_width"], cfg["hidden"]) < 1:
        p.error("--layers, --tokens, --iters, --hidden, --expert-width must be positive")
    results = [dry_run(cfg)] if args.dry_run else run_ranks("bench_decode_step:worker", cfg)
    report(cfg, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
