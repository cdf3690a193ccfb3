"""Training-step benchmark: the byte-level MoE language model of examples/train_moe_lm.py.

The model is the example's (its --untied off, --remat optional): 256-byte
embedding plus learned positions, --layers pre-norm blocks of causal
attention (--heads heads, jax.nn.dot_product_attention) and the SwiGLU MoE
FFN (router top-K with the load-balancing loss, `jax_ep.dispatch` with the
example's capacity factor 1.25, `jax_ep.moe.local_experts` on
`jax.lax.ragged_dot`, `jax_ep.combine`), a final RMS norm and the output tied
to the embedding; bfloat16 compute, float32 parameters, the loss
cross-entropy + 0.01 x the load-balancing loss, the optimizer the example's
(global-norm clip 1.0, AdamW with weight decay 0.01 on a warmup-cosine
schedule, its "large" preset's learning rate). The data are byte windows of
the standard library's sources (`train_moe_lm.load_corpus`, a different
window per rank and step, 4 batches in turn). The defaults are one
OLMoE-1B-7B layer's shape (hidden 2048, 16 heads, 64 experts of width 1024,
top-8) at 2 layers, one sequence of 1024 bytes per rank.

One training step = one jitted program: forward, backward and the AdamW
update, the training state (parameters and optimizer state) donated, so it
is updated in place as in real training. The step is one `jax.shard_map`
over the EP axis with every parameter held per rank (the experts: E / R per
rank; the dense parameters: a copy per rank) and the backward taken inside
it, so the step has no XLA collective: with R processes sharing one GPU
(CUDA MPS), where XLA collectives cannot run, the CUDA backend's kernels are
its only communication. What that leaves out at R > 1 (printed with the
table): the all-reduce of the dense parameters' gradients of a
data-parallel step, and the load-balancing loss and the gradient-norm clip
are per rank instead of over all ranks. At R = 1 the step is exactly the
example's training step (tests/test_bench_train.py checks the loss and the
gradients against the example's Flax model).

Rows, per backend ("cuda"; "reference" only at one rank: XLA collectives
cannot run between processes sharing one GPU; --no-reference skips it):
wall ms per step (host dispatch included, best of 5 runs of --iters steps;
R > 1: the slowest rank), tokens / s per rank and over all ranks (tokens =
batch x seq-len per rank), from a jax.profiler trace the summed kernel time
per step and the time of jax_ep's own kernels (names containing "jax_ep" or
the intranode / layout kernels' names) with their share of the kernel time
and of the step, and the bytes XLA allocates per process for the step
(`memory_analysis` of the compiled program). The reference backend's
dispatch / combine are XLA ops (all_to_all, gathers) and have no share.
Under MPS the processes' kernels overlap and jax_ep's kernels include the
wait for their peers: at R > 1 their times are upper bounds. --no-profile
skips the trace.

Memory (printed before the run; XLA's own count per process is in the
table): per process the float32 parameters, their gradients and AdamW's two
moments (16 B per parameter), the activations kept for the backward
(dominated at R > 1 by the expert path: `jax_ep.moe.local_experts` works on
capacity x K row slots, capacity = min(R * T, 1.25 * T * K) received rows,
so at R = 8, K = 8 on 64 slots of H per token, 8 of them used), jax_ep's
communication buffer and 0.5 GB for the CUDA context and workspaces. At the
defaults (T = 1024 tokens per rank, 2 layers) the estimate is 8.6 GB per
process, 69 GB for 8 processes on the one GPU (53 GB with --remat), and
17.7 GB for one process; --layers 4 at 8 processes needs --remat (71 GB;
118 GB without), --batch 2 doubles the activations.

    python3 benchmarks/bench_train.py --ranks 1
    python3 benchmarks/bench_train.py --ranks 8
    python3 benchmarks/bench_train.py --ranks 1 --layers 4
    python3 benchmarks/bench_train.py --ranks 8 --layers 4 --remat
    python3 benchmarks/bench_train.py --ranks 8 --expert-capacity-factor 1.25   # 4.5 GB/process
    python3 benchmarks/bench_train.py --dry-run [--ranks 2]   # CPU, reference, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from _timing import (RAGGED_DOT_LOWERINGS, add_ragged_dot_option, add_run_options,
                     device_kernels, gpu_options, mesh_of, putter, run_ranks, sizes_from,
                     time_per_call)

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import train_moe_lm as lm  # noqa: E402  (the example: its data, vocabulary and presets)

# Full-size defaults; --dry-run replaces every size not given on the command line.
FULL = dict(layers=2, hidden=2048, heads=16, experts=64, top_k=8, ffn=1024, seq_len=1024,
            batch=1, iters=5)
DRY = dict(layers=2, hidden=64, heads=4, experts=8, top_k=2, ffn=32, seq_len=32, batch=2,
           iters=2)
CAPACITY_FACTOR = 1.25                   # the example's presets
AUX_WEIGHT = 0.01                        # the example's --aux-weight
LEARNING_RATE = lm.PRESETS["large"]["lr"]
SCHEDULE_STEPS = lm.PRESETS["large"]["steps"]
BATCHES = 4                              # distinct batches, used in turn
WARM_CALLS = 3                           # R processes: a fixed warm-up (see _timing.time_per_call)
PROFILE_CALLS = 5
# Substrings of jax_ep's kernel names: its kernels live in namespace jax_ep
# (demangled "jax_ep::...", mangled "_ZN6jax_ep..."); the names themselves
# (ffi/kernels/intranode, ffi/kernels/layout) in case a trace drops the namespace.
JAX_EP_KERNELS = ("jax_ep", "NotifyKernel", "DispatchSendKernel", "DispatchRecvKernel",
                  "CombineSendKernel", "CombineRecvKernel", "DispatchLayoutKernel",
                  "RouteChunkKernel", "RouteOffsetKernel")
RUNTIME_BYTES = 0.5e9  # per process: CUDA context, cuBLAS / XLA workspaces (an allowance)
GB = 1e9


# --- sizes -----------------------------------------------------------------

def tokens_per_step(cfg, ranks):
    """(tokens per rank, tokens over all ranks) of one step: batch x seq-len per rank."""
    per_rank = cfg["batch"] * cfg["seq_len"]
    return per_rank, per_rank * ranks


def expert_slots(cfg, tokens, ranks):
    """Pairs each local expert computes with --expert-capacity-factor f:
    ceil(f * T * K / L) (the Flax layer's rule); None without the option
    (every received (row, k) pair, capacity x K slots)."""
    factor = cfg.get("expert_capacity_factor")
    if factor is None:
        return None
    return max(1, math.ceil(factor * tokens * cfg["top_k"] / (cfg["experts"] // ranks)))


def capacity(tokens, top_k, ranks, factor=CAPACITY_FACTOR):
    """Receive rows per rank of the MoE layer's dispatch (jax_ep.flax's rule):
    ceil(factor * T * K), at least 1, at most R * T (what a rank can receive)."""
    return max(1, min(ranks * tokens, math.ceil(factor * tokens * top_k)))


def param_counts(cfg, ranks):
    """Parameters one rank holds: dict(dense=..., experts=..., total=...).
    Dense: embedding, positions, norms, attention, routers (a copy per rank);
    experts: the E / R local experts' three matrices per layer."""
    H, E, F, S = cfg["hidden"], cfg["experts"], cfg["ffn"], cfg["seq_len"]
    per_layer = 2 * H + 3 * H * H + H * H + H * E
    dense = lm.BYTES * H + S * H + H + cfg["layers"] * per_layer
    experts = cfg["layers"] * 3 * (E // ranks) * H * F
    return dict(dense=dense, experts=experts, total=dense + experts)


def layer_activation_bytes(cfg, ranks):
    """Bytes one block keeps for its backward on one rank (an estimate):
    the dense path's [T, H] tensors, attention's [B, heads, S, S] float32
    logits and probabilities, the router's [T, E], the dispatched rows and the
    expert path on capacity x K row slots (gathered rows, gate / up / SwiGLU
    [N, F], the experts' output and its float32 per-k copy), and the bfloat16
    copies of the local expert weights."""
    H, E, F, K, S = cfg["hidden"], cfg["experts"], cfg["ffn"], cfg["top_k"], cfg["seq_len"]
    T, _ = tokens_per_step(cfg, ranks)
    cap = capacity(T, K, ranks)
    slots = cap * K if cfg.get("expert_capacity_factor") is None else (
        cfg["experts"] // ranks * expert_slots(cfg, T, ranks))
    dense = 12 * T * H * 2
    attention = cfg["batch"] * cfg["heads"] * S * S * 10
    router = 2 * T * E * 4
    experts = cap * H * 2 + slots * (2 * H * 2 + 4 * F * 2 + H * 4)
    weights = 3 * (E // ranks) * H * F * 2
    return dense + attention + router + experts + weights


def memory_estimate(cfg, ranks):
    """Bytes per process (an estimate) and for all R processes on the GPU.

    state: float32 parameters + AdamW's two moments, 12 B per parameter;
    gradients: 4 B per parameter; activations: every block's (one with
    --remat, plus the [T, H] block inputs), one block more for the backward's
    working set, and the logits; buffers: jax_ep's intranode buffer for this
    dispatch (jax_ep.cuda.intranode.buffer_size); runtime: RUNTIME_BYTES."""
    H, K = cfg["hidden"], cfg["top_k"]
    T, _ = tokens_per_step(cfg, ranks)
    params = param_counts(cfg, ranks)["total"]
    layer = layer_activation_bytes(cfg, ranks)
    kept = layer if cfg.get("remat") else cfg["layers"] * layer
    if cfg.get("remat"):
        kept += cfg["layers"] * T * H * 2
    logits = 3 * T * lm.BYTES * 4
    activations = kept + layer + logits
    buffers = intranode_buffer_bytes(ranks, T, H, K, capacity(T, K, ranks))
    out = dict(state=12 * params, gradients=4 * params, activations=activations,
               buffers=buffers, runtime=int(RUNTIME_BYTES))
    out["per_process"] = sum(out.values())
    out["total"] = ranks * out["per_process"]
    return out


def intranode_buffer_bytes(ranks, tokens, hidden, top_k, cap):
    """What initialize allocates for this dispatch (0 where the helper is missing)."""
    try:
        from jax_ep.cuda import intranode
    except ImportError:
        return 0
    return intranode.buffer_size(ranks, tokens, hidden, top_k=top_k, dtype="bfloat16",
                                 capacity=cap)


# --- the model ---------------------------------------------------------------

def init_params(key, rank, cfg, num_local):
    """One rank's parameters (float32), initialised as the example's Flax
    modules do: dense weights from `key` (the same on every rank), the local
    experts from `key` folded with the rank (their own draw per rank)."""
    import jax
    import jax.numpy as jnp

    H, E, F, S = cfg["hidden"], cfg["experts"], cfg["ffn"], cfg["seq_len"]
    init = jax.nn.initializers
    linear = init.lecun_normal()                                       # nnx.Linear
    embed = init.variance_scaling(1.0, "fan_in", "normal", out_axis=0)  # nnx.Embed
    dense_key, expert_key = jax.random.split(key)
    expert_key = jax.random.fold_in(expert_key, rank)
    keys = iter(jax.random.split(dense_key, 2 + 3 * cfg["layers"]))
    ekeys = iter(jax.random.split(expert_key, 3 * cfg["layers"]))
    normal = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in)
    ones = jnp.ones((H,), jnp.float32)
    params = dict(embed=embed(next(keys), (lm.BYTES, H), jnp.float32),
                  pos=0.02 * jax.random.normal(next(keys), (S, H), jnp.float32),
                  norm=ones, blocks=[])
    for _ in range(cfg["layers"]):
        params["blocks"].append(dict(
            norm1=ones, qkv=linear(next(keys), (H, 3 * H), jnp.float32),
            proj=linear(next(keys), (H, H), jnp.float32), norm2=ones,
            router=normal(next(keys), (H, E), H),
            w_gate=normal(next(ekeys), (num_local, H, F), H),
            w_up=normal(next(ekeys), (num_local, H, F), H),
            w_down=normal(next(ekeys), (num_local, F, H), F)))
    return params


def rms_norm(x, scale, dtype):
    """nnx.RMSNorm(dtype=dtype): inputs cast to dtype, statistics in float32."""
    import jax
    import jax.numpy as jnp

    x, scale = x.astype(dtype), scale.astype(dtype)
    v = x.astype(jnp.float32)
    var = jnp.mean(v * v, axis=-1, keepdims=True)
    return (v * (jax.lax.rsqrt(var + 1e-6) * scale.astype(jnp.float32))).astype(dtype)


def moe_ffn(p, x, *, cfg, backend, dtype):
    """The example's MoE layer on this rank's tokens x [B, S, H], inside the
    step's shard_map: (y [B, S, H], load-balancing loss, rows dropped here).
    The loss's statistics are this rank's tokens' (the layer psums them over
    the token axes: the same at one rank)."""
    import jax
    import jax.numpy as jnp

    import jax_ep
    from jax_ep import moe

    E, K = cfg["experts"], cfg["top_k"]
    flat = x.reshape(-1, x.shape[-1]).astype(dtype)
    tokens = flat.shape[0]
    idx, weights, probs = moe.route(flat, p["router"], K)
    chosen = jax.nn.one_hot(idx, E, dtype=jnp.float32).sum(axis=(0, 1)) / (tokens * K)
    aux = E * jnp.sum(chosen * probs.sum(axis=0) / tokens)
    cap = capacity(tokens, K, jax.lax.axis_size("ep"))
    recv_x, recv_idx, recv_w, handle = jax_ep.dispatch(
        flat, idx, weights, num_experts=E, axis_name="ep", capacity=cap, backend=backend)
    y = moe.local_experts(recv_x, recv_idx, recv_w, p["w_up"].astype(dtype),
                          p["w_down"].astype(dtype), p["w_gate"].astype(dtype),
                          expert_capacity=expert_slots(cfg, tokens, jax.lax.axis_size("ep")))
    out = jax_ep.combine(y, handle, backend=backend)
    return out.reshape(x.shape), aux, handle.num_dropped_tokens


def block(p, x, *, cfg, backend, dtype):
    """One pre-norm block of the example: x + attention, then + MoE FFN."""
    import jax
    import jax.numpy as jnp

    b, s, d = x.shape
    heads = lambda t: t.reshape(b, s, cfg["heads"], d // cfg["heads"])
    qkv = jnp.dot(rms_norm(x, p["norm1"], dtype), p["qkv"].astype(dtype))
    q, k, v = map(heads, jnp.split(qkv, 3, axis=-1))
    att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + jnp.dot(att.reshape(b, s, d).astype(dtype), p["proj"].astype(dtype))
    y, aux, dropped = moe_ffn(p, rms_norm(x, p["norm2"], dtype), cfg=cfg, backend=backend,
                              dtype=dtype)
    return x + y, aux, dropped


def forward(params, tokens, *, cfg, backend, dtype=None):
    """tokens int32 [B, S] -> (float32 logits [B, S, 256], summed load-balancing
    loss, rows dropped). Call inside shard_map over 'ep' (one rank's tokens)."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype or jnp.bfloat16)
    x = jnp.take(params["embed"].astype(dtype), tokens, axis=0) + params["pos"].astype(dtype)
    run = lambda p, h: block(p, h, cfg=cfg, backend=backend, dtype=dtype)
    if cfg.get("remat"):
        run = jax.checkpoint(run)
    aux = jnp.zeros((), jnp.float32)
    dropped = jnp.zeros((), jnp.int32)
    for p in params["blocks"]:
        x, layer_aux, layer_dropped = run(p, x)
        aux, dropped = aux + layer_aux, dropped + layer_dropped
    x = rms_norm(x, params["norm"], dtype)
    logits = jnp.dot(x, params["embed"].astype(dtype).T)
    return logits.astype(jnp.float32), aux, dropped


def optimizer():
    """The example's optimizer at its "large" preset's learning rate and length."""
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, LEARNING_RATE, min(100, SCHEDULE_STEPS // 10), SCHEDULE_STEPS, LEARNING_RATE / 10)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, weight_decay=0.01))


def local_train_step(params, opt_state, seqs, *, cfg, backend, tx, dtype=None):
    """One rank's training step on seqs int32 [B, S + 1]: (params, opt_state,
    next-byte loss, rows dropped). Inside shard_map over 'ep'."""
    import jax
    import optax

    def loss_fn(p):
        logits, aux, dropped = forward(p, seqs[:, :-1], cfg=cfg, backend=backend, dtype=dtype)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()
        return nll + AUX_WEIGHT * aux, (nll, dropped)

    (_, (nll, dropped)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll, dropped


def _stack(tree):
    import jax

    return jax.tree.map(lambda a: a[None], tree)


def _unstack(tree):
    import jax

    return jax.tree.map(lambda a: a[0], tree)


def init_state(mesh, cfg, tx, seed=0):
    """(params, opt_state), every leaf [R, ...] sharded over 'ep': rank r's own."""
    import jax
    from jax.sharding import PartitionSpec as P

    num_local = cfg["experts"] // mesh.size

    def local():
        params = init_params(jax.random.key(seed), jax.lax.axis_index("ep"), cfg, num_local)
        return _stack((params, tx.init(params)))

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(), out_specs=P("ep")))()


def make_train_step(mesh, cfg, backend, tx):
    """jit(shard_map(step)): (state, seqs [R * B, S + 1]) -> (state, loss [R],
    dropped [R]), the state donated."""
    import jax
    from jax.sharding import PartitionSpec as P

    def local(state, seqs):
        params, opt_state = _unstack(state)
        params, opt_state, nll, dropped = local_train_step(params, opt_state, seqs, cfg=cfg,
                                                           backend=backend, tx=tx)
        return _stack((params, opt_state)), nll[None], dropped[None]

    body = jax.shard_map(local, mesh=mesh, in_specs=(P("ep"), P("ep")),
                         out_specs=(P("ep"), P("ep"), P("ep")))
    options = gpu_options(mesh.devices.flat[0].platform,
                          RAGGED_DOT_LOWERINGS[cfg.get("ragged_dot", "cudnn")])
    return jax.jit(body, donate_argnums=0, compiler_options=options)


def make_batches(mesh, cfg, data, seed=0):
    """BATCHES global int32 [R * B, S + 1] arrays of byte windows of `data`, a
    different window per rank (every process draws all, places its own)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    put = putter(mesh)
    B, S = cfg["batch"], cfg["seq_len"]
    out = []
    for _ in range(BATCHES):
        starts = rng.integers(0, len(data) - S - 1, (mesh.size, B))
        out.append(put([lm.windows(data, s, S) for s in starts]))
    return out


class Trainer:
    """Runs the compiled step on its own state, the batches in turn: a call
    takes no arguments, so `time_per_call` can repeat it on donated state."""

    def __init__(self, step, state, batches):
        self.step, self.state, self.batches, self.calls = step, state, batches, 0

    def __call__(self):
        batch = self.batches[self.calls % len(self.batches)]
        self.state, self.loss, self.dropped = self.step(self.state, batch)
        self.calls += 1
        return self.loss, self.dropped


def _local_values(array):
    """This process's values of a [R] array sharded over 'ep'."""
    import numpy as np

    return [float(np.asarray(s.data).reshape(-1)[0]) for s in array.addressable_shards]


def xla_bytes(compiled):
    """Bytes XLA allocates per device for a compiled program (arguments +
    outputs not aliased to them + temporaries), or None where unknown."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - a backend without the analysis
        return None


def jax_ep_kernel_seconds(rows):
    """Summed seconds of the `_timing.device_kernels` rows that are jax_ep's kernels."""
    return sum(sec for name, sec, _ in rows if is_jax_ep_kernel(name))


def is_jax_ep_kernel(name):
    return any(s in name for s in JAX_EP_KERNELS)


def short_name(name):
    """A kernel's name without its signature: "void jax_ep::(anonymous
    namespace)::DispatchSendKernel<...>(...)" -> "jax_ep::DispatchSendKernel"."""
    name = name.replace("(anonymous namespace)::", "").strip()
    name = re.sub(r"^void ", "", name)
    name = re.split(r"[<(]", name, maxsplit=1)[0].strip()
    return name[:80] or "?"


def measure(mesh, cfg, backend, data, *, warm_calls, profile):
    """One backend's row for this process: wall seconds per step, losses, rows
    dropped, XLA's bytes, and with `profile` the kernel times."""
    tx = optimizer()
    state = init_state(mesh, cfg, tx)
    batches = make_batches(mesh, cfg, data)
    compiled = make_train_step(mesh, cfg, backend, tx).lower(state, batches[0]).compile()
    trainer = Trainer(compiled, state, batches)
    del state  # donated to the first step
    first = _local_values(trainer()[0])
    sec = time_per_call(trainer, iters=cfg["iters"], warm_calls=warm_calls)
    row = dict(backend=backend, sec=sec, first_loss=first, last_loss=_local_values(trainer.loss),
               dropped=_local_values(trainer.dropped), steps=trainer.calls,
               xla_bytes=xla_bytes(compiled), kernel_sec=None, jax_ep_sec=None, kernels=[])
    if profile:
        try:
            kernels, busy = device_kernels(trainer, calls=PROFILE_CALLS)
        except Exception as e:  # noqa: BLE001 - no CUPTI here: wall time only
            print(f"profile of {backend} failed: {type(e).__name__}: {e}")
            kernels, busy = [], 0.0
        if kernels:
            row.update(kernel_sec=busy, jax_ep_sec=jax_ep_kernel_seconds(kernels),
                       kernels=[(short_name(n), s, c) for n, s, c in kernels])
    return row


def train_bytes():
    """The example's training bytes (the standard library's sources)."""
    train, _ = lm.load_corpus()
    return train


def worker(cfg_json):
    """One rank's process on the GPU: the cuda row (and the reference's at one rank)."""
    import jax

    import jax_ep

    cfg = json.loads(cfg_json)
    mesh = mesh_of(jax.devices())
    alone = jax.process_count() == 1
    warm = None if alone else WARM_CALLS
    data = train_bytes()
    rows = []
    if alone and cfg["reference"]:
        rows.append(measure(mesh, cfg, "reference", data, warm_calls=warm, profile=cfg["profile"]))
    T, _ = tokens_per_step(cfg, mesh.size)
    jax_ep.initialize(mesh, axis_name="ep", backend="cuda", max_tokens_per_rank=T,
                      hidden=cfg["hidden"], top_k=cfg["top_k"], dtype="bfloat16")
    try:
        rows.append(measure(mesh, cfg, "cuda", data, warm_calls=warm, profile=cfg["profile"]))
    finally:
        jax_ep.shutdown()
    return dict(rows=rows, device=jax.devices()[0].device_kind)


def dry_run(cfg):
    """The whole benchmark on CPU devices in this process, reference backend."""
    from bench_decode_step import cpu_devices

    mesh = mesh_of(cpu_devices(cfg["ranks"]))
    row = measure(mesh, cfg, "reference", train_bytes(), warm_calls=1, profile=False)
    return dict(rows=[row], device="cpu")


# --- report -------------------------------------------------------------------

def size(nbytes):
    """Bytes as "12.34 GB", or "56.7 MB" below 1 GB."""
    return f"{nbytes / GB:.2f} GB" if nbytes >= GB else f"{nbytes / 1e6:.1f} MB"


def merge(results):
    """Per-process results -> {backend: row}: each time the largest over the
    processes (None where any has none), the losses and drops of all ranks."""
    merged = {}
    for row in results[0]["rows"]:
        peers = [next(r for r in res["rows"] if r["backend"] == row["backend"])
                 for res in results]
        out = {f: (max(p[f] for p in peers) if all(p[f] is not None for p in peers) else None)
               for f in ("sec", "kernel_sec", "jax_ep_sec", "xla_bytes")}
        for f in ("first_loss", "last_loss", "dropped"):
            out[f] = [v for p in peers for v in p[f]]
        out["steps"] = row["steps"]
        out["kernels"] = row["kernels"]  # the first process's breakdown
        merged[row["backend"]] = out
    return merged


def table_row(ranks, backend, row, cfg):
    """One markdown row: R, backend, ms / step, tokens / s per rank and all
    ranks, kernel ms, jax_ep kernel ms, its share of the kernels and of the step,
    XLA memory per process."""
    per_rank, total = tokens_per_step(cfg, ranks)
    sec, kernel, ours = row["sec"], row["kernel_sec"], row["jax_ep_sec"]
    ms = lambda v: f"{v * 1e3:9.2f}" if v is not None else f"{'n/a':>9}"
    if kernel and backend != "reference":
        ep = (ms(ours), f"{100 * ours / kernel:5.1f}%", f"{100 * ours / sec:5.1f}%")
    else:
        ep = (f"{'n/a':>9}",) * 3
    mem = size(row["xla_bytes"]) if row["xla_bytes"] else "n/a"
    return (f"| {ranks} | {backend:<9} | {ms(sec)} | {per_rank / sec:12,.0f} | "
            f"{total / sec:12,.0f} | {ms(kernel)} | {ep[0]} | {ep[1]} | {ep[2]} | {mem} |")


def report(cfg, results, argv):
    R = cfg["ranks"]
    rows = merge(results)
    per_rank, total = tokens_per_step(cfg, R)
    cap = capacity(per_rank, cfg["top_k"], R)
    counts = param_counts(cfg, R)
    mem = memory_estimate(cfg, R)
    where = "CPU, dry run" if cfg["dry_run"] else (
        f"one {results[0]['device']}" if R == 1 else
        f"{R} processes sharing one {results[0]['device']} under MPS")
    print(f"command: python3 benchmarks/bench_train.py {' '.join(argv)}".rstrip())
    print(f"training step of examples/train_moe_lm.py's model: {cfg['layers']} layers, hidden "
          f"{cfg['hidden']}, {cfg['heads']} heads, {cfg['experts']} experts (top-{cfg['top_k']}) "
          f"of SwiGLU width {cfg['ffn']}, seq-len {cfg['seq_len']}, batch {cfg['batch']} per "
          f"rank = {per_rank} tokens per rank, {total} per step; capacity {cap} rows per rank "
          f"(factor {CAPACITY_FACTOR}); bf16 compute, f32 parameters, AdamW"
          f"{', remat per block' if cfg['remat'] else ''}"
          f"{'' if cfg.get('expert_capacity_factor') is None else ', expert capacity factor ' + str(cfg['expert_capacity_factor'])}"
          f"; R = {R} ({where}); the experts' "
          f"ragged_dot lowered by {cfg['ragged_dot']} (--ragged-dot)")
    print(f"parameters per rank: {counts['total'] / 1e6:.1f} M ({counts['dense'] / 1e6:.1f} M "
          f"dense, {counts['experts'] / 1e6:.1f} M in the experts, {cfg['experts'] // R} per "
          f"layer)")
    print(f"memory estimate per process: {size(mem['per_process'])} (state {size(mem['state'])}, "
          f"gradients {size(mem['gradients'])}, activations {size(mem['activations'])}, jax_ep "
          f"buffer {size(mem['buffers'])}, runtime {size(mem['runtime'])}); {R} "
          f"process{'es' if R > 1 else ''}: {size(mem['total'])}"
          + ("" if R == 1 else " of the one GPU") + "; XLA's own count for the step below")
    print("| R | backend | ms / step | tokens / s per rank | tokens / s, all ranks | "
          "kernel ms / step | jax_ep kernel ms / step | jax_ep share of kernels | "
          "jax_ep share of step | XLA memory / process |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for backend, row in rows.items():
        print(table_row(R, backend, row, cfg))
    for backend, row in rows.items():
        first = sum(row["first_loss"]) / len(row["first_loss"])
        last = sum(row["last_loss"]) / len(row["last_loss"])
        print(f"{backend}: loss {first:.3f} after the first step, {last:.3f} after "
              f"{row['steps']} (mean over ranks); rows dropped for capacity in the last step, "
              f"all ranks: {int(sum(row['dropped']))}")
        if row["kernels"]:
            ours = [k for k in row["kernels"] if is_jax_ep_kernel(k[0])]
            print(f"{backend}: jax_ep's kernels per step (rank 0): " + (", ".join(
                f"{n} {s * 1e3:.2f} ms x{c:g}" for n, s, c in ours) or "none"))
            print(f"{backend}: slowest kernels per step (rank 0): " + ", ".join(
                f"{n} {s * 1e3:.2f} ms x{c:g}" for n, s, c in row["kernels"][:6]))
    if R > 1 or not cfg["reference"] or cfg["dry_run"]:
        print("reference backend: one rank only on the GPU (XLA collectives cannot run between "
              "processes sharing one GPU)" + (", skipped (--no-reference)"
                                              if not cfg["reference"] else ""))
    if R > 1:
        print(f"R > 1: no all-reduce of the dense parameters' gradients "
              f"({counts['dense'] * 4 / 1e6:.0f} MB in f32 per step for a data-parallel step), "
              f"and the load-balancing loss and the gradient-norm clip are per rank")
    print("times: wall per jitted step (forward + backward + AdamW, state donated), host dispatch "
          f"included, best of 5 runs of {cfg['iters']} steps; kernel: summed kernel time per step "
          f"from a jax.profiler trace of {PROFILE_CALLS} steps"
          + ("; with several ranks each time is its largest value over the ranks (under MPS the "
             "processes' kernels overlap and jax_ep's kernels include waiting for peers: upper "
             "bounds)" if R > 1 else "")
          + "; reference: its dispatch / combine are XLA ops, no jax_ep share")
    if cfg["dry_run"]:
        print("dry run: CPU devices, the reference backend, no kernel times")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(p)
    p.add_argument("--layers", type=int, help=f"blocks ({FULL['layers']})")
    p.add_argument("--hidden", type=int, help=f"H ({FULL['hidden']})")
    p.add_argument("--heads", type=int, help=f"attention heads ({FULL['heads']})")
    p.add_argument("--experts", type=int, help=f"E ({FULL['experts']})")
    p.add_argument("--top-k", type=int, help=f"K ({FULL['top_k']})")
    p.add_argument("--ffn", type=int, help=f"F, the experts' SwiGLU width ({FULL['ffn']})")
    p.add_argument("--seq-len", type=int, help=f"bytes per sequence ({FULL['seq_len']})")
    p.add_argument("--batch", type=int, help=f"sequences per rank ({FULL['batch']})")
    p.add_argument("--iters", type=int, help=f"steps per timed run ({FULL['iters']})")
    p.add_argument("--remat", action="store_true", help="recompute each block in the backward")
    p.add_argument("--expert-capacity-factor", type=float, default=None,
                   help="cap each local expert at ceil(f * T * K / L) (row, k) pairs "
                        "(moe.local_experts' expert_capacity); default: every pair")
    add_ragged_dot_option(p)
    args = p.parse_args(argv)
    cfg = sizes_from(p, args, FULL, DRY)
    cfg.update(remat=args.remat, ragged_dot=args.ragged_dot,
               expert_capacity_factor=args.expert_capacity_factor)
    if min(cfg[k] for k in FULL) < 1:
        p.error("every size must be positive")
    if cfg["hidden"] % cfg["heads"] or cfg["hidden"] % 8:
        p.error(f"--hidden ({cfg['hidden']}) must be a multiple of --heads ({cfg['heads']}) "
                "and of 8 (dispatch rows of 16 bytes)")
    mem = memory_estimate(cfg, args.ranks)
    print(f"memory estimate: {size(mem['per_process'])} per process, {size(mem['total'])} for "
          f"{args.ranks} (details below)", flush=True)
    if args.dry_run:
        results = [dry_run(cfg)]
    else:
        results = run_ranks("bench_train:worker", cfg)
    report(cfg, results, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
