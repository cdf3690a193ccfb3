"""Benchmark of normal-mode dispatch / combine in DeepEP's setting (docs/design.md §7).

hidden 7168, top-8 of 256 experts, 4096 tokens per rank; FP8 and BF16 dispatch,
BF16 combine. Bandwidth uses DeepEP's byte formula: received rows x H x bytes
per element (FP8: H x (1 + 4/128)). "HBM" counts what the kernels really read
and write (each row is read and written twice: into the peer's buffer, then
into the output), compared with a device-to-device copy measured in the same
run. The reference backend runs in the same process where it can (one rank;
XLA collectives cannot run between processes sharing one GPU).

With --all-local-gpus and more than one GPU, BF16 dispatch is also compared
with what a JAX user would write by hand: `ragged_dispatch`, built on
`jax.lax.ragged_all_to_all` (NCCL; XLA:CPU lacks it). It moves only the x rows
(no top-k ids or weights), into the same [R*T, H] layout as jax_ep.dispatch.
Other ops and modes print "n/a" in that column.

    python benchmarks/bench_intranode.py                   # one rank, this GPU
    python benchmarks/bench_intranode.py --ranks 8         # 8 processes on one GPU (MPS)
    python benchmarks/bench_intranode.py --all-local-gpus  # one process, every local GPU
    python benchmarks/bench_intranode.py --ranks 8 --gpu-per-rank --num-blocks 24  # a process per GPU
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from _timing import (device_kernels, drop, launch_ranks, lift, mesh_of, print_kernels,
                     putter, time_per_call)

H, K, E, T = 7168, 8, 256, 4096


def copy_bandwidth(iters=50):
    """Bytes read + written per second by an elementwise device-to-device pass."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((256 << 20) // 2, jnp.bfloat16)  # 256 MiB
    neg = jax.jit(lambda v: -v)
    return 2 * a.nbytes / time_per_call(neg, a, iters=iters)


def _routing(seed, n, tokens):
    from jax_ep.testing import oracle

    per = [oracle.make_rank_inputs(seed, r, tokens, 128, E, K) for r in range(n)]
    return [p[1] for p in per], [p[2] for p in per]


def _inputs(n, mesh, tokens, seed, routing=_routing):
    """x bf16, topk_idx, topk_weights: global arrays sharded over 'ep'.

    routing(seed, n, tokens) -> (per-rank topk_idx list, per-rank weights list)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    idxs, ws = routing(seed, n, tokens)
    put = putter(mesh)
    rng = np.random.default_rng(seed)
    if jax.process_count() == 1:
        x = jax.device_put(jnp.asarray(rng.standard_normal((n * tokens, H), np.float32),
                                       jnp.bfloat16), NamedSharding(mesh, P("ep")))
    else:
        x = put([rng.standard_normal((tokens, H), np.float32).astype(jnp.bfloat16)
                 for _ in range(n)])
    return x, put(idxs), put(ws)


def measure(backend, n, mesh, tokens, iters, seed=0, profile=False, warm_calls=None,
            kernel_time=False, routing=_routing):
    """{op: (seconds, deepep_bytes, hbm_bytes, gpu_seconds)} for the ranks of this
    process; gpu_seconds (kernel time per call from a profile) only with
    kernel_time, else None. routing: as in `_inputs` (default: uniform top-K)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    import jax_ep

    spec = P("ep")
    x, idx, w = _inputs(n, mesh, tokens, seed, routing)

    def fp8(v):
        b = v.astype(jnp.float32).reshape(v.shape[0], H // 128, 128)
        s = jnp.maximum(jnp.max(jnp.abs(b), -1), 1e-4) / 448.0
        return (b / s[..., None]).astype(jnp.float8_e4m3fn).reshape(v.shape), s

    smap = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))
    dispatch = lambda xx, i, ww: jax_ep.dispatch(xx, i, ww, num_experts=E, axis_name="ep",
                                                 backend=backend)
    disp_bf16 = smap(lambda xx, i, ww: dispatch(xx, i, ww)[0])
    disp_fp8 = smap(lambda q, s, i, ww: dispatch((q, s), i, ww)[0])
    # The handle leaves shard_map with its scalars as [1] pieces and comes back in.
    with_handle = smap(lambda xx, i, ww: (lambda o: (o[0], lift(o[3])))(dispatch(xx, i, ww)))
    q, s = smap(fp8)(x)
    recv, handle = with_handle(x, idx, w)
    comb = smap(lambda y, h: jax_ep.combine(y, drop(h), backend=backend))

    if profile:
        print_kernels(f"{backend} dispatch_bf16", disp_bf16, x, idx, w)
        print_kernels(f"{backend} dispatch_fp8", disp_fp8, q, s, idx, w)
        print_kernels(f"{backend} combine_bf16", comb, recv, handle)
    rows = sum(int(np.asarray(sh.data)[0]) for sh in handle.num_recv_tokens.addressable_shards)
    # A rank's rows for itself move once (no comm buffer in between).
    self_rows = 0
    if backend == "cuda":
        for sh in handle.rank_counts.addressable_shards:  # [R, R] each, rank = shard number
            r = (sh.index[0].start or 0) // n
            self_rows += int(np.asarray(sh.data)[r, r])
    local_tokens = tokens * len(x.addressable_shards)
    # HBM traffic of the kernels: dispatch reads each row, writes it into the
    # receiver's buffer, which copies it out (2 reads + 2 writes); combine reads
    # each row, writes it into the source's buffer, which reads it and writes one
    # output row per token. Rows a rank sends itself skip the buffer (1 + 1, and
    # for combine 1 read).
    out = {}
    timed = lambda f, *a: time_per_call(f, *a, iters=iters, warm_calls=warm_calls)
    gpu = lambda f, *a: device_kernels(f, *a)[1] or None if kernel_time else None
    for op, fn, args, row_bytes in [
        ("dispatch_bf16", disp_bf16, (x, idx, w), H * 2),
        ("dispatch_fp8", disp_fp8, (q, s, idx, w), H * (1 + 4 / 128)),
        ("combine_bf16", comb, (recv, handle), H * 2),
    ]:
        sec = timed(fn, *args)
        nbytes = rows * row_bytes
        peer = (rows - self_rows) * row_bytes
        if op.startswith("combine"):
            hbm = 3 * peer + self_rows * row_bytes + local_tokens * H * 2
        else:
            hbm = 4 * peer + 2 * self_rows * row_bytes
        out[op] = (sec, nbytes, hbm, gpu(fn, *args))
    return out


# --- ragged_all_to_all baseline ------------------------------------------------

def ragged_send_plan(topk_idx, *, num_experts, num_ranks):
    """Send buffer layout of one rank (pure; no collectives).

    Returns (gather [R*T] int32, counts [R] int32): row j of the send buffer is
    x[gather[j]]; rows are grouped by destination rank, in token order, one per
    (token, rank) where some valid expert (0 <= id < E) of the token lives on
    that rank (expert e on rank e // (E / R)). Rows past sum(counts) are unused.
    """
    import jax.numpy as jnp

    T = topk_idx.shape[0]
    R = num_ranks
    valid = (topk_idx >= 0) & (topk_idx < num_experts)
    dest = jnp.where(valid, topk_idx // (num_experts // R), R)      # R: nowhere
    to = jnp.zeros((T, R + 1), bool).at[jnp.arange(T)[:, None], dest].set(True)[:, :R]
    flat = to.T.reshape(-1)                                            # r-major, then t
    gather = jnp.nonzero(flat, size=R * T, fill_value=0)[0] % T
    return gather.astype(jnp.int32), to.sum(0, dtype=jnp.int32)


def ragged_offsets(counts_all, me):
    """The four index arrays of ragged_all_to_all for rank `me` (pure).

    counts_all is C [R, R], C[s, r] = rows source s sends to rank r. Receivers
    lay out rows by source rank, then token, like jax_ep.dispatch.
    output_offsets are where *my* rows land in each *receiver's* output
    (sum_{s < me} C[s, r]): jax 0.11.2 takes them in the sender's view and
    all_to_alls them itself (see lax.ragged_all_to_all's docstring).
    """
    import jax.numpy as jnp

    send_sizes = counts_all[me]
    input_offsets = jnp.cumsum(send_sizes) - send_sizes
    output_offsets = (jnp.cumsum(counts_all, 0) - counts_all)[me]
    recv_sizes = counts_all[:, me]
    return input_offsets, send_sizes, output_offsets, recv_sizes


def ragged_dispatch(x, topk_idx, *, num_experts, axis_name):
    """Dispatch x [T, H] with lax.ragged_all_to_all, inside shard_map.

    Returns (recv_x [R*T, H], rows received): rows ordered by source rank, then
    token (jax_ep.dispatch's order); zeros past the received rows.
    """
    import jax.numpy as jnp
    from jax import lax

    R = lax.axis_size(axis_name)
    gather, counts = ragged_send_plan(topk_idx, num_experts=num_experts, num_ranks=R)
    counts_all = lax.all_gather(counts, axis_name)                     # [R, R]
    offs = ragged_offsets(counts_all, lax.axis_index(axis_name))
    out = jnp.zeros((R * x.shape[0], x.shape[1]), x.dtype)
    out = lax.ragged_all_to_all(x[gather], out, *offs, axis_name=axis_name)
    return out, offs[3].sum()


def measure_ragged(n, mesh, tokens, iters, seed=0):
    """Seconds per call of ragged_dispatch (BF16) on the same inputs as `measure`."""
    import jax
    from jax.sharding import PartitionSpec as P

    x, idx, _ = _inputs(n, mesh, tokens, seed)
    f = jax.jit(jax.shard_map(
        lambda xx, i: ragged_dispatch(xx, i, num_experts=E, axis_name="ep")[0],
        mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    return time_per_call(f, x, idx, iters=iters)


def _init(mesh, tokens, backend="auto", ranks_per_node=None, num_blocks=0):
    """initialize for DeepEP's shapes; ranks_per_node=G selects the internode
    kernels (N = R / G virtual nodes), None leaves initialize's default;
    num_blocks: the SM knob (0 = automatic)."""
    import jax_ep

    jax_ep.initialize(mesh, axis_name="ep", backend=backend, max_tokens_per_rank=tokens,
                      hidden=H, top_k=K, dtype="bfloat16", ranks_per_node=ranks_per_node,
                      num_blocks=num_blocks)


def _vs(base_sec, sec):
    """'<base µs> <speedup of jax_ep over it>x', or n/a."""
    return f"{base_sec * 1e6:9.1f} {base_sec / sec:6.2f}x" if base_sec else f"{'n/a':>9} {'':>7}"


def _us(sec):
    return f"{sec * 1e6:9.1f}" if sec else f"{'n/a':>9}"


def _row(mode, op, n, sec, nbytes, hbm_bytes, gpu_sec, ref, copy_bw, ragged_sec=None):
    """ref: (seconds, gpu_seconds) of the reference backend, or (None, None)."""
    hbm = hbm_bytes / sec
    return (f"| {mode:<14} | {op:<13} | {n:>2} | {sec * 1e6:9.1f} | {_us(gpu_sec)} | "
            f"{nbytes / sec / 1e9:8.1f} | {hbm / 1e9:8.1f} | {100 * hbm / copy_bw:5.1f}% | "
            f"{_vs(ref[0], sec)} | {_us(ref[1])} | {_vs(ragged_sec, sec)} |")


HEADER = ("| mode           | op            |  R | time (µs) | GPU µs | DeepEP GB/s | HBM GB/s"
          " | % copy | reference µs / speedup | reference GPU µs"
          " | ragged_all_to_all µs / speedup |\n|---|---|---|---|---|---|---|---|---|---|---|")


def run_local(devices, mode, iters, tokens, profile=False, num_blocks=0):
    import jax_ep

    mesh = mesh_of(devices)
    copy_bw = copy_bandwidth()
    ref = measure("reference", len(devices), mesh, tokens, iters, profile=profile,
                  kernel_time=True)
    ragged = {}
    if len(devices) > 1:
        ragged["dispatch_bf16"] = measure_ragged(len(devices), mesh, tokens, iters)
    _init(mesh, tokens, num_blocks=num_blocks)
    cuda = measure("cuda", len(devices), mesh, tokens, iters, profile=profile,
                   kernel_time=True)
    jax_ep.shutdown()
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(HEADER)
    for op, (sec, nbytes, hbm, gpu_sec) in cuda.items():
        print(_row(mode, op, len(devices), sec, nbytes, hbm, gpu_sec, (ref[op][0], ref[op][3]),
                   copy_bw, ragged.get(op)))


def worker(iters="50", tokens=str(T), num_blocks="0"):
    """One process of the N-processes mode (one GPU under MPS, or a GPU each):
    returns its timings."""
    import jax

    mesh = mesh_of(jax.devices())
    _init(mesh, int(tokens), num_blocks=int(num_blocks))
    # A fixed warm-up count: every process must make the same number of calls.
    res = measure("cuda", jax.device_count(), mesh, int(tokens), int(iters), warm_calls=100)
    import jax_ep
    jax_ep.shutdown()
    return {"ops": {k: list(v) for k, v in res.items()}}


def run_processes(n, iters, tokens, gpu_per_rank=False, num_blocks=0):
    # Measured alone on the GPU, in a child process: this one must hold no CUDA
    # context while the MPS clients run.
    import subprocess

    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--copy-only"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    copy_bw = float(out.split()[-1])
    results = launch_ranks("bench_intranode:worker", n, (iters, tokens, num_blocks),
                           gpu_per_rank=gpu_per_rank)
    mode = f"{n} procs/{n if gpu_per_rank else 1} GPU"
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write, one GPU); "
          f"num_blocks={num_blocks or 'auto'}")
    print(HEADER)
    for op in results[0].result["ops"]:
        sec = max(r.result["ops"][op][0] for r in results)  # the slowest rank bounds the op
        nbytes = sum(r.result["ops"][op][1] for r in results)
        hbm = sum(r.result["ops"][op][2] for r in results)
        print(_row(mode, op, n, sec, nbytes, hbm, None, (None, None), copy_bw))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=1, help="processes sharing GPU 0 (MPS)")
    p.add_argument("--gpu-per-rank", action="store_true",
                   help="with --ranks: process i on GPU i (peers over NVLink) instead of MPS")
    p.add_argument("--num-blocks", type=int, default=0,
                   help="the SM knob: thread blocks per kernel (0 = automatic)")
    p.add_argument("--all-local-gpus", action="store_true")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tokens", type=int, default=T)
    p.add_argument("--profile", action="store_true",
                   help="also print each op's GPU kernels and their times (one process)")
    p.add_argument("--copy-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.copy_only:
        print(copy_bandwidth())
        return 0
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    if args.ranks > 1:
        return run_processes(args.ranks, args.iters, args.tokens, args.gpu_per_rank,
                             args.num_blocks)

    devices = jax.local_devices() if args.all_local_gpus else jax.local_devices()[:1]
    run_local(devices, f"{len(devices)} GPU(s)", args.iters, args.tokens, args.profile,
              args.num_blocks)


if __name__ == "__main__":
    sys.exit(main())
