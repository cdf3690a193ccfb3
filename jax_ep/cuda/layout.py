"""Layout and routing custom calls: per-rank / per-expert counts, and dispatch's send slots.

Both are local (no peer communication), so they need no `initialize`:
`jax_ep_get_dispatch_layout` backs `get_dispatch_layout`, and `jax_ep_route`
computes the slot / sent arrays of `_routing.route` for the intranode
dispatch (the same values, without XLA's slow cumsum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import extension

GET_DISPATCH_LAYOUT = "jax_ep_get_dispatch_layout"
ROUTE = "jax_ep_route"


def compiled() -> bool:
    return extension.has_target(GET_DISPATCH_LAYOUT)


def get_dispatch_layout_ffi(topk_idx, *, num_experts, num_ranks):
    """Custom call ``jax_ep_get_dispatch_layout``.

    Args:
      topk_idx: int32 ``[T, K]`` global expert ids; ids outside ``[0, E)``
        mean "no expert".
      num_experts: E (static). num_ranks: R (static), must divide E.

    Returns:
      ``num_tokens_per_rank`` int32 ``[R]``, ``num_tokens_per_expert`` int32
      ``[E]``, ``is_token_in_rank`` bool ``[T, R]``.
    """
    extension.register_targets()
    operand_type = jax.typeof(topk_idx)
    if operand_type.ndim != 2 or operand_type.dtype != jnp.int32:
        raise TypeError(f"topk_idx must be int32[T, K], got {operand_type.str_short()}")
    num_experts, num_ranks = int(num_experts), int(num_ranks)
    if num_ranks < 1 or num_experts < 1 or num_experts % num_ranks:
        raise ValueError(
            f"num_ranks ({num_ranks}) must be >= 1 and divide num_experts ({num_experts})")
    num_tokens = operand_type.shape[0]
    result_types = (
        extension.result_type(operand_type, (num_ranks,), jnp.int32),
        extension.result_type(operand_type, (num_experts,), jnp.int32),
        extension.result_type(operand_type, (num_tokens, num_ranks), jnp.bool_),
    )
    # vmap: the handler takes exactly rank-2 ids and sums over all tokens, so
    # a batched operand ("expand_dims"/"broadcast_all") would be wrong;
    # "sequential" calls it once per batch element.
    call = jax.ffi.ffi_call(GET_DISPATCH_LAYOUT, result_types, vmap_method="sequential")
    return call(topk_idx, num_experts=np.int64(num_experts), num_ranks=np.int64(num_ranks))


def route_ffi(topk_idx, *, num_experts, num_ranks):
    """Custom call ``jax_ep_route``: the slot and sent arrays of ``_routing.route``
    (int32 ``[T, R]``, ``[R]``)."""
    extension.register_targets()
    operand_type = jax.typeof(topk_idx)
    num_tokens = operand_type.shape[0]
    # The kernels' per-chunk counts come back as a third result (XLA owns the
    # memory, so a CUDA graph's replays use the same buffer) and are dropped.
    scratch_ints = extension.cuda_module().route_scratch_ints(num_tokens, num_ranks)
    result_types = (
        extension.result_type(operand_type, (num_tokens, num_ranks), jnp.int32),
        extension.result_type(operand_type, (num_ranks,), jnp.int32),
        extension.result_type(operand_type, (scratch_ints,), jnp.int32),
    )
    call = jax.ffi.ffi_call(ROUTE, result_types)
    slot, sent, _ = call(topk_idx, num_experts=np.int64(num_experts),
                         num_ranks=np.int64(num_ranks))
    return slot, sent


def get_dispatch_layout(topk_idx, *, num_experts, num_ranks):
    """Backend function of `jax_ep.get_dispatch_layout` (same signature as the reference's)."""
    return get_dispatch_layout_ffi(topk_idx, num_experts=num_experts, num_ranks=num_ranks)
