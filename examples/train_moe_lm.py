"""Train a small byte-level MoE language model on the Python standard library.

A decoder-only transformer (256-byte embedding, learned positions, pre-norm
blocks of causal attention and the expert-parallel `jax_ep.flax.MoE` SwiGLU
FFN, output tied to the embedding unless --untied) learns to predict the next
byte of the standard library's own .py files (`sysconfig` "stdlib", sorted;
every 10th file is validation; test / site-packages directories are left out
so every installation reads the same text). Tokens are sharded over all
devices, the experts over the 'expert' mesh axis.

    python examples/train_moe_lm.py              # 8 virtual CPU devices, a few minutes
    python examples/train_moe_lm.py --compare    # also the reference backend: curves + tokens/s
    python examples/train_moe_lm.py --size large # every local GPU, busy

Prints the first / last training loss and the validation loss, and writes a
plot of the loss curves (a .csv when matplotlib is missing).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import sysconfig
import time

PRESETS = {
    "small": dict(layers=2, hidden=64, heads=4, experts=8, top_k=2, ffn=128, seq=128,
                  batch_per_device=4, steps=600, lr=3e-3, dtype="float32",
                  capacity_factor=1.25),
    "large": dict(layers=8, hidden=1024, heads=16, experts=64, top_k=4, ffn=1024, seq=1024,
                  batch_per_device=16, steps=2000, lr=6e-4, dtype="bfloat16",
                  capacity_factor=1.25),
}
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
BYTES = 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(PRESETS), default="small",
                   help="preset; the flags below override its values")
    for name, kind in [("layers", int), ("hidden", int), ("heads", int), ("experts", int),
                       ("top-k", int), ("ffn", int), ("seq", int), ("batch-per-device", int),
                       ("steps", int), ("lr", float), ("dtype", str)]:
        p.add_argument(f"--{name}", type=kind, default=None)
    p.add_argument("--ep", type=int, default=None,
                   help="devices on the expert axis (default all; the rest are 'data')")
    p.add_argument("--capacity-factor", type=lambda v: "none" if v == "none" else float(v),
                   default=None, help="receive rows per device = ceil(factor * tokens per "
                   "device * top_k), the rest dropped; 'none': R * tokens, never drops")
    p.add_argument("--aux-weight", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--untied", action="store_true", help="separate output projection")
    p.add_argument("--remat", action="store_true", help="recompute each block in the backward")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cuda"])
    p.add_argument("--compare", action="store_true", help="run again on the reference backend")
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices when no GPU")
    p.add_argument("--out", default="train_moe_lm.png", help="plot (.png) or curves (.csv)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.capacity_factor == "none":
        args.capacity_factor = None
    return args


# --------------------------------------------------------------------------
# Data: the standard library's source, as bytes
# --------------------------------------------------------------------------


def stdlib_files():
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py")
             if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def load_corpus():
    """(train bytes, validation bytes) as uint8 arrays; every 10th file validates."""
    import numpy as np

    root, files = stdlib_files()
    train, val = [], []
    for i, path in enumerate(files):
        (val if i % 10 == 0 else train).append(path.read_bytes())
    as_array = lambda parts: np.frombuffer(b"\n".join(parts), np.uint8)
    print(f"{len(files)} files under {root}: {sum(map(len, train)) / 1e6:.1f} MB train, "
          f"{sum(map(len, val)) / 1e6:.1f} MB validation")
    return as_array(train), as_array(val)


def windows(data, starts, seq):
    import numpy as np

    return np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int32)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def build_model(args, mesh, backend):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_ep.flax import MoE

    dtype = jnp.dtype(args.dtype)

    class Block(nnx.Module):
        def __init__(self, rngs):
            d = args.hidden
            self.norm1 = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
            self.qkv = nnx.Linear(d, 3 * d, use_bias=False, dtype=dtype, rngs=rngs)
            self.proj = nnx.Linear(d, d, use_bias=False, dtype=dtype, rngs=rngs)
            self.norm2 = nnx.RMSNorm(d, dtype=dtype, rngs=rngs)
            self.moe = MoE(d, args.ffn, args.experts, args.top_k, mesh=mesh,
                           capacity_factor=args.capacity_factor, dtype=dtype,
                           backend=backend, rngs=rngs)

        def __call__(self, x):
            b, s, d = x.shape
            heads = lambda t: t.reshape(b, s, args.heads, d // args.heads)
            q, k, v = map(heads, jnp.split(self.qkv(self.norm1(x)), 3, axis=-1))
            att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(att.reshape(b, s, d))
            return x + self.moe(self.norm2(x))

    class LM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(BYTES, args.hidden, dtype=dtype, rngs=rngs)
            self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (args.seq, args.hidden)))
            self.blocks = nnx.List([Block(rngs) for _ in range(args.layers)])
            self.norm = nnx.RMSNorm(args.hidden, dtype=dtype, rngs=rngs)
            self.head = (nnx.Linear(args.hidden, BYTES, dtype=dtype, rngs=rngs)
                         if args.untied else None)

        def __call__(self, tokens):  # [B, S] bytes -> [B, S, 256] float32 logits
            x = self.embed(tokens) + self.pos[...].astype(dtype)
            for block in self.blocks:
                x = (nnx.remat(lambda blk, h: blk(h)) if args.remat else
                     (lambda blk, h: blk(h)))(block, x)
            x = self.norm(x)
            logits = self.head(x) if self.head is not None else self.embed.attend(x)
            return logits.astype(jnp.float32)

    return LM(nnx.Rngs(args.seed))


# --------------------------------------------------------------------------
# One training run
# --------------------------------------------------------------------------


def progress(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc)


def train(args, mesh, backend, data):
    """Train from scratch on `backend`: dict of curves and tokens/s."""
    import jax
    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_ep.flax import RoutingStats, total_aux_loss

    train_data, val_data = data
    batch = args.batch_per_device * mesh.size
    tokens_per_step = batch * args.seq
    place = lambda a: jax.device_put(a, NamedSharding(mesh, P(mesh.axis_names)))
    rng = np.random.default_rng(args.seed)  # the same batches for every backend
    val_starts = np.linspace(0, len(val_data) - args.seq - 2, args.eval_batches * batch).astype(int)
    val_batches = [place(w) for w in np.split(windows(val_data, val_starts, args.seq),
                                              args.eval_batches)]

    with jax.set_mesh(mesh):
        model = build_model(args, mesh, backend)
        schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10),
                                                      args.steps, args.lr / 10)
        tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def nll(model, seqs):
        logits = model(seqs[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, seqs[:, 1:]).mean()

    @nnx.jit
    def train_step(model, opt, seqs):
        def loss_fn(model):
            loss = nll(model, seqs)
            return loss + args.aux_weight * total_aux_loss(model), loss
        (_, loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, sum(jax.tree.leaves(nnx.state(model, RoutingStats)))  # rows dropped

    eval_step = nnx.jit(nll)

    def validate():
        return float(np.mean([eval_step(model, b) for b in val_batches]))

    curves = dict(train=[], val=[])
    label = f"{backend}" + ("" if backend == effective(backend) else f" ({effective(backend)})")
    bar = progress(args.steps, f"{label} on {mesh.size} x {jax.devices()[0].platform}")
    timed_tokens, timed_seconds, last_print = 0, 0.0, time.perf_counter()
    with jax.set_mesh(mesh):
        for step in range(args.steps):
            seqs = place(windows(train_data, rng.integers(0, len(train_data) - args.seq - 1, batch),
                                 args.seq))
            start = time.perf_counter()
            loss, dropped = train_step(model, opt, seqs)
            loss = float(loss)  # waits for the step
            if step > 0:  # step 0 compiles
                timed_tokens += tokens_per_step
                timed_seconds += time.perf_counter() - start
            curves["train"].append((step + 1, loss))
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                curves["val"].append((step + 1, validate()))
            rate = timed_tokens / timed_seconds if timed_seconds else 0.0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{curves['val'][-1][1]:.3f}"
                                if curves["val"] else "-", dropped=int(dropped),
                                tok_s=f"{rate:,.0f}")
            elif time.perf_counter() - last_print > 10 or step + 1 == args.steps:
                print(f"step {step + 1}/{args.steps}  loss {loss:.4f}  {rate:,.0f} tokens/s")
                last_print = time.perf_counter()
    if bar is not None:
        bar.close()
    return dict(label=label, curves=curves, devices=f"{mesh.size} x {jax.devices()[0].platform}",
                tokens_per_s=timed_tokens / max(timed_seconds, 1e-9))


def effective(backend):
    """What `backend` runs here: the CUDA kernels only on GPUs of a CUDA build."""
    import jax

    import jax_ep

    on_gpu = jax.devices()[0].platform == "gpu" and jax_ep.build_info().get("cuda", False)
    return "cuda" if backend != "reference" and on_gpu else "reference"


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def smooth(steps, values, width=20):
    """Centred moving average: (steps, means) of the windows that fit."""
    import numpy as np

    width = max(1, min(width, len(values) // 10))
    means = np.convolve(np.asarray(values, float), np.ones(width) / width, mode="valid")
    return steps[width // 2: width // 2 + len(means)], means


def save_curves(runs, out):
    out = pathlib.Path(out)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out = out.with_suffix(".csv")
        print(f"matplotlib is not installed (pip install matplotlib): writing {out} instead")
        lines = ["run,split,step,loss"]
        for run in runs:
            for split, points in run["curves"].items():
                lines += [f"{run['label']},{split},{s},{v:.6f}" for s, v in points]
        out.write_text("\n".join(lines) + "\n")
        return out
    panels = 2 if len(runs) > 1 else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    # The second run is drawn thinner and dotted, so equal curves stay visible.
    for run, color, style in zip(runs, ["tab:blue", "tab:orange"], [("-", 2.0, "o"), (":", 1.5, "s")]):
        steps, losses = zip(*run["curves"]["train"])
        ax.plot(steps, losses, color=color, alpha=0.2, lw=0.8)
        ax.plot(*smooth(steps, losses), style[0], color=color, lw=style[1],
                label=f"{run['label']} train")
        vs, vl = zip(*run["curves"]["val"])
        ax.plot(vs, vl, style[2] + "--", color=color, ms=4, mfc="none" if style[2] == "s" else color,
                label=f"{run['label']} validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)",
           title=f"byte-level MoE LM on the stdlib, {runs[0]['devices']}")
    ax.grid(alpha=0.3)
    ax.legend()
    if panels == 2:
        ax = axes[0, 1]
        names = [run["label"] for run in runs]
        rates = [run["tokens_per_s"] for run in runs]
        ax.bar(names, rates, color=["tab:blue", "tab:orange"])
        for i, rate in enumerate(rates):
            ax.text(i, rate, f"{rate:,.0f}", ha="center", va="bottom")
        ax.set(ylabel="tokens / s (after compilation)", title="training throughput")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv=None):
    args = parse_args(argv)
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_num_cpu_devices", args.devices)
    import jax_ep

    n = jax.device_count()
    ep = args.ep or n
    if n % ep or args.experts % ep or args.hidden % args.heads:
        sys.exit(f"need devices ({n}) divisible by --ep ({ep}), --experts ({args.experts}) by "
                 f"--ep and --hidden ({args.hidden}) by --heads ({args.heads})")
    # Auto axes: XLA propagates the batch sharding through the dense layers
    # (embedding lookups included); the MoE layer brings its own shard_map.
    mesh = jax.make_mesh((n // ep, ep), ("data", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    # Sizes the GPU communication buffers (nothing to do on CPU).
    jax_ep.initialize(mesh, axis_name="expert", backend=args.backend,
                      max_tokens_per_rank=args.batch_per_device * args.seq, hidden=args.hidden,
                      top_k=args.top_k, dtype=args.dtype)
    data = load_corpus()
    runs = [train(args, mesh, args.backend, data)]
    if args.compare:
        runs.append(train(args, mesh, "reference", data))
    for run in runs:
        first, last = run["curves"]["train"][0][1], run["curves"]["train"][-1][1]
        print(f"[{run['label']}] first loss {first:.4f}  last loss {last:.4f}  "
              f"validation loss {run['curves']['val'][-1][1]:.4f}  "
              f"{run['tokens_per_s']:,.0f} tokens/s")
    print(f"wrote {save_curves(runs, args.out)}")
    jax_ep.shutdown()
    return runs


if __name__ == "__main__":
    main()
