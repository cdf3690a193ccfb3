"""Train a small MoE transformer block with expert parallelism (jax_ep + optax).

The task: sequences follow a hidden random successor rule (next = succ[token]),
so the loss can only fall if tokens reach the right experts and gradients flow
back through combine and dispatch. Tokens and experts are sharded over the
'ep' axis; everything else is replicated.

    python examples/train_moe.py                # 8 virtual CPU devices
    python examples/train_moe.py --steps 300    # (all local GPUs when present)
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--devices", type=int, default=8, help="virtual CPU devices when no GPU")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch-per-device", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import jax

    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_num_cpu_devices", args.devices)
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm import tqdm

    import jax_ep
    from jax_ep.moe import moe_ffn

    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("ep",))
    E, H, F, V, S = args.experts, args.hidden, args.ffn, args.vocab, args.seq
    # Sizes the GPU communication buffers (ignored on CPU).
    jax_ep.initialize(mesh, axis_name="ep", backend=args.backend,
                      max_tokens_per_rank=args.batch_per_device * S, hidden=H, top_k=args.top_k,
                      dtype="float32")
    if E % n:
        sys.exit(f"--experts {E} must be a multiple of the device count {n}")

    keys = jax.random.split(jax.random.key(args.seed), 8)
    init = lambda k, shape, fan_in: jax.random.normal(k, shape, jnp.float32) / jnp.sqrt(fan_in)
    params = dict(
        embed=init(keys[0], (V, H), 1.0),
        wq=init(keys[1], (H, H), H), wk=init(keys[2], (H, H), H), wv=init(keys[3], (H, H), H),
        router=init(keys[4], (H, E), H),
        w_in=init(keys[5], (E, H, F), H), w_out=init(keys[6], (E, F, H), F),
        unembed=init(keys[7], (H, V), H),
    )
    expert_spec = dict.fromkeys(params, P())
    expert_spec.update(w_in=P("ep"), w_out=P("ep"))
    params = {k: jax.device_put(v, NamedSharding(mesh, expert_spec[k])) for k, v in params.items()}

    def rms(x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)

    def block(p, tokens):  # local shard: tokens [B, S]
        x = p["embed"][tokens]
        h = rms(x)
        q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
        att = jnp.einsum("bqh,bkh->bqk", q, k) / jnp.sqrt(H)
        att = jnp.where(jnp.tril(jnp.ones((S, S), bool)), att, -1e9)
        x = x + jnp.einsum("bqk,bkh->bqh", jax.nn.softmax(att, -1), v)
        flat = rms(x).reshape(-1, H)
        y, aux = moe_ffn(flat, p["router"], p["w_in"], p["w_out"], top_k=args.top_k,
                         num_experts=E, axis_name="ep")
        x = x + y.reshape(x.shape)
        logits = rms(x) @ p["unembed"]
        nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
        loss = jax.lax.pmean(jnp.mean(nll), "ep")
        balance = jax.lax.pmean(aux["balance_loss"], "ep")
        return loss + 0.01 * balance, loss

    sharded_block = jax.shard_map(block, mesh=mesh, in_specs=(expert_spec, P("ep")),
                                  out_specs=(P(), P()))
    opt = optax.adam(args.lr)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, tokens):
        (_, loss), grads = jax.value_and_grad(sharded_block, has_aux=True)(params, tokens)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    succ = jax.random.permutation(jax.random.key(args.seed + 1), V)

    def batch(step):
        start = jax.random.randint(jax.random.key(1000 + step), (n * args.batch_per_device,), 0, V)
        seq = [start]
        for _ in range(S - 1):
            seq.append(succ[seq[-1]])
        return jax.device_put(jnp.stack(seq, 1), NamedSharding(mesh, P("ep")))

    losses = []
    bar = tqdm(range(args.steps), desc=f"MoE on {n} x {jax.devices()[0].platform}")
    for step in bar:
        params, opt_state, loss = train_step(params, opt_state, batch(step))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    print(f"first loss {losses[0]:.4f}  last loss {losses[-1]:.4f}")
    jax_ep.shutdown()
    return losses


if __name__ == "__main__":
    main()
