"""Where the time of a low-latency op goes: a phase trace of the kernels.

Runs the benchmark's setting (bench_low_latency.py) as N processes sharing
GPU 0 with jax_ep.Options(phase_trace=...): every block of the dispatch / combine kernels
stamps %globaltimer at each phase (ffi/kernels/low_latency/, LLTraceEvent),
the trace is written at shutdown, and this script prints, per op kind, the
median over the traced chained calls of each phase's time (µs) after the
op's first kernel start on any PE; "min-max" spans the PEs (for per-block
events, the last block of each PE); last, each PE's kernel time from its own
first block's start to its last block's end (what DeepEP reports: kernel
time). Diagnostics: the stamps cost a store per block and phase.

    python benchmarks/ll_phases.py --ranks 1
    python benchmarks/ll_phases.py --ranks 8 [--blocks N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

OPS = 256        # kLLTraceOps
BLOCKS = 160     # kLLTraceBlocks
EVENTS = 8       # kLLTraceEvents
OP_NAMES = {16: "dispatch", 17: "combine", 18: "dispatch_cached", 19: "gather"}
# (event index, label, reduction over the blocks of one PE)
PHASES = (
    (0, "kernel start (first block)", "min"),
    (1, "send: buffer set released", "max"),
    (2, "send: rows written (first block)", "min"),
    (2, "send: rows written (last block)", "max"),
    (3, "send: done signals stored", "max"),
    (4, "receive: all done seen (first block)", "min"),
    (4, "receive: all done seen (last block)", "max"),
    (5, "receive: rows read out (first block)", "min"),
    (5, "receive: rows read out (last block)", "max"),
    (6, "kernel end (last block)", "max"),
)
CALLS = 20  # calls per chained program
REPEATS = 3


def worker(trace, blocks="0"):
    """One rank: chained FP8 dispatches, then chained combines, traced to <trace>.pe<rank>."""
    import jax

    import jax_ep
    from bench_low_latency import E, H, K, M, chained
    from _timing import drop, lift, mesh_of, putter

    import ml_dtypes
    from jax.sharding import PartitionSpec as P

    from jax_ep.testing import oracle

    mesh = mesh_of(jax.devices())
    n = jax.device_count()
    jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=M, hidden=H,
                      top_k=K, num_experts=E, dtype="bfloat16", low_latency=True,
                      num_blocks=int(blocks), options=jax_ep.Options(phase_trace=trace))
    xs, idxs, ws = oracle.make_inputs(0, n, M, H, E, K, dtype=ml_dtypes.bfloat16)
    put = putter(mesh)
    x, idx, w = put(xs), put(idxs), put(ws)
    never = put([np.full(1, np.nan, np.float32)] * n)
    spec = P("ep")
    smap = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))
    kw = dict(num_experts=E, axis_name="ep", max_tokens_per_rank=M, zero_padding=False)
    dispatch = lambda x, i: jax_ep.low_latency_dispatch(x, i, use_fp8=True, **kw)[:2]
    combine = lambda y, i, ww, h: jax_ep.low_latency_combine(y, i, ww, drop(h))
    y, handle = smap(lambda x, i: (lambda o: (o[0], lift(o[2])))(
        jax_ep.low_latency_dispatch(x, i, **kw)))(x, idx)
    for op, args, through in ((dispatch, (x, idx), 1), (combine, (y, idx, w, handle), 2)):
        f = smap(chained(op, CALLS, through))
        for _ in range(REPEATS):
            jax.block_until_ready(f(*args, never))
    jax_ep.shutdown()  # writes <trace>.pe<rank>
    return jax.process_index()


def load(path):
    return np.fromfile(path, dtype="<u8").reshape(OPS, BLOCKS, EVENTS)


def phases(traces):
    """{op name: [(label, median µs of the earliest PE, of the latest PE)]}
    over the ops every PE traced (each op's times after its first start)."""
    rows = {}
    ends = {}  # (name, slot) -> [PEs] of (first block start, last block end), ns
    for slot in range(OPS):
        tags = {int(t[slot, 0, 7]) for t in traces}
        if len(tags) != 1 or 0 in tags:
            continue  # not traced on every PE (or the ring slot of another op)
        tag = tags.pop()
        name = OP_NAMES.get(tag & 255, str(tag & 255))
        per_pe = []
        for t in traces:
            st = t[slot].astype(np.int64)
            start = st[:, 0][st[:, 0] > 0].min()
            vals = []
            for ev, _, how in PHASES:
                col = st[:, ev]
                col = col[(col >= start) & (col < start + 10**9)]  # this op's stamps only
                vals.append(np.nan if col.size == 0 else getattr(col, how)())
            per_pe.append(vals)
        per_pe = np.asarray(per_pe, dtype=np.float64)
        ends[(name, slot)] = per_pe[:, [0, len(PHASES) - 1]]
        origin = np.nanmin(per_pe[:, 0])
        rows.setdefault(name, []).append((per_pe - origin) / 1e3)
    out = {}
    for name, ops in rows.items():
        a = np.stack(ops)  # [ops, PEs, phases]
        out[name] = [(PHASES[i][1], np.nanmedian(np.nanmin(a[:, :, i], axis=1)),
                      np.nanmedian(np.nanmax(a[:, :, i], axis=1))) for i in range(len(PHASES))]
        own = a[:, :, -1] - a[:, :, 0]  # each PE's kernel: its own start to its end
        out[name].append(("kernel time (own start to end)", np.nanmedian(np.nanmin(own, axis=1)),
                          np.nanmedian(np.nanmax(own, axis=1))))
        mean = np.nanmedian(np.nanmean(own, axis=1))
        out[name].append(("kernel time, mean over the PEs", mean, mean))
        # Each PE's gap from its previous op of this kind (the chain's
        # previous call) ending to this one starting, and which PE starts last.
        gaps, last = [], []
        for (nm, slot), se in ends.items():
            prev = ends.get((nm, (slot - 1) % OPS))
            if nm != name or prev is None:
                continue
            gap = (se[:, 0] - prev[:, 1]) / 1e3
            if np.all((gap > 0) & (gap < 1000)):
                gaps.append(gap)
                last.append(int(np.nanargmax(se[:, 0])))
        if gaps:
            g = np.median(np.stack(gaps), axis=0)
            out[name].append(("gap: previous call's end to start", g.min(), g.max()))
            counts = np.bincount(last, minlength=len(traces))
            out[name].append(("PE starting last most often (rank, share)", int(counts.argmax()),
                              counts.max() / counts.sum()))
        out[name].append(("ops traced", len(ops), len(ops)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--blocks", type=int, default=0,
                   help="thread blocks per kernel (jax_ep.initialize num_blocks; 0: SMs / PEs)")
    args = p.parse_args(argv)
    from jax_ep.testing import launch, mps_daemon

    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp, mps_daemon():
        base = os.path.join(tmp, "trace")
        launch("ll_phases:worker", args.ranks, platform="gpu", timeout=args.timeout,
               env={"PYTHONPATH": here}, args=(base, str(args.blocks)))
        traces = [load(f"{base}.pe{r}") for r in range(args.ranks)]
    for name, table in phases(traces).items():
        print(f"\n{name}, {args.ranks} PEs: µs after the op's first kernel start "
              f"(median over ops; earliest PE - latest PE)")
        for label, lo, hi in table:
            print(f"  {label:40s} {lo:8.1f} - {hi:8.1f}")


if __name__ == "__main__":
    sys.exit(main())
