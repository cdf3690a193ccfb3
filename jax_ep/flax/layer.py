"""`MoE`: an expert-parallel mixture-of-experts feed-forward layer for Flax NNX.

The layer is called like any NNX layer on a global [B, ..., H] array; it
opens the `jax.shard_map` the jax_ep ops need itself (bodies in `_shard.py`),
with the leading dimension sharded over the token axes of the mesh (all of
them by default) and the experts over its expert axis. After each call it
holds the batch's load-balancing loss in `layer.aux_loss` (type `AuxLoss`;
`total_aux_loss(model)` sums every MoE layer of a model, for the training
loss) and the receive rows dropped for capacity, summed over all devices, in
`layer.dropped_tokens`, and the (row, k) pairs the experts left out for
`expert_capacity_factor` in `layer.dropped_pairs` (both type `RoutingStats`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import _shard


class AuxLoss(nnx.Variable):
    """A load-balancing loss written by the last call of an MoE layer."""


class RoutingStats(nnx.Variable):
    """Routing counters written by the last call of an MoE layer."""


def total_aux_loss(module):
    """Sum of the `AuxLoss` of every MoE layer in `module` (0.0 if none)."""
    return sum(jax.tree.leaves(nnx.state(module, AuxLoss)), jnp.zeros((), jnp.float32))


def _context_mesh():
    """The concrete mesh of `jax.set_mesh`, or None."""
    mesh = jax.sharding.get_mesh()
    return None if mesh is None or mesh.empty else mesh


def _place(mesh, value, spec):
    """Lay value out as shard_map's in_spec: on a mesh of Explicit axes shard_map
    refuses an input of another sharding; with Auto axes it reshards itself.
    (A mesh mixing both kinds is not supported.)"""
    if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return jax.reshard(value, NamedSharding(mesh, spec))
    return value


@functools.lru_cache(maxsize=None)
def _runner(mesh, spec, decode):
    """(the jitted shard_map of a path, its in_specs), built once per setting so
    that eager calls hit jit's cache (jit compiles the body once, not op by op)."""
    body = _shard.decode if decode else _shard.train

    def local(x, *params):
        y, aux, dropped, dropped_pairs = body(x.reshape(-1, x.shape[-1]), *params, spec=spec)
        return y.reshape(x.shape), aux, dropped, dropped_pairs

    tokens, experts = P(spec.token_axes), P(spec.expert_axis)
    in_specs = (tokens, P(), experts, experts, experts)
    run = jax.shard_map(local, mesh=mesh, in_specs=in_specs,
                        out_specs=(tokens, P(), P(), P()))
    return jax.jit(run), in_specs


class MoE(nnx.Module):
    """Top-k routed SwiGLU experts over an expert-parallel mesh axis.

    Each token goes to its top-k experts by a linear router (H -> E logits,
    float32 softmax, top-k); with `renormalize=True` (default) its k weights
    are divided by their sum, otherwise they are the raw softmax probabilities.
    Expert e computes (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e], with
    w_gate, w_up [E, H, F] and w_down [E, F, H] stacked and sharded over
    `expert_axis` (replicated over the other axes); the router is replicated.

    Two paths, chosen per call:

    * `layer(x)` (training, prefill): `jax_ep.dispatch` with a receive
      capacity set by `capacity_factor` (see `_shard.capacity`: None = R * T
      rows, never drops; else ceil(factor * T * K) rows per device, T the
      tokens per device) -> `jax.lax.ragged_dot` over the received rows sorted
      by local expert -> `jax_ep.combine`. `expert_capacity_factor` (None =
      every (row, k) pair, on R * T * K slots) caps each local expert at
      ceil(factor * T * K / L) pairs (`jax_ep.moe.local_experts`'
      `expert_capacity`): far less memory, pairs past the cap left out.
    * `layer(x, decode=True)` (decoding): `jax_ep.low_latency_dispatch` in the
      ragged layout (the received rows grouped by local expert, at most
      R * M * min(K, L) of them; M = `max_tokens_per_rank`, default T) ->
      `jax_ep.moe.ragged_experts` (`jax.lax.ragged_dot` on the real rows
      only) -> `jax_ep.low_latency_combine`. Never drops. `decode_fp8=True` dispatches
      in FP8 (H % 128 == 0) and dequantizes before the matmul; not
      differentiable. On the CUDA backend the low-latency mode needs the
      expert axis to span the whole mesh.

    Both paths run the experts through `jax.lax.ragged_dot`, which XLA on
    CUDA expands into a masked dense dot over every local expert unless told
    otherwise: compile with `jax_ep.moe.CUDA_COMPILER_OPTIONS` (`jax.jit`'s
    compiler_options) or run with
    `XLA_FLAGS=--xla_gpu_experimental_use_ragged_dot_fusion=true`.

    Args:
      hidden, ffn: H and F.
      num_experts, top_k: E (a multiple of the expert axis size) and K.
      mesh: the device mesh; default the one set by `jax.set_mesh`.
      expert_axis: the mesh axis the experts are sharded over (the EP axis).
      token_axes: the mesh axes x's leading dimension is sharded over, major
        first; default every axis of the mesh, so each device holds T = N /
        devices of the N tokens.
      dtype: compute dtype of the expert path (default: x's dtype); the
        router always runs in float32.
      param_dtype: dtype of the parameters.
      backend: jax_ep backend ("reference", "cuda", "auto", None = default).
      rngs: `nnx.Rngs` for the initialisation.
    """

    def __init__(self, hidden, ffn, num_experts, top_k, *, rngs, mesh=None,
                 expert_axis="expert", token_axes=None, capacity_factor=None,
                 expert_capacity_factor=None, renormalize=True, max_tokens_per_rank=None,
                 decode_fp8=False, dtype=None, param_dtype=jnp.float32, backend=None):
        mesh = mesh if mesh is not None else _context_mesh()
        if mesh is None:
            raise ValueError("jax_ep.flax.MoE: no mesh; pass mesh=... or build the layer "
                             "under `with jax.set_mesh(mesh):`.")
        if expert_axis not in mesh.axis_names:
            raise ValueError(f"jax_ep.flax.MoE: expert_axis={expert_axis!r} is not an axis of "
                             f"the mesh {mesh.axis_names}.")
        token_axes = tuple(mesh.axis_names) if token_axes is None else tuple(token_axes)
        if expert_axis not in token_axes:
            raise ValueError(f"jax_ep.flax.MoE: token_axes={token_axes} must include the "
                             f"expert axis {expert_axis!r} (each EP rank sends its own tokens).")
        ranks = mesh.shape[expert_axis]
        if num_experts % ranks:
            raise ValueError(f"jax_ep.flax.MoE: num_experts={num_experts} is not a multiple of "
                             f"the {ranks} devices on the expert axis {expert_axis!r}.")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"jax_ep.flax.MoE: top_k={top_k} must be in [1, {num_experts}].")
        for name, factor in (("capacity_factor", capacity_factor),
                             ("expert_capacity_factor", expert_capacity_factor)):
            if factor is not None and not factor > 0:
                raise ValueError(f"jax_ep.flax.MoE: {name} must be > 0 or None, "
                                 f"got {factor!r}.")
        self.mesh = mesh
        self.dtype = dtype
        self.spec = _shard.Spec(
            num_experts=num_experts, top_k=top_k, renormalize=renormalize,
            expert_axis=expert_axis, token_axes=token_axes, capacity_factor=capacity_factor,
            backend=backend, max_tokens_per_rank=max_tokens_per_rank, decode_fp8=decode_fp8,
            expert_capacity_factor=expert_capacity_factor)

        def param(init, shape, fan_in, spec):
            value = init(rngs.params(), shape, param_dtype) / math.sqrt(fan_in)
            return nnx.Param(value, out_sharding=spec, mesh=mesh)

        normal = jax.random.normal
        expert = (expert_axis, None, None)
        self.router = param(normal, (hidden, num_experts), hidden, (None, None))
        self.w_gate = param(normal, (num_experts, hidden, ffn), hidden, expert)
        self.w_up = param(normal, (num_experts, hidden, ffn), hidden, expert)
        self.w_down = param(normal, (num_experts, ffn, hidden), ffn, expert)
        self.aux_loss = AuxLoss(jnp.zeros((), jnp.float32))
        self.dropped_tokens = RoutingStats(jnp.zeros((), jnp.int32))
        self.dropped_pairs = RoutingStats(jnp.zeros((), jnp.int32))

    def __call__(self, x, *, decode=False):
        """x [B, ..., H], global -> [B, ..., H] in the compute dtype.

        The leading dimension is split over the token axes (B a multiple of
        their device count); each device runs its [B / devices * ..., H] tokens.
        """
        spec = self.spec
        shards = math.prod(self.mesh.shape[a] for a in spec.token_axes)
        if x.ndim < 2 or x.shape[0] % shards:
            raise ValueError(f"jax_ep.flax.MoE: x of shape {x.shape} must be [B, ..., H] with B "
                             f"split evenly over the {shards} devices of the token axes "
                             f"{spec.token_axes}.")
        dtype = self.dtype or x.dtype
        run, in_specs = _runner(self.mesh, spec, decode)
        args = (x.astype(dtype), self.router[...], self.w_gate[...].astype(dtype),
                self.w_up[...].astype(dtype), self.w_down[...].astype(dtype))
        y, aux, dropped, dropped_pairs = run(
            *map(functools.partial(_place, self.mesh), args, in_specs))
        self.aux_loss[...] = aux
        self.dropped_tokens[...] = dropped
        self.dropped_pairs[...] = dropped_pairs
        return y
