"""Low-latency mode (NVSHMEM, decode): region setup, custom calls, backend functions.

Setup (`setup`, from `jax_ep.initialize(low_latency=True)`, outside jit,
every process in the same order): NVSHMEM bootstrap (`nvshmem.py`), then a
collective allocation of the double-buffered symmetric region sized from
(max_tokens_per_rank, hidden, num_experts, top_k, itemsize), and a barrier.
The symmetric heap (NVSHMEM_SYMMETRIC_SIZE, unless set) is sized to fit it.
The `Options` switches reach the kernels here, as arguments.

Conventions of the custom calls (ffi/handlers/low_latency_*.cc): every one takes
first `axis_index` (int32 [], lax.axis_index of the call: the kernels stop
with a message when it is not the PE's rank, i.e. a mesh of another device
order than initialize's). R = EP size,
M = max_tokens_per_rank, L = num_experts // R. `slot[t, k]` is the row of
(token t, expert topk_idx[t, k]) among that expert's R * M rows on its owner
(not the flattened L * R * M index of LowLatencyHandle.slot: add
`(topk_idx % L) * R * M` where slot >= 0 to convert). `recv_src[l, p]` =
`s * M + t` of row p of local expert l, -1 past recv_count[l].

The backend functions have the signatures of their `_reference` twins. The
handle carries owner, the flattened slot and recv_src; recv_row stays -1
(only the reference backend's combine reads it), so a low-latency handle is
combined by the backend that made it.

Both receive layouts are the kernels' own: padded [L, R*M, H], or ragged
[N, H] with N = R*M*min(K, L) (the custom call's recv_x, y or out has that
shape), rows placed at their final offset (the exclusive prefix sum of
recv_count) as they arrive, no extra pass. recv_src and slot stay per expert
in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _agreement
from .._handles import LowLatencyHandle
from .._mesh import check_call_mesh, group_ids
from .._routing import valid_ids
from . import calls, errors, extension, grid, nvshmem

DISPATCH = "jax_ep_ll_dispatch"
DISPATCH_SEND = "jax_ep_ll_dispatch_send"
DISPATCH_RECV = "jax_ep_ll_dispatch_recv"
COMBINE = "jax_ep_ll_combine"
COMBINE_SEND = "jax_ep_ll_combine_send"
COMBINE_RECV = "jax_ep_ll_combine_recv"
GATHER = "jax_ep_ll_gather"
DISPATCH_CACHED = "jax_ep_ll_dispatch_cached"

FP8_BLOCK = 128
# Symmetric-heap headroom for NVSHMEM's own allocations (teams, psync, ...).
_HEAP_HEADROOM = 128 << 20

SETUP_HINT = ("call jax_ep.initialize(mesh, axis_name=..., max_tokens_per_rank=..., "
              "hidden=..., num_experts=..., low_latency=True) on the GPU mesh first.")

_groups = None  # the EP group of setup as device ids (_mesh.group_ids), for trace-time checks


def compiled() -> bool:
    return extension.has_target(COMBINE)


def info() -> dict | None:
    """The runtime's info dict (rank, layout, effective settings...), or None without NVSHMEM."""
    if not extension.nvshmem_available():
        return None
    return dict(extension.nvshmem_module().nvshmem_ll_info())


def ready() -> bool:
    """Whether `setup` allocated the region."""
    state = info()
    return bool(state and state["allocated"])


# --------------------------------------------------------------------------
# Setup and teardown
# --------------------------------------------------------------------------


def region_bytes(num_ranks, max_tokens_per_rank, hidden, num_experts, top_k, itemsize,
                 send_buffer=True) -> int:
    """Symmetric-heap bytes the region takes, with NVSHMEM's headroom (for a mode that
    initializes NVSHMEM first and must leave room for this one)."""
    return int(extension.nvshmem_module().nvshmem_ll_region_bytes(
        num_ranks, max_tokens_per_rank, hidden, num_experts, top_k, itemsize,
        bool(send_buffer))) + _HEAP_HEADROOM


def setup(mesh, axis_name, *, max_tokens_per_rank, hidden, num_experts, top_k, itemsize,
          options, timeout_s, num_blocks=0, send_buffer=None, ranks_per_node=None):
    """Bootstrap NVSHMEM and allocate the region (collective). Returns `info()`.

    Every step ends in an agreement across the processes (`_agreement.agree`),
    so a failure on one PE raises on all instead of leaving the others in a
    collective. ranks_per_node: the node map (initialize's); peers on another
    node are reached by NVSHMEM puts, peers on this node by stores. None: the
    peers NVSHMEM maps are reached by stores. send_buffer: allocate the
    staging rows NVSHMEM puts need. Default: when the PEs span several hosts
    or nodes, or options.force_put is on.
    """
    global _groups
    mod = extension.nvshmem_module()
    errors.install()

    def grouped(pes):
        return ranks_per_node is not None and ranks_per_node < pes.num_ranks

    def staging(pes):
        if send_buffer is not None:
            return bool(send_buffer)
        return options.force_put or not pes.single_host or grouped(pes)

    pes = nvshmem.bootstrap(
        mesh, axis_name,
        lambda pes: mod.nvshmem_ll_region_bytes(pes.num_ranks, max_tokens_per_rank, hidden,
                                                num_experts, top_k, itemsize, staging(pes))
        + _HEAP_HEADROOM, timeout_s=timeout_s, mode="low-latency")
    send_buffer = staging(pes)

    def allocate():
        mod.nvshmem_ll_set_options(float(timeout_s), int(num_blocks), int(options.force_put),
                                   int(pes.ranks_on_device))
        mod.nvshmem_ll_alloc(max_tokens_per_rank, hidden, num_experts, top_k, itemsize,
                             bool(send_buffer), system_scope=options.system_scope,
                             dependent_launch=options.dependent_launch,
                             streamed_combine=options.streamed_combine,
                             phase_trace=options.phase_trace or "",
                             ranks_per_node=int(ranks_per_node) if grouped(pes) else 0)
        _check_coresident(num_blocks)

    # The allocation ends in an NVSHMEM barrier; the agreement after it also
    # keeps rank 0's bootstrap socket alive until everyone's init is done.
    _agreement.step(mesh, "allocating the low-latency region", allocate, timeout_s=timeout_s)
    _groups = group_ids(mesh, axis_name)
    extension.register_targets()
    return info()


def _check_coresident(num_blocks):
    """A fused low-latency kernel waits for its own blocks and for every peer's."""
    grid.check_coresident(info(), num_blocks, kernels="low-latency")


def teardown(mesh=None, *, timeout_s=60.0):
    """Collective: free the region (idempotent); NVSHMEM stays up for the next setup
    (nvshmem.py says why).

    With `mesh`, the processes first agree (bounded by timeout_s) that all of
    them are shutting down: a missing one raises here instead of leaving the
    others in NVSHMEM's collective free / finalize forever.
    """
    global _groups
    if mesh is not None:
        _agreement.agree(mesh, "shutting down the low-latency mode", None, timeout_s=timeout_s)
    _groups = None
    nvshmem.free_regions()


# --------------------------------------------------------------------------
# Custom calls (inside shard_map: every argument is this rank's shard)
# --------------------------------------------------------------------------


def _num_ranks(num_ranks):
    if num_ranks is not None:
        return int(num_ranks)
    state = info()
    if not state or not state["allocated"]:
        raise RuntimeError("jax_ep low-latency ops: " + SETUP_HINT +
                           " (Or pass num_ranks= to trace without it.)")
    return int(state["num_ranks"])


def _attrs(max_tokens_per_rank, num_experts):
    return dict(max_tokens_per_rank=np.int64(max_tokens_per_rank),
                num_experts=np.int64(num_experts))


def _token_type(like):
    return extension.result_type(jax.typeof(like), (2,), jnp.int32)


def _expert_rows(layout, num_local, rows_per_expert, top_k):
    """Leading dims of the expert rows: (L, R*M) padded, (R*M*min(K, L),) ragged."""
    if layout == "ragged":
        return (rows_per_expert * min(top_k, num_local),)
    return (num_local, rows_per_expert)


def _dispatch_results(like, x_dtype, hidden, num_tokens, top_k, num_ranks, num_experts,
                      max_tokens_per_rank, use_fp8, layout):
    L = num_experts // num_ranks
    RM = num_ranks * max_tokens_per_rank
    lead = _expert_rows(layout, L, RM, top_k)
    t = jax.typeof(like)
    types = [
        extension.result_type(t, lead + (hidden,), jnp.float8_e4m3fn if use_fp8 else x_dtype),
        extension.result_type(t, (L,), jnp.int32),
        extension.result_type(t, (L, RM), jnp.int32),
        extension.result_type(t, (num_tokens, top_k), jnp.int32),
    ]
    if use_fp8:
        types.append(extension.result_type(t, lead + (hidden // FP8_BLOCK,), jnp.float32))
    return types


def _pack_dispatch(out, use_fp8):
    recv_x, recv_count, recv_src, slot, *scales = out
    return ((recv_x, scales[0]) if use_fp8 else recv_x), recv_count, recv_src, slot


def dispatch_call(x, topk_idx, *, axis_index, num_experts, max_tokens_per_rank, use_fp8=False,
                  zero_fill=True, num_ranks=None, layout="padded"):
    """x [T, H] (bf16 / f16 / f32), topk_idx int32 [T, K] ->
    (recv_x [L, R*M, H] or (e4m3 [L, R*M, H], f32 scales [L, R*M, H/128]),
    recv_count int32 [L], recv_src int32 [L, R*M], slot int32 [T, K]).
    layout="ragged": recv_x [N, H] (scales [N, H/128]), N = R*M*min(K, L)."""
    extension.register_targets()
    R = _num_ranks(num_ranks)
    T, H = jax.typeof(x).shape
    K = jax.typeof(topk_idx).shape[1]
    types = _dispatch_results(x, jax.typeof(x).dtype, H, T, K, R, num_experts,
                              max_tokens_per_rank, use_fp8, layout)
    out = calls.comm_call(DISPATCH, types,
        axis_index, x, topk_idx, use_fp8=bool(use_fp8), zero_fill=bool(zero_fill),
        **_attrs(max_tokens_per_rank, num_experts))
    return _pack_dispatch(out, use_fp8)


def dispatch_send_call(x, topk_idx, *, axis_index, num_experts, max_tokens_per_rank, use_fp8=False):
    """Send half of dispatch_call: returns the int32 [2] token dispatch_recv_call takes."""
    extension.register_targets()
    return calls.comm_call(DISPATCH_SEND, _token_type(x),
        axis_index, x, topk_idx, use_fp8=bool(use_fp8), **_attrs(max_tokens_per_rank, num_experts))


def dispatch_recv_call(token, topk_idx, *, axis_index, hidden, x_dtype, num_experts,
                       max_tokens_per_rank,
                       use_fp8=False, zero_fill=True, num_ranks=None, layout="padded"):
    """Receive half of dispatch_call (same results); x_dtype / hidden of the sent x."""
    extension.register_targets()
    R = _num_ranks(num_ranks)
    T, K = jax.typeof(topk_idx).shape
    types = _dispatch_results(topk_idx, x_dtype, hidden, T, K, R, num_experts,
                              max_tokens_per_rank, use_fp8, layout)
    out = calls.comm_call(DISPATCH_RECV, types,
        axis_index, token, topk_idx, use_fp8=bool(use_fp8), zero_fill=bool(zero_fill),
        **_attrs(max_tokens_per_rank, num_experts))
    return _pack_dispatch(out, use_fp8)


def _expert_attrs(y, recv_src, num_ranks):
    """(L, M, H, E) of a combine's y, padded [L, R*M, H] or ragged [N, H]; L and
    R*M from recv_src [L, R*M], which is per expert in both layouts."""
    L, RM = jax.typeof(recv_src).shape
    H = jax.typeof(y).shape[-1]
    R = _num_ranks(num_ranks)
    if RM % R:
        raise ValueError(f"recv_src's second dimension {RM} is not a multiple of the EP size {R}")
    return L, RM // R, H, L * R


def combine_call(y, topk_idx, topk_weights, recv_src, recv_count, slot, *, axis_index,
                 num_ranks=None):
    """out[t] = sum_k w[t, k] * y_owner[row of (t, k)] in fp32, k order, cast to y's dtype.

    slot: dispatch_call's [T, K] slot (rows on this PE are read from y there)."""
    extension.register_targets()
    L, M, H, E = _expert_attrs(y, recv_src, num_ranks)
    T = jax.typeof(topk_idx).shape[0]
    out_type = extension.result_type(jax.typeof(y), (T, H), jax.typeof(y).dtype)
    return calls.comm_call(COMBINE, out_type,
        axis_index, y, topk_idx, topk_weights, recv_src, recv_count, slot, **_attrs(M, E))


def combine_send_call(y, recv_src, recv_count, *, axis_index, num_ranks=None):
    """Send half of combine_call: returns the int32 [2] token combine_recv_call takes."""
    extension.register_targets()
    L, M, H, E = _expert_attrs(y, recv_src, num_ranks)
    return calls.comm_call(COMBINE_SEND, _token_type(y),
        axis_index, y, recv_src, recv_count, **_attrs(M, E))


def combine_recv_call(token, topk_idx, topk_weights, *, axis_index, hidden, y_dtype, num_experts,
                      max_tokens_per_rank):
    """Receive half of combine_call: [T, H] of the sent y's dtype."""
    extension.register_targets()
    T = jax.typeof(topk_idx).shape[0]
    out_type = extension.result_type(jax.typeof(topk_weights), (T, hidden), y_dtype)
    return calls.comm_call(COMBINE_RECV, out_type,
        axis_index, token, topk_idx, topk_weights, **_attrs(max_tokens_per_rank, num_experts))


def gather_call(y, topk_idx, recv_src, recv_count, slot, *, axis_index, num_ranks=None):
    """[T, K, H]: the row of each (t, k) from its expert's owner, 0 for invalid ids
    (slot as in combine_call)."""
    extension.register_targets()
    L, M, H, E = _expert_attrs(y, recv_src, num_ranks)
    T, K = jax.typeof(topk_idx).shape
    out_type = extension.result_type(jax.typeof(y), (T, K, H), jax.typeof(y).dtype)
    return calls.comm_call(GATHER, out_type,
        axis_index, y, topk_idx, recv_src, recv_count, slot, **_attrs(M, E))


def dispatch_cached_call(x, topk_idx, slot, recv_count, scale=None, *, axis_index, num_experts,
                         max_tokens_per_rank, zero_fill=True, num_ranks=None, layout="padded"):
    """Dispatch with known slots: [T, H] -> [L, R*M, H] (ragged: [N, H]); the row
    sent to expert e is x[t] * (sum of scale[t, k] over the k naming e), once per
    distinct expert; rows past recv_count are zero (zero_fill)."""
    extension.register_targets()
    R = _num_ranks(num_ranks)
    T, H = jax.typeof(x).shape
    K = jax.typeof(topk_idx).shape[1]
    lead = _expert_rows(layout, num_experts // R, R * max_tokens_per_rank, K)
    out_type = extension.result_type(jax.typeof(x), lead + (H,), jax.typeof(x).dtype)
    operands = [axis_index, x, topk_idx, slot, recv_count] + ([] if scale is None else [scale])
    return calls.comm_call(DISPATCH_CACHED, out_type,
        *operands, zero_fill=bool(zero_fill), **_attrs(max_tokens_per_rank, num_experts))


# --------------------------------------------------------------------------
# Backend functions (signatures of the `_reference` twins)
# --------------------------------------------------------------------------


def _check_fits(max_tokens_per_rank, hidden, top_k, num_experts, num_ranks, axis_name):
    if _groups is not None:
        check_call_mesh("low_latency_dispatch", axis_name, _groups)
    lay = info()["layout"]
    want = dict(max_tokens_per_rank=max_tokens_per_rank, hidden=hidden, top_k=top_k,
                num_experts=num_experts)
    too_big = {k: v for k, v in want.items() if v > lay[k]}
    if too_big or num_ranks != lay["num_ranks"]:
        raise ValueError(
            f"jax_ep low-latency: this call ({want}, EP size {num_ranks}) does not fit the "
            f"buffers initialize() allocated ({ {k: lay[k] for k in want} }, EP size "
            f"{lay['num_ranks']}); initialize with larger sizes.")


def _global_ids(handle):
    """Global expert ids, reconstructed from the handle's owner and slot."""
    rows = handle.num_ranks * handle.max_tokens_per_rank
    local = handle.num_experts // handle.num_ranks
    return jnp.where(handle.owner >= 0, handle.owner * local + handle.slot // rows, -1)


def _kernel_slot(handle):
    """The kernels' slots (row among the expert's R * M), from the handle's
    (local expert * R * M + row)."""
    rows = handle.num_ranks * handle.max_tokens_per_rank
    return jnp.where(handle.slot >= 0, handle.slot % rows, -1)


def _make_handle(idx, num_invalid, count, recv_src, slot, *, num_experts, axis_name,
                 max_tokens_per_rank, layout="padded"):
    num_ranks = lax.axis_size(axis_name)
    local = num_experts // num_ranks
    rows = num_ranks * max_tokens_per_rank
    return LowLatencyHandle(
        recv_count=count,
        num_invalid_experts=num_invalid,
        owner=jnp.where(idx >= 0, idx // local, -1).astype(jnp.int32),
        slot=jnp.where(slot >= 0, (idx % local) * rows + slot, -1).astype(jnp.int32),
        recv_row=jnp.full((num_ranks,) + idx.shape, -1, jnp.int32),
        recv_src=recv_src,
        num_experts=num_experts,
        max_tokens_per_rank=max_tokens_per_rank,
        axis_name=axis_name,
        layout=layout,
    )


def low_latency_dispatch(x, topk_idx, *, num_experts, axis_name, max_tokens_per_rank,
                         use_fp8, zero_padding=True, layout="padded"):
    num_ranks = lax.axis_size(axis_name)
    _check_fits(max_tokens_per_rank, x.shape[1], topk_idx.shape[1], num_experts, num_ranks,
                axis_name)
    idx, num_invalid = valid_ids(topk_idx, num_experts)
    recv, count, recv_src, slot = dispatch_call(
        x, idx, axis_index=calls.axis_index(axis_name), num_experts=num_experts,
        max_tokens_per_rank=max_tokens_per_rank, use_fp8=use_fp8, zero_fill=zero_padding,
        num_ranks=num_ranks, layout=layout)
    handle = _make_handle(idx, num_invalid, count, recv_src, slot, num_experts=num_experts,
                          axis_name=axis_name, max_tokens_per_rank=max_tokens_per_rank,
                          layout=layout)
    return (list(recv) if use_fp8 else [recv]), count, handle


def low_latency_dispatch_send(x, topk_idx, *, num_experts, axis_name, max_tokens_per_rank,
                              use_fp8):
    """Send half: (token, cleaned ids, invalid count) for low_latency_dispatch_recv."""
    num_ranks = lax.axis_size(axis_name)
    _check_fits(max_tokens_per_rank, x.shape[1], topk_idx.shape[1], num_experts, num_ranks,
                axis_name)
    idx, num_invalid = valid_ids(topk_idx, num_experts)
    token = dispatch_send_call(x, idx, axis_index=calls.axis_index(axis_name),
                               num_experts=num_experts, max_tokens_per_rank=max_tokens_per_rank,
                               use_fp8=use_fp8)
    return token, idx, num_invalid


def low_latency_dispatch_recv(token, idx, num_invalid, *, hidden, x_dtype, num_experts,
                              axis_name, max_tokens_per_rank, use_fp8, zero_padding=True,
                              layout="padded"):
    num_ranks = lax.axis_size(axis_name)
    recv, count, recv_src, slot = dispatch_recv_call(
        token, idx, axis_index=calls.axis_index(axis_name), hidden=hidden, x_dtype=x_dtype,
        num_experts=num_experts, max_tokens_per_rank=max_tokens_per_rank, use_fp8=use_fp8,
        zero_fill=zero_padding, num_ranks=num_ranks, layout=layout)
    handle = _make_handle(idx, num_invalid, count, recv_src, slot, num_experts=num_experts,
                          axis_name=axis_name, max_tokens_per_rank=max_tokens_per_rank,
                          layout=layout)
    return (list(recv) if use_fp8 else [recv]), count, handle


def low_latency_combine_send(y, handle):
    return combine_send_call(y, handle.recv_src, handle.recv_count,
                             axis_index=calls.axis_index(handle.axis_name), num_ranks=handle.num_ranks)


def low_latency_combine_recv(token, topk_weights, handle, *, hidden, y_dtype):
    return combine_recv_call(token, _global_ids(handle), topk_weights,
                             axis_index=calls.axis_index(handle.axis_name), hidden=hidden,
                             y_dtype=y_dtype, num_experts=handle.num_experts,
                             max_tokens_per_rank=handle.max_tokens_per_rank)


def low_latency_combine(y, topk_weights, handle):
    return combine_call(y, _global_ids(handle), topk_weights,
                        handle.recv_src, handle.recv_count, _kernel_slot(handle),
                        axis_index=calls.axis_index(handle.axis_name), num_ranks=handle.num_ranks)


def low_latency_gather_rows(y, handle):
    return gather_call(y, _global_ids(handle), handle.recv_src,
                       handle.recv_count, _kernel_slot(handle),
                       axis_index=calls.axis_index(handle.axis_name), num_ranks=handle.num_ranks)


def low_latency_dispatch_rows(parts, handle, row_weights=None):
    return [dispatch_cached_call(
        part, _global_ids(handle), _kernel_slot(handle), handle.recv_count, row_weights,
        axis_index=calls.axis_index(handle.axis_name), num_experts=handle.num_experts,
        max_tokens_per_rank=handle.max_tokens_per_rank, num_ranks=handle.num_ranks,
        layout=handle.layout)
        for part in parts]
