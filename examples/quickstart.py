"""jax_ep in 30 lines: dispatch tokens to their experts' devices and combine them back."""
import jax

jax.config.update("jax_num_cpu_devices", 8)  # 8 virtual devices on a CPU-only machine
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep

E, K, T, H = 16, 2, 32, 128  # experts, top-k, tokens per device, hidden
mesh = jax.make_mesh((jax.device_count(),), ("ep",))
jax_ep.initialize(mesh, axis_name="ep")


@jax.jit
@jax.shard_map(mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))
def moe(x, topk_idx, topk_weights):  # local shards: [T, H], [T, K], [T, K]
    recv_x, recv_idx, recv_w, handle = jax_ep.dispatch(
        x, topk_idx, topk_weights, num_experts=E, axis_name="ep")
    y = recv_x * jnp.sum(recv_w, axis=1, keepdims=True).astype(recv_x.dtype)  # "experts"
    return jax_ep.combine(y, handle)


n = jax.device_count()
kx, ki = jax.random.split(jax.random.key(0))
shard = NamedSharding(mesh, P("ep"))
x = jax.device_put(jax.random.normal(kx, (n * T, H), jnp.bfloat16), shard)
idx = jax.device_put(jax.random.randint(ki, (n * T, K), 0, E, jnp.int32), shard)
w = jax.device_put(jnp.full((n * T, K), 1.0 / K), shard)
out = moe(x, idx, w)
print("out", out.shape, out.dtype, "max |out - x| =", float(jnp.max(jnp.abs(out - x))))
