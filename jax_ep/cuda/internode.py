"""Internode mode (NVLink + RDMA over NVSHMEM): node map, region setup, custom calls, backend functions.

An EP axis of R ranks in N nodes of G = ranks_per_node consecutive ranks:
a token crosses to each destination node once, to the rank with the
source's local index there (its relay), which forwards it over NVLink to
every rank of its node that holds one of its experts; combine sums inside
the node at the relay and sends one partial per (token, node) back
(docs/design.md §2.16 for the contract, ffi/kernels/internode/internode.cu
for the protocol). The inter-node legs use NVSHMEM's generic device API
only, so any transport NVSHMEM has works (IBGDA, IBRC, UCX, libfabric).

Setup (`setup`, from `jax_ep.initialize`, every process in the same order):
NVSHMEM bootstrap (`nvshmem.py`, one PE per process, PE = EP rank), then a
collective allocation of the region and a map of the node's regions; each
step ends in an agreement. `node_size` finds G when `ranks_per_node` is None
(the ranks of one host form a node).

The backend functions have the signatures of `intranode`'s; the handle
carries the internode fields (`_handles.DispatchHandle`).
"""

from __future__ import annotations

import dataclasses
import socket

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _agreement, _kvstore
from .._mesh import check_call_mesh, ep_groups, group_ids
from .._routing import Routing, handle_from_counts, localize, valid_ids
from . import calls, errors, extension, grid, layout, nvshmem

DISPATCH = "jax_ep_internode_dispatch"
DISPATCH_CACHED = "jax_ep_internode_dispatch_cached"
COMBINE = "jax_ep_internode_combine"
FP8_BLOCK = 128
_HEAP_HEADROOM = 128 << 20  # NVSHMEM's own symmetric allocations

SETUP_HINT = ("call jax_ep.initialize(mesh, axis_name=..., max_tokens_per_rank=..., "
              "hidden=..., ranks_per_node=...) on the GPU mesh first (one process per GPU).")


@dataclasses.dataclass(frozen=True)
class _Setup:
    axis_name: object
    ranks_per_node: int
    groups: tuple  # the EP group as device ids (_mesh.group_ids)


_setup: _Setup | None = None


def compiled() -> bool:
    return extension.has_target(COMBINE)


def ready() -> bool:
    return _setup is not None


def info() -> dict | None:
    """The runtime's info dict (rank, node map, grid, region), or None when not set up."""
    if _setup is None:
        return None
    return dict(extension.nvshmem_module().internode_info())


# --------------------------------------------------------------------------
# Sizes: the one formula (the handlers check the same bounds at run time)
# --------------------------------------------------------------------------


def message_bytes(ranks_per_node, row_bytes) -> int:
    """Bytes of a dispatch message carrying payload rows of these sizes."""
    slots = -(-4 * int(ranks_per_node) // 16) * 16
    return slots + sum(-(-int(b) // 16) * 16 for b in row_bytes)


def _max_message(ranks_per_node, hidden, itemsize, top_k) -> int:
    meta = [4 * top_k, 4 * top_k]  # ids + weights
    dense = message_bytes(ranks_per_node, [hidden * itemsize] + meta)
    fp8 = message_bytes(ranks_per_node, [hidden, 4 * (hidden // FP8_BLOCK)] + meta)
    return max(dense, fp8, message_bytes(ranks_per_node, [hidden * 4]))


def _combine_row(hidden, itemsize, top_k) -> int:
    return max(hidden * itemsize, 4 * top_k)


def region_bytes(num_ranks, ranks_per_node, max_tokens_per_rank, hidden, *, top_k=8,
                 itemsize=2) -> int:
    """Symmetric-heap bytes of the internode region for these maxima."""
    return int(extension.nvshmem_module().internode_region_bytes(
        num_ranks, ranks_per_node, max_tokens_per_rank,
        _max_message(ranks_per_node, hidden, itemsize, top_k),
        _combine_row(hidden, itemsize, top_k)))


# --------------------------------------------------------------------------
# Node map, setup and teardown
# --------------------------------------------------------------------------


def node_size(mesh, axis_name, ranks_per_node, *, timeout_s) -> int:
    """G: `ranks_per_node` when given, else the ranks of one host (`nodes_of_hosts`).
    G == R: one node."""
    groups = ep_groups(mesh, axis_name)
    num_ranks = groups.shape[1]
    if ranks_per_node is not None:
        return int(ranks_per_node)
    processes = sorted({d.process_index for d in mesh.devices.flat})
    if len(processes) == 1:
        return num_ranks
    scope = _kvstore.new_scope("hosts")
    _kvstore.kv_set_bytes(f"{scope}/{jax.process_index()}", socket.gethostname().encode())
    host = {p: _kvstore.kv_get_bytes(f"{scope}/{p}", timeout=timeout_s).decode()
            for p in processes}
    return nodes_of_hosts([host[d.process_index] for d in groups[0]], axis_name)


def nodes_of_hosts(hosts, axis_name) -> int:
    """G from the host of each rank (in rank order): the ranks of a host must be
    consecutive and every host must hold the same number."""
    num_ranks = len(hosts)
    firsts = [r for r in range(num_ranks) if r == 0 or hosts[r] != hosts[r - 1]]
    size = firsts[1] if len(firsts) > 1 else num_ranks
    runs = [b - a for a, b in zip(firsts, firsts[1:] + [num_ranks])]
    if len(set(hosts)) != len(firsts) or any(n != size for n in runs):
        raise ValueError(
            f"jax_ep.initialize: the EP axis {axis_name!r} spans hosts {list(hosts)} (in rank "
            f"order); the internode mode needs the ranks of each host consecutive and the same "
            f"number on every host. Reorder the mesh's devices or pass ranks_per_node=.")
    return size


def setup(mesh, axis_name, *, ranks_per_node, max_tokens_per_rank, hidden, top_k, itemsize,
          num_blocks, timeout_s, extra_heap_bytes=0):
    """Bootstrap NVSHMEM and allocate the region (collective). Returns `info()`.

    extra_heap_bytes: symmetric heap another NVSHMEM mode set up after this one
    needs (the low-latency region), so that NVSHMEM is initialized once."""
    global _setup
    mod = extension.nvshmem_module()
    errors.install()
    num_ranks = int(mesh.shape[axis_name])
    if num_ranks > mod.internode_max_ranks():
        raise ValueError(f"jax_ep internode mode: at most {mod.internode_max_ranks()} ranks, "
                         f"the EP axis {axis_name!r} has {num_ranks}.")
    msg = _max_message(ranks_per_node, hidden, itemsize, top_k)
    row = _combine_row(hidden, itemsize, top_k)
    pes = nvshmem.bootstrap(
        mesh, axis_name,
        lambda pes: mod.internode_region_bytes(pes.num_ranks, ranks_per_node,
                                               max_tokens_per_rank, msg, row)
        + _HEAP_HEADROOM + int(extra_heap_bytes), timeout_s=timeout_s, mode="internode")
    allocated = []

    def allocate():
        mod.internode_set_options(float(timeout_s), int(num_blocks))
        allocated.append(True)
        mod.internode_alloc(int(ranks_per_node), int(max_tokens_per_rank), msg, row,
                            int(pes.ranks_on_device))
        _check_coresident(num_blocks)

    try:
        _agreement.step(mesh, "allocating the internode region", allocate, timeout_s=timeout_s)
    except BaseException:
        if allocated:
            mod.internode_free()  # collective: every PE got this far (agreed NVSHMEM init)
        raise
    _setup = _Setup(axis_name, int(ranks_per_node), group_ids(mesh, axis_name))
    extension.register_targets()
    return info()


def _check_coresident(num_blocks):
    """The forward and receive kernels spin on other ranks' kernels."""
    grid.check_coresident(dict(extension.nvshmem_module().internode_info()), num_blocks,
                          kernels="internode")


def teardown(mesh=None, *, timeout_s=60.0):
    """Collective: free the region (idempotent); NVSHMEM stays up (nvshmem.py says why).
    With `mesh`, agree first (bounded), so a missing process raises instead of hanging."""
    global _setup
    if _setup is None:
        return
    try:
        if mesh is not None:
            _agreement.agree(mesh, "shutting down the internode mode", None,
                             timeout_s=timeout_s)
    finally:
        _setup = None
        extension.nvshmem_module().internode_free()


# --------------------------------------------------------------------------
# Custom calls (inside shard_map: every argument is this rank's shard)
# --------------------------------------------------------------------------


def _typed(like, shape, dtype):
    return extension.result_type(jax.typeof(like), shape, dtype)


def dispatch_call(axis_index, slot, node_slot, sent, node_sent, payloads, *, capacity,
                  ranks_per_node):
    """Counts + rows across nodes. -> (rank_counts [R, R], relay_pos [N, T, G],
    relay_rows [N], *payloads moved to [capacity, ...])."""
    extension.register_targets()
    num_tokens, num_ranks = jax.typeof(slot).shape
    num_nodes = num_ranks // ranks_per_node
    flat = [calls.as_rows(p) for p in payloads]
    types = [_typed(sent, (num_ranks, num_ranks), jnp.int32),
             _typed(sent, (num_nodes, num_tokens, ranks_per_node), jnp.int32),
             _typed(sent, (num_nodes,), jnp.int32)]
    types += [calls.moved_type(p, capacity) for p in flat]
    counts, relay_pos, relay_rows, *recv = calls.comm_call(DISPATCH, types,
        axis_index, slot, node_slot, sent, node_sent, *flat, capacity=np.int64(capacity))
    recv = [r.reshape((capacity,) + tuple(p.shape[1:])) for r, p in zip(recv, payloads)]
    return counts, relay_pos, relay_rows, recv


def dispatch_cached_call(axis_index, handle, payloads):
    extension.register_targets()
    flat = [calls.as_rows(p) for p in payloads]
    types = [calls.moved_type(p, handle.capacity) for p in flat]
    recv = calls.comm_call(
        DISPATCH_CACHED, types, axis_index, handle.token_slot, handle.node_slot, handle.rank_counts, handle.relay_rows,
        *flat, capacity=np.int64(handle.capacity))
    return [r.reshape((handle.capacity,) + tuple(p.shape[1:])) for r, p in zip(recv, payloads)]


def combine_call(axis_index, y, handle):
    extension.register_targets()
    flat = calls.as_rows(y)
    out_type = _typed(flat, (handle.num_tokens, flat.shape[1]), flat.dtype)
    out = calls.comm_call(COMBINE, out_type,
        axis_index, flat, handle.node_slot, handle.rank_counts, handle.relay_pos,
        handle.relay_rows)
    return out.reshape((handle.num_tokens,) + tuple(y.shape[1:]))


# --------------------------------------------------------------------------
# Trace-time checks and backend functions
# --------------------------------------------------------------------------


def _check(op, axis_name, num_tokens, row_bytes=None, message=None):
    if _setup is None:
        raise RuntimeError(f"jax_ep.{op}: the internode buffers are not set up: {SETUP_HINT}")
    if _setup.axis_name != axis_name:
        raise ValueError(f"jax_ep.{op}: axis_name={axis_name!r} but initialize() set up "
                         f"axis {_setup.axis_name!r}.")
    check_call_mesh(op, axis_name, _setup.groups)
    state = info()
    if num_tokens > state["max_tokens_per_rank"]:
        raise ValueError(f"jax_ep.{op}: {num_tokens} tokens per rank but initialize() sized "
                         f"the internode region for max_tokens_per_rank="
                         f"{state['max_tokens_per_rank']}; initialize with a larger one.")
    need = message if message is not None else -(-int(row_bytes) // 16) * 16
    if need > state["stride"]:
        what = "a dispatch message" if message is not None else "a combine row"
        raise ValueError(f"jax_ep.{op}: {what} of this call takes {need} bytes but initialize() "
                         f"sized the internode rows for {state['stride']}; initialize with "
                         f"larger hidden / top_k / dtype.")


def _node_fields(handle, ranks_per_node, node_slot, relay_pos, relay_rows):
    return dataclasses.replace(handle, ranks_per_node=ranks_per_node, node_slot=node_slot,
                               relay_pos=relay_pos, relay_rows=relay_rows)


def dispatch(parts, topk_idx, topk_weights, *, num_experts, axis_name, capacity):
    num_ranks = lax.axis_size(axis_name)
    G = _setup.ranks_per_node if _setup is not None else num_ranks
    idx, num_invalid = valid_ids(topk_idx, num_experts)
    slot, sent = layout.route_ffi(topk_idx, num_experts=num_experts, num_ranks=num_ranks)
    node_slot, node_sent = layout.route_ffi(topk_idx, num_experts=num_experts,
                                            num_ranks=num_ranks // G)
    routing = Routing(idx, num_invalid, slot, sent)
    payloads = list(parts) + [routing.idx, topk_weights]
    _check("dispatch", axis_name, idx.shape[0],
           message=message_bytes(G, [calls.row_bytes(p) for p in payloads]))
    rank_counts, relay_pos, relay_rows, recv = dispatch_call(
        calls.axis_index(axis_name), slot, node_slot, sent, node_sent, payloads, capacity=capacity,
        ranks_per_node=G)
    handle = handle_from_counts(routing, rank_counts, num_experts=num_experts,
                                axis_name=axis_name, capacity=capacity)
    handle = _node_fields(handle, G, node_slot, relay_pos, relay_rows)
    *recv_parts, recv_idx, recv_w = recv
    recv_idx, recv_w, handle = localize(recv_idx, recv_w, handle)
    return recv_parts, recv_idx, recv_w, handle


def _check_handle(op, handle):
    if handle.node_slot is None or handle.ranks_per_node != _setup.ranks_per_node:
        raise ValueError(
            f"jax_ep.{op}: this handle was made without the internode node map "
            f"(ranks_per_node={handle.ranks_per_node}) but the CUDA backend runs the internode "
            f"mode with ranks_per_node={_setup.ranks_per_node}; combine a handle made by a "
            f"dispatch under the same jax_ep.initialize.")


def dispatch_rows(parts, handle):
    _check("dispatch", handle.axis_name, handle.num_tokens,
           message=message_bytes(_setup.ranks_per_node if _setup else 1,
                                 [calls.row_bytes(p) for p in parts]))
    _check_handle("dispatch", handle)
    return dispatch_cached_call(calls.axis_index(handle.axis_name), handle, list(parts))


def combine_rows(parts, handle):
    out = []
    for part in parts:
        _check("combine", handle.axis_name, handle.num_tokens, row_bytes=calls.row_bytes(part))
        _check_handle("combine", handle)
        if jnp.dtype(part.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                                         jnp.dtype(jnp.float32)):
            raise TypeError(f"jax_ep.combine: the internode kernels combine bfloat16, float16 "
                            f"or float32 rows, got {part.dtype}.")
        out.append(combine_call(calls.axis_index(handle.axis_name), part, handle))
    return out
